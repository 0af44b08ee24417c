"""Hostile artifacts and files, round two: every bad manifest field, non-finite prices or cost
weights, a graph whose width is not the manifest's, YAML bombs and a models:/ URI with no store
are one line each (exit 2 from the CLI), never a traceback and never served."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tierpick import classifier
from tierpick.classifier.artifact import MANIFEST_FILE, read_manifest
from tierpick.classifier.errors import ArtifactError, ConfigError
from tierpick.classifier.settings import read_policy
from tierpick.cli import main


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("shipped") / "model"
    shutil.copytree(classifier.load().model_dir, dst)
    return dst


def _mutated(src: Path, dst: Path, change: Any) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / MANIFEST_FILE).read_text())
    change(raw)
    (dst / MANIFEST_FILE).write_text(json.dumps(raw))  # Infinity and NaN as Python writes them
    return dst


def _set(key: str, value: Any) -> Any:
    return lambda raw: raw.__setitem__(key, value)


def _price(value: float) -> Any:
    return lambda raw: raw["tiers"][2].__setitem__("price_output", value)


CASES = [
    (_set("default_cost_weight", "0.1"), "default_cost_weight must be a finite number"),
    (_set("default_cost_weight", float("inf")), "default_cost_weight must be a finite number"),
    (_set("default_cost_weight", -0.5), "default_cost_weight must be a finite number"),
    (_set("calibration", [1, 2, 3]), "calibration must be a mapping"),
    (
        _set("calibration", {"method": "platt", "a": ["1", "1", "1"], "b": [0, 0, 0]}),
        "calibration.a must be 3 finite numbers",
    ),
    (_set("max_tokens", 2**70), "max_tokens must be an integer in"),
    (_set("max_chars", "1536"), "max_chars must be an integer in"),
    (_price(float("inf")), "price_output must be a finite number"),
    (_price(float("nan")), "price_output must be a finite number"),
    (_price(-1.0), "price_output must be a finite number"),
    (_set("tiers", [{"name": "a"}]), "missing or has unexpected fields"),
]


@pytest.mark.parametrize(("change", "message"), CASES)
def test_a_bad_manifest_field_is_refused_in_one_line(
    shipped: Path, tmp_path: Path, change: Any, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _mutated(shipped, tmp_path / "bad", change)
    with pytest.raises(ArtifactError, match=message):
        read_manifest(bad)
    assert main(["classify", "hi", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err) < 700


def test_a_graph_whose_width_is_not_the_manifests_is_refused(shipped: Path, tmp_path: Path) -> None:
    def four_tiers(raw: dict[str, Any]) -> None:
        raw["tiers"].append({"name": "ultra", "price_input": 50.0, "price_output": 150.0})
        raw["calibration"]["a"].append(1.0)
        raw["calibration"]["b"].append(0.0)

    bad = _mutated(shipped, tmp_path / "four", four_tiers)
    with pytest.raises(ArtifactError, match="3 logits per prompt, but the manifest has 4 tiers"):
        classifier.load(bad)


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
policy: {allowed_tiers: [*f,*f,*f,*f,*f,*f,*f,*f,*f]}
"""


def test_yaml_bombs_and_deep_nesting_are_refused_unexpanded(tmp_path: Path) -> None:
    """A 436-byte alias bomb gave a 312 MB error message and 965 MB of memory; 100,000 levels
    of nesting a traceback."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    with pytest.raises(ConfigError, match="aliases") as err:
        read_policy(bomb)
    assert len(str(err.value)) < 300
    deep = tmp_path / "deep.yaml"
    deep.write_text("policy: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nested"):
        read_policy(deep)
    big = tmp_path / "big.yaml"
    big.write_text("policy: {}\n" + "# pad\n" * 1_000_000)
    with pytest.raises(ConfigError, match="over the"):
        read_policy(big)
    # the commands that read them say so in one line
    proc = subprocess.run(
        [sys.executable, "-m", "tierpick.cli", "serve", "--port", "0", "--policy", str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "aliases" in proc.stderr and "Traceback" not in proc.stderr
    pytest.importorskip("envoy.service.ext_proc.v3")
    gw = tmp_path / "gw.yaml"
    gw.write_text(BOMB.replace("policy: {allowed_tiers:", "tiers: {x:"))
    assert main(["gateway", "envoy-config", "--config", str(gw)]) == 2


def test_a_registry_uri_without_a_store_creates_nothing_and_fails_fast(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tierpick.cli",
            "classify",
            "hi",
            "--model",
            "models:/nope@champion",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no MLflow store at mlflow.db" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
