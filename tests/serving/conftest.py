"""Fixtures the serving tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tierpick.serving.gateway.demo import Upstream

TIERS = ("local", "mid", "frontier")
# a hard request and a follow-up that, read alone, looks trivial (the shipped model routes the
# follow-up alone to local, the conversation to frontier)
HARD_REQUEST = (
    "Design a Raft-based replicated key-value store in Rust with linearizable lease reads and "
    "joint-consensus membership changes; prove the read path safe under clock drift."
)
FOLLOW_UP_CHAT = [
    {"role": "user", "content": HARD_REQUEST},
    {"role": "assistant", "content": "Here is a design: ..."},
    {"role": "user", "content": "ok continue"},
]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    """Three OpenAI-compatible upstreams on loopback, one per tier, answering as their tier."""
    ups = {t: Upstream(t) for t in TIERS}
    yield ups
    for u in ups.values():
        u.close()
