"""Shadow mode and the decision log at every door: the gRPC service (a real server), the Envoy
processor (real ext_proc messages), the LiteLLM plug-in's pre-call hook; the log reads as a
scored log (``tierpick report``) and as a prompt log (``tierpick label``'s sample)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tierpick import classifier
from tierpick.cli import main
from tierpick.serving.client import TierpickClient
from tierpick.serving.decisions import DecisionLog, DecisionLogConfig
from tierpick.serving.service import create_server

PROMPTS = [
    "What is 2+2?",
    "Write a lock-free MPMC queue in C++20 and prove it linearizable.",
    "Translate 'good morning' to French.",
]


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_service_logs_each_decision_and_report_reads_the_log(tmp_path: Path) -> None:
    log_path = tmp_path / "decisions.jsonl"
    app = create_server("127.0.0.1:0", decision_log=DecisionLogConfig(path=log_path))
    try:
        with TierpickClient(f"127.0.0.1:{app.port}") as c:
            answers = [c.classify(p, request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
            batch = c.classify_batch(PROMPTS[:2])
    finally:
        app.shutdown(0)  # the log is flushed and closed on stop
    rows = _rows(log_path)
    assert len(rows) == 5
    clf = classifier.load()
    for i, (row, ans) in enumerate(zip(rows, answers, strict=False)):
        assert row["request_id"] == f"r{i}" and row["door"] == "grpc" and row["mode"] == "route"
        assert row["tier"] == ans.tier and row["model_version"] == clf.version
        assert row["p_local"] == pytest.approx(ans.scores[0].success_probability, abs=1e-5)
        assert row["prompt_sha256"] == hashlib.sha256(PROMPTS[i].encode()).hexdigest()
        assert row["prompt_chars"] == len(PROMPTS[i]) and "prompt" not in row  # not allowed
        assert row["rule"] == "utility" and row["allowed_tiers"] == list(clf.tiers)
    assert [r["tier"] for r in rows[3:]] == [a.tier for a in batch.responses]
    # a decision log is a scored log: tierpick report reads it (prompt lengths, no texts)
    out = tmp_path / "report"
    assert main(["report", str(log_path), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == 5


def test_prompts_are_logged_only_when_allowed_and_cut_to_a_bound(tmp_path: Path) -> None:
    cfg = DecisionLogConfig(path=tmp_path / "d.jsonl", prompts=True, max_prompt_chars=10)
    log = DecisionLog(cfg)
    for text in ("short", "x" * 50):
        log.record(
            door="grpc",
            mode="route",
            prompt=text,
            tiers=("a", "b"),
            proba=[0.5, 0.6],
            tier="b",
            model_version="v",
        )
    assert log.flush() and log.written == 2
    log.close()
    short, long = _rows(cfg.path)
    assert (short["prompt"], short["prompt_cut"]) == ("short", False)
    assert (long["prompt"], long["prompt_cut"], long["prompt_chars"]) == ("x" * 10, True, 50)


def test_a_full_queue_drops_rows_and_counts_them_instead_of_blocking(tmp_path: Path) -> None:
    log = DecisionLog(DecisionLogConfig(path=tmp_path / "d.jsonl", queue_size=1))
    log._queue.put(None)  # the writer stops at its marker: nothing drains the queue now
    log._thread.join(5)
    for _ in range(5):
        log.record(
            door="grpc",
            mode="route",
            prompt="p",
            tiers=("a",),
            proba=[0.5],
            tier="a",
            model_version="v",
        )
    assert log.dropped >= 4
    log._fh.close()


def test_the_log_rotates_at_its_size(tmp_path: Path) -> None:
    cfg = DecisionLogConfig(path=tmp_path / "d.jsonl", max_mb=2000 / (1 << 20), backups=2)
    log = DecisionLog(cfg)
    for _ in range(60):
        log.record(
            door="grpc",
            mode="route",
            prompt="p" * 20,
            tiers=("a",),
            proba=[0.5],
            tier="a",
            model_version="v",
        )
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["d.jsonl", "d.jsonl.1", "d.jsonl.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())


def test_decision_log_config_errors_name_the_key() -> None:
    from tierpick.classifier.errors import ConfigError

    for raw, match in (
        ({"path": ""}, "decision_log.path"),
        ({"path": "x", "prompts": "yes"}, "decision_log.prompts"),
        ({"path": "x", "max_mb": 0}, "decision_log.max_mb"),
        ({"path": "x", "nope": 1}, "unknown key"),
    ):
        with pytest.raises(ConfigError, match=match):
            DecisionLogConfig.from_mapping(raw, "decision_log")


@pytest.fixture()
def envoy_proc(tmp_path: Path) -> Any:
    pytest.importorskip("envoy.service.ext_proc.v3", reason="the gateway extra is not installed")
    from tests.serving.test_gateway_processor import _processor
    from tierpick.serving.gateway.processor import TierpickProcessor

    proc = _processor(
        mode="shadow", decision_log={"path": str(tmp_path / "envoy.jsonl"), "prompts": True}
    )
    assert proc.cfg.decision_log is not None  # create_gateway opens it: so does this test
    return TierpickProcessor(
        proc.cfg, proc.holder, proc.metrics, DecisionLog(proc.cfg.decision_log)
    )


def test_the_envoy_processor_in_shadow_mode_logs_and_changes_nothing(
    envoy_proc: Any, tmp_path: Path
) -> None:
    from tests.serving.test_gateway_processor import _chat, _count, _send

    proc = envoy_proc
    # a virtual model: no tier decision goes out (the request takes the fallback route, as
    # without tierpick), the body is not rewritten; the decision is logged
    status, got, new = _send(proc, _chat(PROMPTS[1]), {"x-request-id": "req-1"})
    assert status == 200 and new is None and "x-tierpick-tier" not in got
    assert got["x-tierpick-status"] == "shadow"
    # an explicit model goes to its tier as it always does, and is logged too
    status, got, new = _send(proc, _chat(PROMPTS[0], "local-model"))
    assert (got["x-tierpick-status"], got["x-tierpick-tier"], new) == (
        "explicit-model",
        "local",
        None,
    )
    assert _count(proc, "tierpick_gateway_requests_total", outcome="shadow") == 1
    proc.decisions.close()
    first, second = _rows(tmp_path / "envoy.jsonl")
    clf = proc.holder.current
    assert first["door"] == "envoy" and first["mode"] == "shadow"
    assert first["request_id"] == "req-1" and first["prompt"] == PROMPTS[1]
    assert first["tier"] == clf.route([PROMPTS[1]])[0].tier
    assert second["requested_model"] == "local-model" and second["tier"] in clf.tiers


def test_the_litellm_plugin_in_shadow_mode_logs_and_sends_to_the_fallback(tmp_path: Path) -> None:
    pytest.importorskip("litellm", reason="the litellm extra is not installed")
    from tierpick.serving.litellm_plugin import Plugin, RoutedGroup, parse_plugin_config

    cfg = parse_plugin_config(
        {
            "model": "default",
            "mode": "shadow",
            "decision_log": {"path": str(tmp_path / "litellm.jsonl"), "prompts": True},
        }
    )
    plugin = Plugin(cfg)
    plugin.routed = {
        "smart": RoutedGroup(
            "smart", {t: [f"{t}-llm"] for t in ("local", "mid", "frontier")}, "mid"
        )
    }
    data = {"model": "smart", "messages": [{"role": "user", "content": PROMPTS[1]}]}
    out = asyncio.run(plugin.async_pre_call_hook(None, None, data, "completion"))
    decision = out["metadata"]["tierpick_decision"]
    assert out["model"] == "mid-llm"  # the group's fallback tier: where it goes without us
    assert decision["status"] == "shadow" and decision["shadow_tier"] in (
        "local",
        "mid",
        "frontier",
    )
    # a request for another group is untouched, and logged
    other = {"model": "gpt-x", "messages": [{"role": "user", "content": PROMPTS[0]}]}
    assert (
        asyncio.run(plugin.async_pre_call_hook(None, None, dict(other), "completion"))["model"]
        == "gpt-x"
    )
    plugin.decisions.close()
    rows = _rows(tmp_path / "litellm.jsonl")
    assert [(r["door"], r["mode"], r["requested_model"]) for r in rows] == [
        ("litellm", "shadow", "smart"),
        ("litellm", "shadow", "gpt-x"),
    ]
    assert rows[0]["tier"] == decision["shadow_tier"] and rows[0]["prompt"] == PROMPTS[1]


def test_the_litellm_plugin_says_why_this_tier() -> None:
    pytest.importorskip("litellm", reason="the litellm extra is not installed")
    from tierpick.serving.litellm_plugin import (
        Plugin,
        RoutedGroup,
        decision_headers,
        parse_plugin_config,
    )

    plugin = Plugin(parse_plugin_config({"model": "default"}))
    plugin.routed = {
        "smart": RoutedGroup(
            "smart", {t: [f"{t}-llm"] for t in ("local", "mid", "frontier")}, "mid"
        )
    }
    data = {"model": "smart", "messages": [{"role": "user", "content": PROMPTS[0]}]}
    out = asyncio.run(plugin.async_pre_call_hook(None, None, data, "completion"))
    headers = decision_headers(out["metadata"]["tierpick_decision"])
    assert headers["x-tierpick-basis"].startswith("utility; cost_weight=")
    assert len(headers["x-tierpick-utilities"].split(",")) == 3


def test_one_decision_record_renders_every_door_s_headers() -> None:
    """The gateway and the LiteLLM plug-in render one record; every header it can set is one
    the gateway strips from requests (a client cannot send x-tierpick-shadow-tier upstream as
    if tierpick had set it: it was missing from the list)."""
    from tierpick.serving.decisions import HEADER_PREFIX, DecisionRecord
    from tierpick.serving.gateway import parse_gateway_config
    from tierpick.serving.gateway.envoy import render_envoy_config

    full = DecisionRecord(
        "shadow",
        "mid",
        {"local": 0.2, "mid": 0.7},
        "v1",
        "x" * 2000,
        {"rule": "utility", "cost_weight": 0.1, "min_success": 0.0, "prompt_cut": False,
         "utilities": {"local": 0.2, "mid": 0.6}},
        shadow_tier="local",
    )  # fmt: skip
    headers = full.headers()
    assert {h.removeprefix(HEADER_PREFIX) for h in headers} == set(DecisionRecord.HEADERS)
    assert len(headers["x-tierpick-reason"]) < 600  # cut, saying how long it was
    assert DecisionRecord.of(full.as_dict()) == full
    assert DecisionRecord("fallback").as_dict() == {"status": "fallback", "tier": None}
    cfg = parse_gateway_config({"tiers": {"local": {"upstream": "127.0.0.1:1"}}})
    rendered = render_envoy_config(cfg)
    for name in DecisionRecord.HEADERS:
        assert f"- remove: {HEADER_PREFIX}{name}\n" in rendered, name
