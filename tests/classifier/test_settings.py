"""Declarative settings: every problem of a settings file is reported at once, each with its key
path, for every kind of settings file (gateway, LiteLLM plug-in, policy file, training config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierpick.classifier.errors import ConfigError
from tierpick.classifier.routing import POLICY_KEYS, RoutingPolicy
from tierpick.classifier.settings import PolicySettings, parse_settings, read_policy
from tierpick.training.config import parse_config

TIERS = {"local": {"upstream": "127.0.0.1:1"}, "mid": {"upstream": "127.0.0.1:2"}}


def _problems(err: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return str(err.value).splitlines()[1:]


def test_a_gateway_config_reports_every_problem_in_one_pass() -> None:
    from tierpick.serving.gateway import parse_gateway_config

    raw = {
        "tiers": {**TIERS, "frontir": {"upstrem": "127.0.0.1:3"}},
        "processor": {"port": 70000},
        "failure": {"mode": "sometimes"},
        "envoy": {"listen": 1},
        "policy": {"min_success": 2, "speed": 1},
        "colour": "red",
    }
    with pytest.raises(ConfigError) as err:
        parse_gateway_config(raw)
    text = str(err.value)
    assert text.startswith("8 problems in gateway config:")
    for key in (
        "tiers.frontir: must hold a mapping with a 'upstream' key",
        "tiers.frontir: unknown key(s) ['upstrem']; allowed: ['model', 'tls', 'upstream']",
        "processor.port:",
        "failure.mode: Input should be 'open' or 'closed', got sometimes",
        "envoy: unknown key(s) ['listen']",
        "policy.min_success: must be a number in [0.0, 1.0], got 2",
        "policy: unknown key(s) ['speed']; allowed: ['allowed_tiers', 'cost_weight',",
        "gateway config: unknown key(s) ['colour']",
    ):
        assert sum(key in line for line in _problems(err)) == 1, (key, text)
    # checks across keys come together once every key is valid
    with pytest.raises(ConfigError) as err:
        parse_gateway_config(
            {
                "tiers": TIERS,
                "failure": {"fallback_tier": "premium"},
                "policy": {"allowed_tiers": ["gold"]},
                "hold": {"target": "silver=0.2"},
            }
        )
    assert [line.split(": ")[1] for line in _problems(err)] == [
        "failure.fallback_tier",
        "policy.allowed_tiers",
        "hold.target",
    ]


def test_the_plugin_settings_and_a_policy_file_report_every_problem(tmp_path: Path) -> None:
    pytest.importorskip("litellm")
    from tierpick.serving.litellm_plugin import parse_plugin_config

    with pytest.raises(ConfigError) as err:
        parse_plugin_config({"timeout_ms": 0, "failure": {"mode": "x"}, "servce": "a:1"})
    assert [line.split(":")[0].strip() for line in _problems(err)] == [
        "tierpick.timeout_ms",
        "tierpick.failure.mode",
        "tierpick",
    ]
    bad = tmp_path / "p.yaml"
    bad.write_text("policy: {cost_weight: -1, sticky: maybe}\nnotes: 1\n")
    with pytest.raises(ConfigError) as err:
        read_policy(bad)
    assert len(_problems(err)) == 3, str(err.value)


def test_the_policy_settings_come_from_the_registry() -> None:
    assert sorted(PolicySettings.model_fields) == sorted(POLICY_KEYS)
    got = parse_settings(PolicySettings, {"cost_weight": 0.2, "sticky": True}, "p").policy()
    assert got == RoutingPolicy(cost_weight=0.2, sticky=True)
    assert parse_settings(PolicySettings, None, "p").policy() == RoutingPolicy()


def test_a_training_config_reports_every_problem_in_one_pass() -> None:
    raw = {
        "tiers": [
            {"name": "Cheap", "price_input": -1, "price_output": 0, "models": ["a"]},
            {"name": "dear", "price_input": 1, "price_output": 2, "models": []},
        ],
        "sources": [{"path": "x", "format": "xml"}, {"path": "y", "optional": "yes"}],
        "split": {"val_fraction": 1.5},
        "train": {"head": {"kind": "deep"}, "student": {"sif": -1}},
        "decontaminate": {"paths": ["e.csv"], "method": "fuzzy"},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=Path("."), where="t.yaml")
    keys = [line.split(": ")[1] for line in _problems(err)]
    assert keys == [
        "tiers[0].name",
        "tiers[0].price_input",
        "tiers[1].models",
        "sources[0].format",
        "sources[1].optional",
        "decontaminate.method",
        "split.val_fraction",
        "train.student.sif",
        "train.head.kind",
    ], str(err.value)
    # the defaults are the dataclasses' own: an empty train mapping is the default one
    ok = {"tiers": [raw["tiers"][1] | {"models": ["b"]}], "sources": ["x"]}  # type: ignore[operator]
    ok["tiers"].insert(0, {"name": "cheap", "price_input": 0, "price_output": 0, "models": ["a"]})
    cfg = parse_config({**ok, "train": {}}, base_dir=Path("."), where="t.yaml")
    assert cfg.train == type(cfg.train)() and cfg.name == "tierpick"


def test_the_serve_flags_are_built_from_the_server_settings() -> None:
    import argparse

    from tierpick.classifier.settings import add_flags, from_flags
    from tierpick.serving.lifecycle import ServerConfig

    parser = argparse.ArgumentParser()
    add_flags(parser, ServerConfig)
    given = parser.parse_args(["--max-batch", "8", "--max-request-mb", "2", "--no-familiarity"])
    got = from_flags(ServerConfig, given, "serve:")
    assert got == ServerConfig(max_batch=8, max_request_bytes=2 << 20, familiarity=False)
    assert from_flags(ServerConfig, parser.parse_args([]), "serve:") == ServerConfig()
    assert "(default: 256)" in parser.format_help()  # the default shown is the field's
    bad = parser.parse_args(["--max-batch", "0", "--watch", "-1", "--workers", "2"])
    with pytest.raises(ConfigError) as err:
        from_flags(ServerConfig, bad, "serve:")
    assert [line.split(": ")[1] for line in _problems(err)] == ["--max-batch", "--watch"]


def test_the_graph_contract_is_checked_in_one_place() -> None:
    from tierpick.classifier.artifact import check_graph
    from tierpick.classifier.errors import ArtifactError

    tiers = ("local", "mid", "frontier")
    inputs = ["input_ids", "attention_mask"]
    good = [("logits", ["batch", 3]), ("embedding", ["batch", 512])]
    assert check_graph(inputs, good, tiers, "g") == 512
    assert check_graph(inputs, good[:1], tiers, "g") is None  # an older graph, no embedding
    for args, match in [
        ((inputs[::-1], good), "inputs"),
        ((inputs, good[::-1]), "first output 'embedding'"),
        ((inputs, [("logits", ["batch", 2])]), "2 logits per prompt, but the manifest has 3"),
        ((inputs, [("logits", ["batch"])]), "rank 1"),
        ((inputs, [good[0], ("embedding", ["batch", 4, 512])]), "embedding of rank 3"),
    ]:
        with pytest.raises(ArtifactError, match=match):
            check_graph(*args, tiers, "g")  # type: ignore[arg-type]
