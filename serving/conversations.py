"""Sticky routing: under a policy with ``sticky`` on, a conversation is never routed below the
dearest tier it was routed to before, so a follow-up never lands on a weaker model than the
request it continues (a conversation also reads its earlier user turns:
:func:`~tierpick.classifier.conversation_text`).

A conversation is named by the client (a conversation id: the gRPC field, the
``x-tierpick-conversation`` header, the LiteLLM ``metadata.tierpick.conversation_id``), or else
by its opening: a digest of the chat's system prompt and first user turn, which every later
request of the chat repeats. Two chats that open with the same words share a key: send an id
where that matters.

State lives in the serving process (each replica its own), bounded in keys and in time; a key
from a client is bounded in size. Raising is only ever to a tier the request's own policy
allows (its grant included): stickiness never reaches a tier a client may not reach.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from tierpick.classifier.errors import PolicyError
from tierpick.classifier.routing import Router
from tierpick.classifier.runtime import Decision, TierClassifier

MAX_ID_CHARS = 256
MAX_CONVERSATIONS = 100_000
TTL_SECONDS = 6 * 3600.0


def conversation_key(conversation_id: str, messages: object) -> str | None:
    """The key of a request's conversation: its id (checked: at most :data:`MAX_ID_CHARS`
    printable characters), else a digest of its chat's opening, else None (a bare prompt)."""
    if conversation_id:
        if len(conversation_id) > MAX_ID_CHARS or not conversation_id.isprintable():
            raise PolicyError(
                f"conversation id: at most {MAX_ID_CHARS} printable characters, got "
                f"{len(conversation_id)} characters"
            )
        return "id:" + conversation_id
    if not isinstance(messages, Sequence) or not messages:
        return None
    opening: list[str] = []
    for m in messages:
        if not isinstance(m, Mapping):
            return None
        content = m.get("content")
        text = content if isinstance(content, str) else repr(content)
        opening.append(f"{m.get('role')}:{text[:4096]}")
        if m.get("role") == "user":
            break
    else:
        return None  # no user turn: nothing identifies the chat
    return "opening:" + hashlib.sha256("\n".join(opening).encode()).hexdigest()


class Conversations:
    """The dearest tier each recent conversation was routed to (LRU, at most ``max_keys``
    conversations, each forgotten ``ttl`` seconds after its last request); thread-safe."""

    def __init__(self, max_keys: int = MAX_CONVERSATIONS, ttl: float = TTL_SECONDS) -> None:
        self.max_keys, self.ttl = max_keys, ttl
        self._tiers: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tiers)

    def hold_decision(
        self,
        conversation: str,
        messages: object,
        decision: Decision,
        clf: TierClassifier,
        router: Router,
    ) -> tuple[Decision, bool]:
        """One request's ``decision`` (of ``clf``) under ``router``: when it is sticky, its tier
        held to its conversation's (named by ``conversation``, else by ``messages``' opening,
        :func:`conversation_key`) by :meth:`hold`; and whether it was raised."""
        if not router.sticky:
            return decision, False
        key = conversation_key(conversation, messages)
        index, held = self.hold(key, clf.tiers.index(decision.tier), router.allowed)
        return replace(decision, tier=clf.tiers[index]), held

    def hold(
        self, key: str | None, chosen: int, allowed: npt.NDArray[np.bool_]
    ) -> tuple[int, bool]:
        """The tier for this request: ``chosen``, raised to the conversation's dearest tier so
        far when that is dearer (or, when the policy does not allow that tier, to the dearest
        allowed tier below it); and whether it was raised. The conversation then holds the
        dearer of the two."""
        if key is None:
            return chosen, False
        now = time.monotonic()
        with self._lock:
            held = self._tiers.pop(key, None)
            before = held[0] if held is not None and now - held[1] <= self.ttl else -1
            tier = chosen
            if before > chosen:
                dearer = [j for j in range(chosen + 1, before + 1) if allowed[j]]
                tier = dearer[-1] if dearer else chosen
            self._tiers[key] = (max(before, tier), now)
            while len(self._tiers) > self.max_keys:
                self._tiers.popitem(last=False)
        return tier, tier != chosen
