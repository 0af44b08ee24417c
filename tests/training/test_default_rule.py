"""The default-rule study on real leave-one-family-out folds (the tiny training run's) and the
first-impression set, routed by a real model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tierpick.training import default_rule


def test_the_first_impression_set_follows_its_rubric() -> None:
    rows = [json.loads(line) for line in default_rule.FIRST_IMPRESSION.read_text().splitlines()]
    assert [r["expect"] for r in rows].count("local") == 50
    assert [r["expect"] for r in rows].count("frontier") == 50
    assert len({r["prompt"] for r in rows}) == 100  # no prompt twice
    rubric = (default_rule.FIRST_IMPRESSION.parent / "RUBRIC.md").read_text()
    assert {r["kind"] for r in rows} and "## easy" in rubric and "## hard" in rubric


def test_the_study_measures_every_rule_as_the_evaluation_does(tiny_trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    loso = tiny_trained.report_dir.parent / "loso-models"
    report = tmp_path / "REPORT.md"
    report.write_text(
        "# Evaluation\n\n## Leave one family out: x\n\ntable\n\n## In distribution\n\nmore\n"
    )
    argv = [str(loso), "--model", str(tiny_trained.model_dir), "--out", str(tmp_path / "dr")]
    assert default_rule.main([*argv, "--report", str(report)]) == 0
    res = json.loads((tmp_path / "dr" / "default_rule.json").read_text())
    assert set(res["rules"]) == {"utility", "threshold", "margin", "centered", "local floor"}
    # the local floor is the utility rule plus the cheapest tier from p >= 1 - 4 x cost_weight
    p = np.array([[0.5, 0.9, 0.95], [0.5, 0.9, 0.95], [0.2, 0.5, 0.99]])
    c = np.array([0.0, 0.1, 1.0])
    floor = next(r for r in default_rule.RULES if r.name == "local floor")
    assert floor.choose(p, c, 0.125, c).tolist() == [0, 0, 2]  # floor 0.5; 0.2 is below it
    assert floor.choose(p, c, 0.05, c).tolist() == [2, 2, 2]  # floor 0.8: utility decides
    # the utility and threshold rows are the evaluation's own student columns, fold by fold
    for family, figures in tiny_trained.report["loso"]["families"].items():
        for rule, column in (("utility", "student"), ("threshold", "student_threshold_rule")):
            got = res["rules"][rule]["loso"][family]
            assert got == pytest.approx(figures["routing"][column]["apgr"], abs=1e-9), rule
    for rule in res["rules"].values():
        fi = rule["first_impression"]
        assert 0 <= fi["easy"] <= 1 and 0 <= fi["hard"] <= 1
    # the choice is read from the table: the rule with the best mean leads
    best = max(res["rules"], key=lambda r: res["rules"][r]["loso_mean"])
    assert f"**{best}** leads" in (tmp_path / "dr" / "default_rule.md").read_text()
    shares = res["default_policy"]["easy"]
    assert sum(shares.values()) == pytest.approx(1.0)
    # the section sits right after leave-one-family-out, once, however often it is written
    assert default_rule.main([*argv, "--report", str(report)]) == 0
    text = report.read_text()
    assert text.count("## Default rule") == 1
    assert text.index("## Leave one family out") < text.index("## Default rule")
    assert text.index("## Default rule") < text.index("## In distribution")
    assert "more" in text and "table" in text
