"""Sticky routing: a conversation never goes below the dearest tier it went to, within what each
request allows; keys from clients are bounded; the state is bounded in keys and in time."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.serving.conftest import both_plugins, routed_tier
from tierpick.classifier.errors import PolicyError
from tierpick.serving.conversations import MAX_ID_CHARS, Conversations, conversation_key

ALL = np.array([True, True, True])


def test_a_conversation_is_held_at_its_dearest_tier_within_what_is_allowed() -> None:
    c = Conversations()
    assert c.hold("a", 2, ALL) == (2, False)  # frontier first
    assert c.hold("a", 0, ALL) == (2, True)  # a follow-up that reads as easy stays there
    assert c.hold("b", 0, ALL) == (0, False)  # another conversation is its own
    # a request whose policy (its grant) stops at mid is raised only as far as mid
    assert c.hold("a", 0, np.array([True, True, False])) == (1, True)
    assert c.hold("a", 0, np.array([True, False, False])) == (0, False)
    assert c.hold("a", 0, ALL) == (2, True)  # the conversation still holds frontier
    assert c.hold(None, 0, ALL) == (0, False)  # no conversation, nothing held


def test_the_state_is_bounded_in_keys_and_in_time() -> None:
    c = Conversations(max_keys=2, ttl=3600)
    c.hold("a", 2, ALL)
    c.hold("b", 2, ALL)
    c.hold("c", 2, ALL)  # "a" is the least recent: forgotten
    assert len(c) == 2 and c.hold("a", 0, ALL) == (0, False)
    expiring = Conversations(ttl=0.0)
    expiring.hold("a", 2, ALL)
    assert expiring.hold("a", 0, ALL) == (0, False)


def test_a_conversation_is_named_by_its_id_or_its_opening() -> None:
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Design a Raft store"},
        {"role": "assistant", "content": "..."},
        {"role": "user", "content": "ok continue"},
    ]
    later = [*chat, {"role": "assistant", "content": "more"}, {"role": "user", "content": "go"}]
    assert (
        conversation_key("", chat) == conversation_key("", later) == conversation_key("", chat[:2])
    )
    assert conversation_key("", chat) != conversation_key("", [{"role": "user", "content": "hi"}])
    assert conversation_key("c-1", chat) == "id:c-1"
    assert conversation_key("", None) is None  # a bare prompt has no conversation
    with pytest.raises(PolicyError, match="printable"):
        conversation_key("x" * (MAX_ID_CHARS + 1), None)
    with pytest.raises(PolicyError):
        conversation_key("a\nb", None)


HARD = (
    "Write a lock-free multi-producer multi-consumer queue in C++20 with hazard pointers for "
    "memory reclamation, and prove it linearizable."
)


def test_sticky_through_grpc_holds_a_conversation_at_its_tier() -> None:
    from tierpick.serving.client import TierpickClient, policy
    from tierpick.serving.service import create_server

    server = create_server("127.0.0.1:0")
    try:
        with TierpickClient(f"127.0.0.1:{server.port}", timeout=10) as client:
            sticky = policy(sticky=True)
            assert client.classify("hi", routing=sticky, conversation_id="c1").tier == "mid"
            first = client.classify(HARD, routing=sticky, conversation_id="c2")
            then = client.classify("hi", routing=sticky, conversation_id="c2")
            assert (first.tier, then.tier) == ("frontier", "frontier")
            assert then.basis.held_by_conversation and not first.basis.held_by_conversation
            # not sticky: the same conversation's "hi" goes where "hi" goes
            assert client.classify("hi", conversation_id="c2").tier == "mid"
            # held only within what the request allows
            capped = policy(sticky=True, allowed_tiers=["local", "mid"])
            assert client.classify("hi", routing=capped, conversation_id="c2").tier == "mid"
            # an id from a client is bounded
            import grpc

            with pytest.raises(grpc.RpcError) as err:
                client.classify("hi", routing=sticky, conversation_id="x" * 300)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "conversation id" in (err.value.details() or "")
    finally:
        server.shutdown(0)


def test_sticky_through_the_gateway_and_the_litellm_plug_in() -> None:

    pytest.importorskip("envoy.service.ext_proc.v3", reason="the gateway extra is not installed")
    from tests.serving.test_gateway_processor import _send
    from tierpick.serving.gateway import parse_gateway_config
    from tierpick.serving.gateway.processor import GatewayMetrics, TierpickProcessor
    from tierpick.serving.lifecycle import ModelHolder

    tiers = ("local", "mid", "frontier")
    cfg = parse_gateway_config(
        {
            "tiers": {t: {"upstream": f"127.0.0.1:{9000 + i}"} for i, t in enumerate(tiers)},
            "policy": {"sticky": True},
        }
    )
    metrics = GatewayMetrics()
    proc = TierpickProcessor(cfg, ModelHolder(None, metrics), metrics)

    def ask(prompt: str, conversation: str) -> dict[str, str]:
        body = {"model": "tierpick/auto", "messages": [{"role": "user", "content": prompt}]}
        status, headers, _ = _send(proc, body, {"x-tierpick-conversation": conversation})
        assert status == 200, headers
        return headers

    assert ask("hi", "g1")["x-tierpick-tier"] == "mid"
    assert ask(HARD, "g2")["x-tierpick-tier"] == "frontier"
    held = ask("hi", "g2")
    assert held["x-tierpick-tier"] == "frontier"
    assert "held_by_conversation=yes" in held["x-tierpick-basis"]
    status, _, body = _send(
        proc,
        {"model": "tierpick/auto", "messages": [{"role": "user", "content": "hi"}]},
        {"x-tierpick-conversation": "y" * 300},
    )
    assert status == 400 and b"conversation id" in (body or b"")

    from tierpick.classifier import RoutingPolicy

    def tier(plugin: Any, prompt: str, conversation: str) -> str:
        chat = [{"role": "user", "content": prompt}]
        return routed_tier(plugin, chat, {"tierpick": {"conversation_id": conversation}})

    with both_plugins(RoutingPolicy(sticky=True)) as plugins:
        for plugin in plugins:
            long_id = "l" * 256  # the longest id a client may send, through the service too
            assert tier(plugin, "hi", "l1") == "mid"
            assert tier(plugin, HARD, long_id) == "frontier"
            assert tier(plugin, "hi", long_id) == "frontier", plugin.config.service
