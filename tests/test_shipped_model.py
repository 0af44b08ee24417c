"""The shipped default model, re-evaluated on the default data (about 20 s)."""

import json
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_CONFIG, REPO
from tierpick import classifier
from tierpick.cli import main


def test_shipped_model_reproduces_its_recorded_evaluation(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clf = classifier.load(REPO / "models" / "default")
    assert clf.tiers == ("local", "mid", "frontier")
    code = main(
        [
            "evaluate",
            "--model",
            str(REPO / "models" / "default"),
            "--config",
            str(DEFAULT_CONFIG),
            "--data-root",
            str(data_dir),
            "--out",
            str(tmp_path),
            "--no-mlflow",
        ]
    )
    assert code == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["data_fingerprint"] == clf.manifest.data_fingerprint
    recorded = clf.manifest.evaluation
    for split in ("test", "ood"):
        routing = report["splits"][split]["routing"]["student"]
        assert routing["apgr"] == pytest.approx(recorded[f"{split}_student_apgr"], abs=1e-3)
        per = report["splits"][split]["per_tier"]["student"]
        for tier in clf.tiers:
            assert per[tier]["auc"] == pytest.approx(
                recorded[f"{split}_student_auc_{tier}"], abs=1e-3
            )
        # the shipped model routes better than any fixed tier mix, on both splits
        assert routing["apgr"] > report["splits"][split]["routing"]["best_fixed_mix"]["apgr"]
