"""Fixtures the serving tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tierpick.serving.gateway.demo import Upstream

TIERS = ("local", "mid", "frontier")


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    """Three OpenAI-compatible upstreams on loopback, one per tier, answering as their tier."""
    ups = {t: Upstream(t) for t in TIERS}
    yield ups
    for u in ups.values():
        u.close()
