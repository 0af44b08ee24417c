from pathlib import Path

import pytest
import yaml

from tests.conftest import DEFAULT_CONFIG
from tierpick.classifier.errors import ConfigError
from tierpick.training.config import load_config, parse_config


def _base() -> dict:  # type: ignore[type-arg]
    return {
        "name": "t",
        "tiers": [
            {"name": "cheap", "price_input": 0, "price_output": 0, "models": ["a"]},
            {"name": "dear", "price_input": 1, "price_output": 2, "models": ["b"]},
        ],
        "sources": ["x.jsonl"],
    }


def test_default_config_loads(data_dir: Path) -> None:
    cfg = load_config(DEFAULT_CONFIG, data_root=str(data_dir))
    assert cfg.tier_names == ("local", "mid", "frontier")
    assert cfg.data_root == data_dir
    assert cfg.tier_of_model()["gemini-1.5-pro-002"] == "frontier"
    assert cfg.decontamination.paths[0].path == "routellm/mmlu_abstract_algebra.csv"


def test_default_config_resolves_data_root_relative_to_file(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIERPICK_DATA_ROOT", raising=False)
    cfg = load_config(DEFAULT_CONFIG)
    assert (cfg.data_root / "mmlu-pro").is_dir()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["tiers"].pop(), "tiers: needs at least 2, got 1"),
        (
            lambda c: c["tiers"][0].update(name="Bad Name"),
            "tiers[0].name: String should match pattern",
        ),
        (lambda c: c["tiers"][1].update(name="cheap"), "duplicate tier name 'cheap'"),
        (
            lambda c: c["tiers"][0].update(price_input=-1),
            "tiers[0].price_input: Input should be greater than or equal to 0",
        ),
        (lambda c: c["tiers"][0].update(models=[]), "tiers[0].models: needs at least 1, got 0"),
        (lambda c: c["tiers"][1].update(models=["a"]), "model 'a' is already in tier 'cheap'"),
        (
            lambda c: (
                c["tiers"][1].update(price_input=0, price_output=0)
                or c["tiers"][0].update(price_input=3)
            ),
            "ordered cheapest first",
        ),
        (lambda c: c.update(sources=[]), "sources: needs at least 1, got 0"),
        (
            lambda c: c.update(sources=[{"path": "x", "format": "xml"}]),
            "sources[0].format: Input should be",
        ),
        (lambda c: c.update(colour="red"), "unknown key(s) ['colour']"),
        (lambda c: c.update(path="elsewhere.yaml"), "path: unknown key"),
        (lambda c: c.update(split={"val_fraction": 0.6, "test_fraction": 0.5}), "must be < 1"),
        (
            lambda c: c.update(split={"holdout": {"column": "model", "values": ["x"]}}),
            "split.holdout.column: Input should be 'task', 'source' or 'family'",
        ),
        (
            lambda c: c.update(decontaminate={"paths": ["e.csv"], "method": "fuzzy"}),
            "decontaminate.method: Input should be 'exact' or 'ngram'",
        ),
        (
            lambda c: c.update(train={"student": {"token_dropout": 1.0}}),
            "train.student.token_dropout: Input should be less than 1",
        ),
        (
            lambda c: c.update(train={"student": {"sif": -1e-3}}),
            "train.student.sif: Input should be greater than or equal to 0",
        ),
        (
            lambda c: c.update(sources=[{"path": "x", "success": {"scale": [10, 1]}}]),
            "sources[0].success.scale: must be [low, high] with low < high",
        ),
        (
            lambda c: c.update(
                sources=[{"path": "x", "success": {"scale": [1, 10], "threshold": 11}}]
            ),
            "sources[0].success: threshold must be a number in (1, 10]",
        ),
        (
            lambda c: c.update(sources=[{"path": "x", "success": {"pass": 8}}]),
            "sources[0].success: unknown key(s) ['pass']",
        ),
        (
            lambda c: c.update(sources=[{"path": "x", "optional": "yes"}]),
            "sources[0].optional: Input should be true or false",
        ),
    ],
)
def test_bad_config_names_the_key(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    cfg = _base()
    mutate(cfg)
    with pytest.raises(ConfigError) as info:
        parse_config(cfg, base_dir=Path("."), where="t.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("t.yaml:")


def test_default_config_declares_family_and_success_per_source(data_dir: Path) -> None:
    cfg = load_config(DEFAULT_CONFIG, data_root=str(data_dir))
    families = {s.family for s in cfg.sources}
    assert {"mmlu-pro", "chat", "math", "code", "easy-qa"} <= families
    arena = next(s for s in cfg.sources if s.path == "arena-bench-v1")
    assert arena.success(8) == 1.0 and arena.success(7) == 0.0 and arena.success(0) is None
    assert "score >= 8" in arena.success.describe()


def test_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text(yaml.safe_dump("just a string"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(scalar)
