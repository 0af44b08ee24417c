"""Fixtures the serving tests share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

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


@contextlib.contextmanager
def both_plugins(policy: Any = None) -> Iterator[list[Any]]:
    """The LiteLLM plug-in both ways, checked against a three-tier model list: classifying in
    process (the shipped model), and calling a real tierpick service (started here)."""
    from tierpick.classifier import RoutingPolicy
    from tierpick.serving.harness.litellm import litellm_config
    from tierpick.serving.litellm_plugin import Plugin, PluginConfig
    from tierpick.serving.service import create_server

    policy = policy or RoutingPolicy()
    server = create_server("127.0.0.1:0")
    try:
        ups = {t: f"127.0.0.1:{9000 + i}" for i, t in enumerate(TIERS)}
        model_list = litellm_config(ups, {})["model_list"]
        plugins = [
            Plugin(PluginConfig(model="default", policy=policy)),
            Plugin(
                PluginConfig(service=f"127.0.0.1:{server.port}", timeout_ms=5000, policy=policy)
            ),
        ]
        for plugin in plugins:
            plugin.check(model_list)
        yield plugins
    finally:
        server.shutdown(0)


def routed_tier(plugin: Any, messages: list[dict[str, str]], metadata: Any = None) -> str:
    """The tier the plug-in's proxy hook routes a chat to."""
    from tierpick.serving.litellm_plugin import DECISION_KEY

    data = {"model": "tierpick/auto", "messages": messages, "metadata": metadata or {}}
    out = asyncio.run(plugin.async_pre_call_hook(None, None, data, "completion"))
    return str(out["metadata"][DECISION_KEY]["tier"])
