"""Prompt normalization: defined once, used by training and by the runtime.

The served model must see exactly the text it was trained on, so both sides call
:func:`normalize_prompt`. :func:`prompt_key` is the identity used for dedupe and
decontamination: it also folds case and all whitespace, so trivially different copies of
a prompt count as one.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# C0/C1 control characters except tab and newline (carriage returns are handled first), and
# invisible format characters: zero-width spaces/joiners, word joiner, byte-order mark.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_ANY_SPACE = re.compile(r"\s+")


def normalize_prompt(text: str) -> str:
    """Return the canonical form of a prompt, the form the model sees.

    NFKC Unicode normalization, ``\\r\\n``/``\\r`` to ``\\n``, control characters removed,
    trailing spaces on lines dropped, runs of blank lines cut to one, outer white space
    stripped. Meaningful layout (single newlines, indentation) is kept.

    Args:
        text: the raw prompt.

    Returns:
        The normalized prompt; empty if ``text`` held nothing but white space.
    """
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def prompt_key(text: str) -> str:
    """Return the dedupe identity of a prompt: a hex sha256 of its case- and space-folded form.

    Args:
        text: a raw or normalized prompt.

    Returns:
        A 64-character hex digest.
    """
    folded = _ANY_SPACE.sub(" ", normalize_prompt(text)).casefold()
    return hashlib.sha256(folded.encode("utf-8")).hexdigest()


def messages_to_prompt(messages: Iterable[Mapping[str, object]]) -> str:
    """Return the text classified for an OpenAI-style chat: the last user turn.

    The last user message is what the next model call has to answer; system prompts and
    earlier turns (few-shot examples, history) say little about its difficulty and would
    push the question itself out of the truncation window.

    Args:
        messages: ``{"role": ..., "content": ...}`` mappings, oldest first. ``content`` may
            be a string or a list of OpenAI content parts (``{"type": "text", "text": ...}``).

    Returns:
        The last user turn's text.

    Raises:
        ValueError: when there is no user message with text.
    """
    return _last_user_turn(
        messages,
        lambda _, m: _content_text(m.get("content")) if m.get("role") == "user" else None,
        "the chat has no user message with text content",
    )


def _last_user_turn(
    messages: Iterable[Any], text_of: Callable[[int, Any], str | None], missing: str
) -> str:
    """The last text ``text_of(index, message)`` finds (None: the message has none), else
    ValueError(``missing``): the rule :func:`messages_to_prompt` and :func:`last_user_text`
    share, each with its own reading of a message."""
    last: str | None = None
    for i, message in enumerate(messages):
        text = text_of(i, message)
        if text is not None:
            last = text
    if last is None:
        raise ValueError(missing)
    return last


# Text an agent harness injects into user turns: plumbing, not what a person asked. Claude Code's
# reminders and slash-command echoes, Codex's environment and instruction blocks.
HARNESS_TAGS = (
    "system-reminder",
    "environment_context",
    "user_instructions",
    "environments_instructions",
    "recommended_plugins",
    "command-name",
    "command-message",
    "command-args",
    "local-command-stdout",
    "local-command-stderr",
    "local-command-caveat",
)
# An opening tag, or the heading of Codex's AGENTS.md block; bounded, so text full of openings
# that never close costs linear time, not quadratic (it arrives from clients).
_HARNESS_OPEN = re.compile(
    r"<(" + "|".join(re.escape(t) for t in HARNESS_TAGS) + r")\b[^>\n]{0,200}>"
    r"|# AGENTS\.md instructions for [^\n]{0,500}\n",
    re.IGNORECASE,
)


def strip_harness(text: str) -> str:
    """``text`` without complete agent-harness blocks (:data:`HARNESS_TAGS`, Codex's AGENTS.md
    instructions); an unclosed tag is left in place (it may be prose about the tag).

    Linear in the text: each kind of closing tag that is missing is searched for once."""
    out: list[str] = []
    pos = start = 0
    missing: set[str] = set()
    while (m := _HARNESS_OPEN.search(text, start)) is not None:
        closer = f"</{m.group(1)}" if m.group(1) else "</INSTRUCTIONS"
        key = closer.lower()
        found = None
        if key not in missing:
            found = re.compile(re.escape(closer) + r"\s*>", re.IGNORECASE).search(text, m.end())
        if found is None:
            missing.add(key)
            start = m.end()
            continue
        out.append(text[pos : m.start()])
        pos = start = found.end()
    out.append(text[pos:])
    return "".join(out).strip()


def last_user_text(messages: object) -> str:
    """The last user turn of a chat (OpenAI ``messages``) that holds text of its own.

    Stricter than :func:`messages_to_prompt`, which reads training data: system prompts,
    assistant turns and tool results are skipped, agent-harness blocks are removed from user
    turns (:func:`strip_harness`), and a user turn left with no text (a reminder only, a tool
    result carried in a user turn, an image) is skipped, so an agent loop is classified on the
    task its user gave. What a served chat is classified on is :func:`conversation_text`: this
    turn, with the user turns before it.

    Raises:
        ValueError: naming the problem: ``messages`` is not a list of objects, a content part is
            not an object, a text part's ``text`` is not a string, or no user turn has text.
    """
    return conversation_text(messages, 0)


# an earlier turn cut to fit the context is kept only with at least this much of it left
MIN_CONTEXT_CHARS = 64


def conversation_text(messages: object, limit: int) -> str:
    """The text classified for a served chat request: its last user turn with text of its own
    (:func:`last_user_text`), then the user turns before it, newest first, as many as fit in
    ``limit`` characters (the last one that does not fit is cut), separated by blank lines.

    So a follow-up ("ok continue", "and now in Rust", "fix it") is read with the request it
    continues, while a new request in a long chat is read first. The model pools over the
    tokens it reads, so the order only decides what is cut; ``limit`` is what a model reads
    (its ``max_chars``), so context never cuts the turn asked. Only the turns read are
    processed, newest first: the work is bounded whatever the chat's length.

    Raises:
        ValueError: as :func:`last_user_text`.
    """
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")
    texts = [_checked_user_text(i, m) for i, m in enumerate(messages)]  # shapes: cheap
    parts: list[str] = []
    size = 0
    for text in reversed(texts):  # the text work: from the last turn back, while it fits
        if text is None or not (stripped := strip_harness(text[:MAX_TURN_CHARS])):
            continue
        if not parts:
            parts.append(stripped)
            size = len(stripped)
            if size >= limit:
                break
            continue
        room = limit - size - 2
        if room < MIN_CONTEXT_CHARS:
            break
        parts.append(stripped[:room])
        size += 2 + len(parts[-1])
    if not parts:
        raise ValueError(
            "no user message with text to classify (only system, assistant or tool messages, "
            "non-text parts, or agent-harness blocks)"
        )
    return "\n\n".join(parts)


# A user turn is read up to this many characters: the work one request costs is bounded before
# any text is processed (a 60 MB message of harness tags cost 3.6 s on the event loop), and far
# more than a model reads (4 x its max_chars) is left after the blocks are removed.
MAX_TURN_CHARS = 1 << 16


def _checked_user_text(i: int, message: object) -> str | None:
    """Message ``i``'s own text if it is a user turn (harness blocks not yet removed; None if it
    has none); ValueError naming a malformed message or part."""
    if not isinstance(message, Mapping):
        raise ValueError(f"messages[{i}] must be an object, got {type(message).__name__}")
    if message.get("role") != "user":
        return None
    content = message.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, Mapping):
                raise ValueError(f"{where} must be an object, got {type(part).__name__}")
            if part.get("type") == "text" and not isinstance(part.get("text"), str):
                raise ValueError(
                    f"{where}.text must be a string, got {type(part.get('text')).__name__}"
                )
    elif content is not None and not isinstance(content, str):
        raise ValueError(
            f"messages[{i}].content must be a string or a list of parts, "
            f"got {type(content).__name__}"
        )
    return _content_text(content, MAX_TURN_CHARS)


def _content_text(content: object, limit: int | None = None) -> str | None:
    """A turn's text (its text parts joined), the first ``limit`` characters when given (read
    part by part: the parts past the limit are not joined)."""
    if isinstance(content, str):
        return content if limit is None else content[:limit]
    if isinstance(content, list):
        parts, size = [], 0
        for p in content:
            if (
                isinstance(p, Mapping)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
            ):
                parts.append(p["text"] if limit is None else p["text"][: limit - size])
                size += len(parts[-1]) + 1
                if limit is not None and size >= limit:
                    break
        return "\n".join(parts) if parts else None
    return None
