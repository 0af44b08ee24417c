"""The decision log: every routing decision a door makes (the gRPC service, the Envoy processor,
the LiteLLM plug-in), one JSON object per line, for shadow mode and for learning from traffic.

A row is a scored log's row (``tierpick score``'s columns: ``prompt`` when prompts are kept,
``tier``, ``p_<tier>``, ``error``, ``model_version``) plus what the door knew: the time, the
request id, the door, the mode (``route``: the decision was applied; ``shadow``: logged only,
traffic went where it would have gone without tierpick), the model the request named, the
policy (rule, cost weight, threshold, allowed tiers), ``prompt_sha256`` (of the prompt's first
``max_prompt_chars`` characters) and ``prompt_chars``.
So ``tierpick report`` and ``tune --scored`` read it as they read a scored log, and ``tierpick
label`` draws its sample from it.

Writing never holds a request: :meth:`DecisionLog.record` puts the row on a bounded queue
(a few microseconds) and one thread serializes and appends it. When the queue is full the row
is dropped and counted (``dropped``; the doors export it as
``tierpick_decision_log_dropped_total``): a slow disk costs log rows, never latency. Prompts are
written only when the operator allows it (``prompts: true``), cut to ``max_prompt_chars``
(``prompt_cut: true`` says so); the hash is always written. The file rotates at ``max_bytes``
(``decisions.jsonl`` -> ``decisions.jsonl.1`` ...; ``backups`` kept).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field

from tierpick.classifier.routing import Router, clip
from tierpick.classifier.settings import Settings, StrictBool, StrictInt, parse_settings

log = logging.getLogger("tierpick.decisions")

MODES = ("route", "shadow")


def _path(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must be a file path, got ''")
    return value


class DecisionLogConfig(Settings):
    """Where and how decisions are logged (``--decision-log`` and friends, the gateway's and
    the plug-in's ``decision_log:`` mapping)."""

    path: Annotated[Path, BeforeValidator(_path)]
    prompts: StrictBool = False  # write the prompt text (else only its hash and length)
    max_prompt_chars: Annotated[StrictInt, Field(ge=1)] = 32_768
    max_mb: Annotated[float, Field(strict=True, gt=0)] = 256  # the file rotates at this size
    backups: Annotated[StrictInt, Field(ge=0)] = 5
    queue_size: Annotated[StrictInt, Field(ge=1)] = 10_000  # rows waiting to be written

    @property
    def max_bytes(self) -> int:
        return max(1, int(self.max_mb * (1 << 20)))

    @classmethod
    def from_mapping(cls, raw: object, where: str) -> DecisionLogConfig | None:
        """A ``decision_log:`` mapping of a YAML config (None: off)."""
        return None if raw is None else parse_settings(cls, raw, where)


def policy_fields(router: Router) -> dict[str, Any]:
    """The policy a decision was made under, as the log writes it."""
    allowed = [t for t, ok in zip(router.tiers, router.allowed, strict=True) if ok]
    return {
        "rule": router.rule,
        "cost_weight": router.cost_weight,
        "min_success": router.min_success,
        "allowed_tiers": allowed,
    }


def basis(
    router: Router, proba_row: Sequence[float], cut: bool, held: bool = False
) -> dict[str, Any]:
    """Why a tier was chosen, in plain values: the rule, its knob, each allowed tier's utility,
    whether the prompt was cut, whether a sticky policy held the tier to its conversation's
    (:func:`basis_headers` renders it for the HTTP doors)."""
    import numpy as np

    utility = router.utilities(np.asarray([proba_row], dtype=np.float64))[0]
    return {
        "rule": router.rule,
        "cost_weight": router.cost_weight,
        "min_success": router.min_success,
        "prompt_cut": bool(cut),
        "held_by_conversation": bool(held),
        "utilities": {
            t: float(u)
            for t, u, ok in zip(router.tiers, utility, router.allowed, strict=True)
            if ok
        },
    }


HEADER_PREFIX = "x-tierpick-"
MAX_HEADER_CHARS = 512  # an x-tierpick-* header value is cut to this many characters


@dataclass(frozen=True)
class DecisionRecord:
    """One door's decision on one request, in the one shape every HTTP door renders: the
    ``x-tierpick-*`` response headers (:meth:`headers`, Envoy's processor and LiteLLM's hook
    alike) and a plain mapping (:meth:`as_dict`, LiteLLM's request metadata and spend logs).

    ``status`` is the door's outcome (classified, not-classified, fallback, shadow, ...);
    ``tier`` the tier the request goes to (None: the door's fallback decides);
    ``shadow_tier`` the tier shadow mode would have chosen; ``basis`` as :func:`basis` gives
    it."""

    status: str
    tier: str | None = None
    probabilities: Mapping[str, float] = field(default_factory=dict)
    model_version: str = ""
    reason: str = ""
    basis: Mapping[str, Any] | None = None
    shadow_tier: str | None = None

    # every header a record can set: what the gateway strips from requests, so no client
    # sends one upstream as if tierpick had set it
    HEADERS: ClassVar[tuple[str, ...]] = (
        "tier",
        "model-version",
        "probabilities",
        "status",
        "reason",
        "basis",
        "utilities",
        "shadow-tier",
    )

    @classmethod
    def of(cls, mapping: Mapping[str, Any]) -> DecisionRecord:
        """The record of a mapping :meth:`as_dict` wrote (other keys ignored)."""
        return cls(**{k: mapping[k] for k in _RECORD_KEYS if mapping.get(k) is not None})

    def as_dict(self) -> dict[str, Any]:
        """The fields, empty ones left out (``tier`` always there: None is a decision)."""
        return {k: getattr(self, k) for k in _RECORD_KEYS if getattr(self, k) or k == "tier"}

    def headers(self) -> dict[str, str]:
        """The ``x-tierpick-*`` headers (empty values left out), each value cut to
        :data:`MAX_HEADER_CHARS`: a reason may quote a client (a 200,000-character model name
        made a 200 KB header, and Envoy answered 500)."""
        out = {
            "tier": self.tier or "",
            "model-version": self.model_version,
            "probabilities": ",".join(f"{t}={p:.4f}" for t, p in self.probabilities.items()),
            "status": self.status,
            "reason": self.reason,
            "shadow-tier": self.shadow_tier or "",
            **(basis_headers(self.basis) if self.basis else {}),
        }
        return {HEADER_PREFIX + k: clip(v, MAX_HEADER_CHARS) for k, v in out.items() if v}


_RECORD_KEYS = tuple(f.name for f in fields(DecisionRecord))


def basis_headers(b: Mapping[str, Any]) -> dict[str, str]:
    """``basis`` and ``utilities`` header values (without the ``x-tierpick-`` prefix), each a
    few dozen characters."""
    return {
        "basis": (
            f"{b['rule']}; cost_weight={b['cost_weight']:.6g}; "
            f"min_success={b['min_success']:g}; prompt_cut={'yes' if b['prompt_cut'] else 'no'}"
            + ("; held_by_conversation=yes" if b.get("held_by_conversation") else "")
        ),
        "utilities": ",".join(f"{t}={u:.4f}" for t, u in b["utilities"].items()),
    }


class DecisionLog:
    """An append-only JSONL decision log written by one background thread (see the module)."""

    def __init__(self, config: DecisionLogConfig) -> None:
        self.config = config
        config.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = config.path.open("a", encoding="utf-8")  # fails here, at start, if it can't
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(config.queue_size)
        self.dropped = 0
        self.written = 0
        self._pending = 0  # rows queued and not yet in the file (flush waits for 0)
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._thread.start()

    def record(
        self,
        *,
        door: str,
        mode: str,
        prompt: str,
        tiers: Sequence[str],
        proba: Sequence[float] | None,
        tier: str | None,
        model_version: str,
        policy: Mapping[str, Any] | None = None,
        request_id: str = "",
        requested_model: str | None = None,
        error: str | None = None,
    ) -> None:
        """Queue one decision (never blocks; a full queue drops the row and counts it)."""
        row = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "door": door,
            "mode": mode,
            # cut here (a slice), so the queue holds at most max_prompt_chars a row; hashed,
            # and written or dropped, in the writer thread
            "prompt": prompt[: self.config.max_prompt_chars],
            "prompt_chars": len(prompt),
            "tier": tier,
            **{
                f"p_{t}": None if p is None else round(float(p), 6)
                for t, p in zip(tiers, [None] * len(tiers) if proba is None else proba, strict=True)
            },
            "error": error,
            "model_version": model_version,
            "requested_model": requested_model,
            **(policy or {}),
        }
        with self._idle:
            try:
                self._queue.put_nowait(row)
                self._pending += 1
            except queue.Full:
                self.dropped += 1

    def _finish(self, row: dict[str, Any]) -> str:
        text = row.pop("prompt")
        extra: dict[str, Any] = {
            # of the text as kept (the first max_prompt_chars characters)
            "prompt_sha256": hashlib.sha256(text.encode("utf-8", "replace")).hexdigest(),
            "prompt_chars": row.pop("prompt_chars"),
        }
        if self.config.prompts:
            extra["prompt"] = text
            extra["prompt_cut"] = extra["prompt_chars"] > len(text)
        return json.dumps({**extra, **row}, ensure_ascii=False) + "\n"

    def _run(self) -> None:
        while True:
            row = self._queue.get()
            if row is None:
                break
            try:
                self._write(self._finish(row))
            except Exception:  # a full disk must not kill the thread: the row is counted
                self.dropped += 1
                log.exception("decision log: a row could not be written")
            if self._queue.empty():
                self._fh.flush()
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
        self._fh.flush()

    def _write(self, line: str) -> None:
        cfg = self.config
        if self._fh.tell() + len(line) > cfg.max_bytes and self._fh.tell() > 0:
            self._rotate()
        self._fh.write(line)
        self.written += 1

    def _rotate(self) -> None:
        self._fh.close()
        path, n = self.config.path, self.config.backups
        if n == 0:
            path.unlink(missing_ok=True)
        else:
            for i in range(n - 1, 0, -1):
                older = path.with_name(f"{path.name}.{i}")
                if older.exists():
                    os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
            os.replace(path, path.with_name(f"{path.name}.1"))
        self._fh = path.open("a", encoding="utf-8")

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (up to ``timeout`` seconds) until every row queued so far is in the file;
        whether it got there in time."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout`` seconds) and close the file."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._fh.close()


__all__ = [
    "MODES",
    "DecisionLog",
    "DecisionLogConfig",
    "DecisionRecord",
    "basis",
    "basis_headers",
    "policy_fields",
]
