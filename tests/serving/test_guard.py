"""The live budget guard on a real server under a shifting prompt mix: real arena-hard prompts,
then real Natural Questions prompts, each sending about 60% to frontier unguarded; held to 20%."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests.conftest import DATA
from tierpick.classifier.errors import ConfigError
from tierpick.serving.client import TierpickClient, policy
from tierpick.serving.guard import ShareTarget
from tierpick.serving.lifecycle import ServerConfig
from tierpick.serving.service import create_server

WINDOW = 500


def _prompts() -> tuple[list[str], list[str]]:
    def first(line: str) -> str:
        row = json.loads(line)
        return str(row["turns"][0]["content"] if row.get("turns") else row["prompt"])

    with (DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl").open() as fh:
        arena = [first(line) for line in fh if line.strip()]
    with (DATA / "llmrouter" / "natural_qa.csv").open(newline="") as fh:
        questions = [row["prompt"] for row in csv.DictReader(fh)]
    return arena, questions


def test_the_guard_holds_the_frontier_share_through_a_shift_in_the_mix() -> None:
    arena, questions = _prompts()
    target = ShareTarget.parse("frontier=0.2", WINDOW)
    app = create_server("127.0.0.1:0", config=ServerConfig(watch_seconds=0), hold_share=target)
    try:
        with TierpickClient(f"127.0.0.1:{app.port}", timeout=10) as client:
            unguarded = [
                client.classify(p, routing=policy(cost_weight=0.135)).tier == "frontier"
                for p in arena[:200]
            ]
            assert np.mean(unguarded) > 0.5  # the guard has work to do
            weights, shares = [], []
            for phase in (arena, questions):
                tiers = [client.classify(phase[i % len(phase)]).tier for i in range(2 * WINDOW)]
                after = np.mean([t == "frontier" for t in tiers[WINDOW:]])
                shares.append(float(after))
                weights.append(app.metrics.registry.get_sample_value("tierpick_guard_cost_weight"))
            # a request that sets its own cost weight is routed as it asks, and not counted
            assert client.classify(arena[0], routing=policy(cost_weight=0.0)).tier == "frontier"
    finally:
        app.shutdown(0)
    print(f"frontier share after the window: {shares}; cost weights {weights}")
    assert all(abs(s - target.share) <= 0.03 for s in shares), shares
    assert weights[0] != weights[1]  # the knob moved with the mix
    registry = app.metrics.registry
    assert registry.get_sample_value("tierpick_guard_target_share") == 0.2


def test_a_target_that_cannot_be_held_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="TIER=SHARE"):
        ShareTarget.parse("frontier=1.5")
    with pytest.raises(ConfigError, match="all the traffic"):
        create_server("127.0.0.1:0", hold_share=ShareTarget.parse("local=0.5"))
    with pytest.raises(ConfigError, match="no tier"):
        create_server("127.0.0.1:0", hold_share=ShareTarget.parse("gold=0.2"))
    with pytest.raises(ConfigError, match="min_success"):
        from tierpick.classifier import RoutingPolicy

        create_server(
            "127.0.0.1:0",
            policy=RoutingPolicy(min_success=0.7),
            hold_share=ShareTarget.parse("frontier=0.2"),
        )
