"""Drift: the service and the report say how far prompts are from the training data (the
shipped model's reference); a reference that does not fit its model is refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA, REPO
from tierpick import classifier
from tierpick.classifier.artifact import REFERENCE_FILE, read_manifest, sha256_file, write_manifest
from tierpick.classifier.errors import ArtifactError
from tierpick.classifier.runtime import default_model_dir
from tierpick.cli import main
from tierpick.serving.client import TierpickClient
from tierpick.serving.lifecycle import ServerConfig
from tierpick.serving.service import create_server

FIRST_IMPRESSION = REPO / "training" / "first_impression" / "prompts.jsonl"


def _trained_on(n: int) -> list[str]:
    with (DATA / "llmrouter" / "gsm8k.csv").open(newline="") as fh:
        return [row["prompt"] for row in csv.DictReader(fh)][:n]


def test_the_service_reports_each_prompts_familiarity_and_exports_its_distribution() -> None:
    app = create_server("127.0.0.1:0")
    try:
        with TierpickClient(f"127.0.0.1:{app.port}", timeout=10) as client:
            greeting = client.classify("hi")
            math = client.classify(_trained_on(1)[0])
        assert greeting.HasField("familiarity") and math.HasField("familiarity")
        assert greeting.familiarity < 0.05 < math.familiarity
        registry = app.metrics.registry
        assert registry.get_sample_value("tierpick_prompt_familiarity_count") == 2
        assert registry.get_sample_value("tierpick_prompt_familiarity_bucket", {"le": "0.05"}) == 1
        assert registry.get_sample_value("tierpick_success_probability_count", {"tier": "mid"}) == 2
    finally:
        app.shutdown(0)
    quiet = create_server("127.0.0.1:0", config=ServerConfig(familiarity=False))
    try:
        with TierpickClient(f"127.0.0.1:{quiet.port}", timeout=10) as client:
            assert not client.classify("hi").HasField("familiarity")
    finally:
        quiet.shutdown(0)


def test_the_report_shows_drift_for_a_log_unlike_the_training_data(tmp_path: Path) -> None:
    """A log of prompts like those trained on against the first-impression set (greetings,
    one-step arithmetic, research problems: nothing like the benchmarks trained on)."""
    shares = {}
    logs = {
        "trained-on": _trained_on(300),
        "first-impression": [
            json.loads(line)["prompt"] for line in FIRST_IMPRESSION.read_text().splitlines()
        ],
    }
    for name, prompts in logs.items():
        log = tmp_path / f"{name}.jsonl"
        log.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        scored = tmp_path / f"{name}-scored.jsonl"
        assert main(["score", str(log), str(scored), "--workers", "1"]) == 0
        out = tmp_path / f"{name}-report"
        assert main(["report", str(scored), "--out", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["drift"]["sampled_prompts"] == len(prompts)
        shares[name] = report["drift"]["unfamiliar_share"]
        assert "## Drift" in (out / "report.md").read_text()
    assert shares["trained-on"] < 0.2 < 0.6 < shares["first-impression"], shares


def test_a_reference_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    ok = classifier.load(str(model))
    assert ok.reference is not None
    bad = model / REFERENCE_FILE
    np.savez(bad, centroids_raw=np.zeros((4, 3)), centroids_std=np.zeros((4, 3)))
    manifest = read_manifest(model, verify=False)
    write_manifest(
        model,
        manifest.__class__(
            **{**manifest.__dict__, "files": {**manifest.files, REFERENCE_FILE: sha256_file(bad)}}
        ),
    )
    with pytest.raises(ArtifactError, match="reference"):
        classifier.load(str(model))


def test_classify_explain_shows_familiarity_and_the_nearest_training_prompts(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["classify", "--explain", "--json", "hi", _trained_on(1)[0]]) == 0
    greeting, math = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert greeting["familiarity"] < 0.05 < math["familiarity"]
    for d in (greeting, math):
        near = d["nearest_training_prompts"]
        assert len(near) == 3 and near[0]["similarity"] >= near[-1]["similarity"]
        assert all(set(n["observed_success"]) == {"local", "mid", "frontier"} for n in near)
    # a prompt the model was trained on finds itself, or one very like it
    assert math["nearest_training_prompts"][0]["similarity"] > 0.9
    assert main(["classify", "hi"]) == 0
    assert "near (" not in capsys.readouterr().out  # only with --explain
