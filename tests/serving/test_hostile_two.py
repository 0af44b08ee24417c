"""Hostile input round two at the gateway doors and in tune: grants that would widen to every
tier, client data echoed without bound, forged spend-log keys, ungranted fields, tune's flags
and logs."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the price map
from tierpick.classifier.errors import ConfigError, PolicyError
from tierpick.classifier.routing import RoutingPolicy, within_grant
from tierpick.cli import main

TIERS = ("local", "mid", "frontier")
HARD = "Write a lock-free MPMC queue in C++20 and prove it linearizable."


def test_a_grant_outside_the_base_policy_never_widens_to_every_tier() -> None:
    base = RoutingPolicy(allowed_tiers=("mid", "frontier"))
    with pytest.raises(PolicyError, match="no tier is both allowed"):
        within_grant(base, TIERS, ("local",), False, "x-tierpick-cost-weight")
    assert within_grant(base, TIERS, ("mid",), False, "w").allowed_tiers == ("mid",)


def test_the_gateway_refuses_a_grant_disjoint_from_its_policy() -> None:
    pytest.importorskip("envoy.service.ext_proc.v3")
    from tierpick.serving.gateway import parse_gateway_config

    raw = {
        "tiers": {t: {"upstream": f"127.0.0.1:{9000 + i}"} for i, t in enumerate(TIERS)},
        "policy": {"allowed_tiers": ["mid", "frontier"]},
        "request_policy": {"enabled": True, "tiers": ["local"]},
    }
    with pytest.raises(ConfigError, match=r"request_policy.tiers.*no tier in policy"):
        parse_gateway_config(raw)


def test_the_gateway_bounds_what_it_echoes_in_headers() -> None:
    pytest.importorskip("envoy.service.ext_proc.v3")
    from tests.serving.test_gateway_processor import _chat, _processor, _send

    proc = _processor()
    status, got, _ = _send(proc, _chat(HARD, "m" * 200_000))
    assert status == 200 and got["x-tierpick-status"] == "passthrough"
    assert all(len(v) <= 512 + 30 for v in got.values()), {k: len(v) for k, v in got.items()}


def _plugin(**settings: Any) -> Any:
    pytest.importorskip("litellm")
    from tierpick.serving.litellm_plugin import Plugin, RoutedGroup, parse_plugin_config

    plugin = Plugin(parse_plugin_config({"model": "default", **settings}))
    plugin.routed = {
        "smart": RoutedGroup("smart", {t: [f"{t}-llm"] for t in TIERS}, "mid"),
    }
    return plugin


def test_the_plugin_refuses_a_grant_disjoint_from_its_policy() -> None:
    pytest.importorskip("litellm")
    from tierpick.serving.litellm_plugin import parse_plugin_config

    with pytest.raises(ConfigError, match=r"request_policy.tiers.*no tier in policy"):
        parse_plugin_config(
            {
                "model": "default",
                "policy": {"allowed_tiers": ["mid", "frontier"]},
                "request_policy": {"enabled": True, "tiers": ["local"]},
            }
        )


def _hook(plugin: Any, data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = asyncio.run(plugin.async_pre_call_hook(None, None, data, "completion"))
    return out


def test_the_plugin_removes_forged_spend_log_keys() -> None:
    plugin = _plugin()
    forged = {"tierpick_tier": "local", "tierpick_status": "classified", "team": "a"}
    for model in ("smart", "frontier-llm"):  # a routed group and an explicit model alike
        data = {
            "model": model,
            "messages": [{"role": "user", "content": HARD}],
            "metadata": {"spend_logs_metadata": dict(forged)},
        }
        spend = _hook(plugin, data)["metadata"]["spend_logs_metadata"]
        assert spend["team"] == "a"
        if model == "smart":  # ours, written by the plug-in
            assert spend["tierpick_tier"] == data["metadata"]["tierpick_decision"]["tier"]
        else:
            assert not any(k.startswith("tierpick_") for k in spend), spend


def test_an_ungranted_policy_field_is_ignored_even_when_invalid() -> None:
    plugin = _plugin()  # request_policy off: the default
    data = {
        "model": "smart",
        "messages": [{"role": "user", "content": HARD}],
        "metadata": {"tierpick": {"cost_weight": "not a number", "allowed_tiers": ["x"] * 10}},
    }
    decision = _hook(plugin, data)["metadata"]["tierpick_decision"]
    assert decision["status"] == "classified" and "ignored" in decision["reason"]
    # granted, a huge list is refused in a short message
    granted = _plugin(request_policy={"enabled": True})
    big = {
        "model": "smart",
        "messages": [{"role": "user", "content": HARD}],
        "metadata": {"tierpick": {"allowed_tiers": ["frontier"] * 200_000}},
    }
    with pytest.raises(Exception) as err:
        _hook(granted, big)
    assert "at most 64 tier names" in str(err.value) and len(str(err.value)) < 1000


def _scored(tmp_path: Path, rows: list[str], suffix: str = ".jsonl") -> Path:
    path = tmp_path / f"scored-{len(list(tmp_path.iterdir()))}{suffix}"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_tune_refuses_bad_flags_and_bad_scores_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok = json.dumps({"prompt": "a", "tier": "mid", "p_local": 0.2, "p_mid": 0.5, "p_frontier": 0.6})
    good = _scored(tmp_path, [ok])
    cases = [
        (["--max-share", "frontier=0.2", "--max-share", "frontier=0.3"], good, "twice"),
        (["--max-share", "frontier=nan"], good, "the share must be in [0, 1]"),
        (["--max-share", "frontier=0.2", "--chars-per-token", "nan"], good, "chars-per-token"),
        (
            ["--max-share", "frontier=0.2"],
            _scored(tmp_path, [ok.replace("0.2", '"0.2"')]),
            "must be a number in [0, 1], got 0.2",
        ),
        (
            ["--max-share", "frontier=0.2"],
            _scored(tmp_path, [ok.replace("0.2", "NaN")]),
            "must be a number in [0, 1], got nan",
        ),
        (
            ["--max-share", "frontier=0.2"],
            _scored(tmp_path, ["prompt,tier,p_local,p_mid,p_frontier", "a,mid,x,0.5,0.6"], ".csv"),
            "in [0, 1], got x",
        ),
    ]
    for flags, path, message in cases:
        assert main(["tune", str(path), "--scored", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["tune", str(empty), "--max-share", "frontier=0.2"]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: nothing to tune on" in err and "tierpick-tune-" not in err


def test_tune_reports_the_held_out_share_with_its_interval(
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl"
    assert main(["tune", str(log), "--max-share", "frontier=0.2", "--holdout", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "Held-out share of frontier:" in out and "95% interval" in out
