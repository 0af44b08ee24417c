"""``tierpick tune`` on a real prompt log (LLMRouter's and ZeroEval's prompts and the 500
arena-hard prompts, 6,651 rows): the chosen policy meets its constraint on the rows it was chosen
on and lands near it on rows it never saw, and the policy file is what the gRPC service, the
gateway config and ``TierClassifier.route`` use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA
from tierpick import classifier
from tierpick.classifier import RoutingPolicy, read_policy, write_policy
from tierpick.classifier.errors import ConfigError, PolicyError, TierpickError
from tierpick.cli import main
from tierpick.serving.client import TierpickClient, policy
from tierpick.serving.gateway import parse_gateway_config
from tierpick.serving.report import Costs, read_scored
from tierpick.serving.scoring import ScoreOptions, score
from tierpick.serving.service import create_server
from tierpick.serving.tune import Constraint, choose, per_1k, route, tune

ARENA = DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl"
LOG = [
    *sorted(str(p) for p in (DATA / "llmrouter").glob("*.csv")),
    str(ARENA),
    *sorted(str(p) for p in (DATA / "zeroeval").glob("*.csv")),
]


@pytest.fixture(scope="module")
def clf() -> classifier.TierClassifier:
    return classifier.load()


@pytest.fixture(scope="module")
def costs(clf: classifier.TierClassifier, tmp_path_factory: pytest.TempPathFactory) -> Costs:
    out = tmp_path_factory.mktemp("tune") / "scored"
    score(LOG, out, clf, ScoreOptions(), workers=1)
    return Costs.of(read_scored(out, clf.tiers), clf)


def test_the_chosen_share_holds_on_the_half_of_the_log_it_never_saw(
    costs: Costs, clf: classifier.TierClassifier
) -> None:
    assert len(costs) > 6000
    for rule in ("utility", "threshold"):
        t = tune(costs, clf, Constraint({"frontier": 0.2}), rule, holdout=0.5, seed=1)
        assert t.holdout is not None and t.holdout_rows == len(costs) - t.rows
        chosen = t.chosen["mix"]["frontier"]
        assert 0.19 <= chosen <= 0.2, (rule, chosen)  # as close to the budget as the log allows
        assert abs(t.holdout["mix"]["frontier"] - 0.2) <= 0.03, (rule, t.holdout)
        # the figures are the serving router's on those rows
        assert route(costs, clf, t.policy)["mix"]["frontier"] == pytest.approx(
            (chosen * t.rows + t.holdout["mix"]["frontier"] * t.holdout_rows) / len(costs)
        )
        # nothing that meets the constraint was predicted to do better
        assert t.chosen["predicted_success"] == max(
            c["predicted_success"] for c in t.curve if c["meets"]
        )
        assert t.chosen["predicted_success"] < t.always["always frontier"]["predicted_success"]


def test_a_cost_budget_and_several_shares_are_met_together(
    costs: Costs, clf: classifier.TierClassifier
) -> None:
    frontier = costs.summarize(np.full(len(costs), 2, dtype=np.int64))
    budget = frontier["cost_per_1m_requests_usd"] / 1000 / 4  # a quarter of always-frontier
    t = choose(costs, clf, Constraint({"mid": 0.7}, budget_per_1k=budget))
    assert t.chosen["cost_per_1m_requests_usd"] / 1000 <= budget
    assert t.chosen["mix"]["mid"] <= 0.7
    assert t.policy.cost_weight is not None and t.policy.min_success == 0


def test_a_quality_floor_alone_gets_the_cheapest_policy_that_meets_it(
    costs: Costs, clf: classifier.TierClassifier
) -> None:
    """ "Quality at least 95% of always-frontier", stated in plain terms, translated to the
    knob: the cheapest swept policy whose predicted success reaches the floor."""
    top = costs.summarize(np.full(len(costs), 2, dtype=np.int64))
    t = choose(costs, clf, Constraint(min_quality=0.95))
    assert t.chosen["predicted_success"] >= 0.95 * top["predicted_success"] - 1e-9
    assert t.chosen["cost_per_1m_requests_usd"] < top["cost_per_1m_requests_usd"]
    cheaper = [c for c in t.curve if per_1k(c) < per_1k(t.chosen) - 1e-9]
    assert cheaper and not any(c["meets"] for c in cheaper)  # nothing cheaper meets it
    with pytest.raises(TierpickError, match="best predicted success"):
        choose(
            costs,
            clf,
            Constraint(min_quality=1.0),
            base=classifier.RoutingPolicy(allowed_tiers=("local", "mid")),
        )
    with pytest.raises(ConfigError, match="min-quality"):
        choose(costs, clf, Constraint(min_quality=1.5))


def test_constraints_that_cannot_be_met_or_make_no_sense_are_refused(
    costs: Costs, clf: classifier.TierClassifier
) -> None:
    with pytest.raises(TierpickError, match=r"no utility policy meets .*the cheapest one routes"):
        choose(costs, clf, Constraint({"local": 0.0, "mid": 0.0, "frontier": 0.5}))
    for constraint, message in [
        (Constraint({"premium": 0.2}), "premium: not a tier of the model"),
        (Constraint({"frontier": 1.5}), r"a share must be in \[0, 1\]"),
        (Constraint({"frontier": float("nan")}), r"a share must be in \[0, 1\]"),
        (Constraint(), "give at least one"),
        (Constraint(budget_per_1k=-1.0), "--budget-per-1k must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            choose(costs, clf, constraint)


def test_the_policy_file_is_what_serve_the_gateway_and_route_use(
    tmp_path: Path, clf: classifier.TierClassifier, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "policy.yaml"
    log = [str(DATA / "llmrouter" / "natural_qa.csv"), str(ARENA)]  # easy QA + hard chat
    code = main(
        [
            "tune",
            *log,
            "--max-share",
            "frontier=15%",
            "--out",
            str(out),
            "--report-dir",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "frontier <= 15.0% of calls" in printed and "held-out" not in printed
    assert (tmp_path / "tune.md").is_file() and (tmp_path / "tune_curve.png").is_file()
    tuned = read_policy(out)
    assert tuned.cost_weight is not None and tuned.cost_weight > 0

    prompts = ["What is the capital of France?", "hi", "Prove that sqrt(2) is irrational."]
    prompts += [json.loads(line)["prompt"] for line in ARENA.read_text().splitlines()[:20]]
    app = create_server("127.0.0.1:0", policy=tuned)
    try:
        c = TierpickClient(f"127.0.0.1:{app.port}")
        c.wait_ready()
        # a call without a policy routes by the file's, as TierClassifier.route does
        served = [r.tier for r in c.classify_batch(prompts).responses]
        assert served == [d.tier for d in clf.route(prompts, tuned)]
        # a field the call sets overrides the file's; the others stay the file's
        narrow = c.classify_batch(prompts, policy(allowed_tiers=["local", "mid"])).responses
        expected = RoutingPolicy(allowed_tiers=("local", "mid"), cost_weight=tuned.cost_weight)
        assert [r.tier for r in narrow] == [d.tier for d in clf.route(prompts, expected)]
        c.close()
    finally:
        app.shutdown(0)

    gateway = parse_gateway_config(
        {"tiers": {t: {"upstream": "127.0.0.1:1"} for t in clf.tiers}, "policy": str(out)}
    )
    assert gateway.policy == tuned


def test_bad_policy_files_are_refused_naming_the_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    cases = {
        "policy: {cost_weight: fast}\n": r"bad.yaml: policy.cost_weight: must be a number",
        "policy: {min_success: 2}\n": r"policy.min_success: must be a number in \[0.0, 1.0\]",
        "policy: {speed: 1}\n": r"unknown key\(s\) \['speed'\]",
        "cost_weight: 0.3\n": "must hold a mapping with a 'policy' key",
        "policy: {}\nnotes: 1\n": r"unknown key\(s\) \['notes'\]",
        "policy: [\n": "not valid YAML",
    }
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_policy(bad)
    with pytest.raises(ConfigError, match="No such file"):
        read_policy(tmp_path / "missing.yaml")
    # a policy that names a tier the model lacks: the server refuses to start, in one line
    write_policy(bad, RoutingPolicy(allowed_tiers=("premium",)))
    with pytest.raises(PolicyError, match="unknown tier"):
        create_server("127.0.0.1:0", policy=read_policy(bad))
    assert main(["serve", "--port", "0", "--policy", str(bad)]) == 2


def test_an_unmeetable_constraint_exits_2_and_writes_no_policy(tmp_path: Path) -> None:
    out = tmp_path / "policy.yaml"
    shares = ["--max-share", "local=0", "--max-share", "mid=0", "--max-share", "frontier=0.5"]
    assert main(["tune", str(ARENA), *shares, "--out", str(out)]) == 2
    assert main(["tune", str(ARENA), "--max-share", "premium=0.1", "--out", str(out)]) == 2
    assert main(["tune", str(ARENA), "--max-share", "frontier", "--out", str(out)]) == 2
    assert not out.exists()


def test_without_a_log_the_model_translates_a_plain_target_on_its_reference_prompts(
    tmp_path: Path, clf: classifier.TierClassifier, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before there is traffic: `tune --max-share frontier=0.2` with no log chooses the cost
    weight on the model's reference training prompts (in the artifact), the same weight the
    live guard starts at for that target."""
    from tierpick.serving.guard import Target, guard_for

    out = tmp_path / "p.yaml"
    assert main(["tune", "--max-share", "frontier=0.2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "reference training prompts" in text
    weight = read_policy(out).cost_weight
    assert weight is not None
    guard = guard_for(Target.parse("frontier=0.2"), clf, RoutingPolicy())
    assert weight == pytest.approx(guard.weight, rel=0.02), (weight, guard.weight)
    # the translation meets the target on those prompts
    import yaml

    chosen = yaml.safe_load(out.read_text())["tuned"]["chosen_on_log"]
    assert 0.15 < chosen["mix"]["frontier"] <= 0.2, chosen
    assert main(["tune", "--scored", "--max-share", "frontier=0.2"]) == 2
