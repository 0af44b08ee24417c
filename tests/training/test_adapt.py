"""``tierpick adapt`` on a source the shipped model never trained on: LLMRouter's trivia_qa
(550 trivia questions, strict exact-match grades, left out of the default config), played by a
user whose tiers are their own choice of LLMRouter's nine models."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA
from tierpick import classifier
from tierpick.classifier.errors import ConfigError
from tierpick.cli import main
from tierpick.serving.lifecycle import ServerConfig
from tierpick.serving.service import create_server
from tierpick.training.adapt import APGR_TOLERANCE, _calibrate, _worse, adapt
from tierpick.training.config import load_config
from tierpick.training.dataset import build_dataset
from tierpick.training.errors import DatasetError
from tierpick.training.evaluate import SplitData
from tierpick.training.fit import split_arrays

TIERS = {
    "local": ["codegemma-7b", "mistral-7b-instruct-v0.3", "qwen2.5-7b-instruct"],
    "mid": ["gemma-2-9b-it", "llama-3.1-8b-instruct", "llama3-chatqa-1.5-8b"],
    "frontier": [
        "llama-3.1-nemotron-51b-instruct",
        "llama-3.3-nemotron-super-49b-v1",
        "llama3-chatqa-1.5-70b",
    ],
}
PRICES = {"local": (0, 0), "mid": (0.2, 0.6), "frontier": (2, 8)}


def user_config(folder: Path, tiers: dict[str, list[str]] = TIERS, name: str = "trivia") -> Path:
    lines = [f"name: {name}", f"data_root: {DATA}", "tiers:"]
    for tier, models in tiers.items():
        pin, pout = PRICES[tier]
        lines.append(
            f"  - {{name: {tier}, price_input: {pin}, price_output: {pout}, models: {models}}}"
        )
    lines += ["sources:", "  - {path: llmrouter/trivia_qa.csv}"]
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_adapt_calibrates_an_unseen_source_and_the_artifact_serves(tmp_path: Path) -> None:
    config = load_config(user_config(tmp_path))
    ds = build_dataset(config)
    parent = classifier.load()
    out = tmp_path / "adapted"
    result = adapt(config, ds, None, out)
    assert result.prompts == 550 and result.adapted_tiers == ["local", "mid", "frontier"]
    for tier in parent.tiers:  # calibrated on the user's outcomes, measured cross-fitted
        assert result.parent["ece"][tier] > 0.2, result.parent  # the shipped model is far off
        assert result.adapted["ece"][tier] < 0.05, result.adapted
    assert result.adapted["n_tier_apgr"] >= result.parent["n_tier_apgr"] - APGR_TOLERANCE

    # the artifact: the parent's graph and tokenizer, a new calibration, prices and lineage
    clf = classifier.load(out)
    m = clf.manifest
    assert m.lineage["adapted_from"] == parent.version and m.data_fingerprint == ds.fingerprint
    assert clf.version == result.version != parent.version
    assert m.files == parent.manifest.files and m.graph == parent.manifest.graph
    assert [t.price_output for t in m.tiers] == [0, 0.6, 8]
    prompts = ["Who wrote Hamlet?", "What is the capital of Australia?"]
    assert np.allclose(clf.predict_logits(prompts), parent.predict_logits(prompts))
    observed = {t: float(np.nanmean(ds.table[f"target_{t}"].to_numpy())) for t in TIERS}
    p = clf.predict_proba(prompts).mean(axis=0)
    for j, tier in enumerate(clf.tiers):  # near the user's own success rates now
        assert abs(p[j] - observed[tier]) < 0.1, (tier, p[j], observed[tier])

    # it loads without torch, as any artifact does
    code = (
        "import sys, tierpick; c = tierpick.load(sys.argv[1]); c.route(['hi']); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=120)

    # and a running server picks it up on a hot reload
    served = tmp_path / "served"
    shutil.copytree(parent.model_dir, served)
    app = create_server("127.0.0.1:0", str(served), ServerConfig(watch_seconds=0))
    try:
        shutil.rmtree(served)
        shutil.copytree(out, served)
        assert app.holder.reload()
        assert app.holder.current.version == result.version
    finally:
        app.shutdown(0)


def test_adapt_refuses_what_it_cannot_do_and_says_what_is_missing(tmp_path: Path) -> None:
    config = load_config(user_config(tmp_path))
    ds = build_dataset(config)
    with pytest.raises(DatasetError, match=r"nothing to adapt.*labelled prompts per tier"):
        adapt(config, ds, None, tmp_path / "a", min_outcomes=10_000)
    renamed = {"small": TIERS["local"], "large": TIERS["mid"] + TIERS["frontier"]}
    other = load_config(
        user_config(tmp_path, {"local": renamed["small"], "mid": renamed["large"]}, "two")
    )
    with pytest.raises(ConfigError, match="must be the model's tiers"):
        adapt(other, build_dataset(other), None, tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not an empty directory"):
        adapt(config, ds, None, tmp_path / "full")
    # a tier with too few outcomes keeps the parent's calibration, and says so
    data = split_arrays(ds, None)
    mask = data.mask.copy()
    mask[40:, 2] = 0  # the user graded only 40 prompts on the frontier tier
    sparse = SplitData("all", data.prompts, data.tasks, data.targets, mask, data.families)
    parent = classifier.load()
    a0 = np.array(parent.manifest.calibration["a"])
    b0 = np.array(parent.manifest.calibration["b"])
    z = parent.predict_logits(data.prompts).astype(np.float64)
    a, b, adapted, kept, _ = _calibrate(z, sparse, parent.tiers, a0, b0, 100)
    assert adapted == ["local", "mid"] and "40 labelled prompts (needs 100)" in kept["frontier"]
    assert (a[2], b[2]) == (a0[2], b0[2]) and (a[0], b[0]) != (a0[0], b0[0])
    # a worse adaptation is refused (the rule itself, on measured-looking figures)
    before = {"n_tier_apgr": 0.70, "ece": {"local": 0.05, "mid": 0.05}}
    assert _worse(before, {"n_tier_apgr": 0.695, "ece": {"local": 0.01, "mid": 0.01}}) is None
    assert "N-tier APGR" in (
        _worse(before, {"n_tier_apgr": 0.68, "ece": {"local": 0.01, "mid": 0.01}}) or ""
    )
    assert "mean ECE" in (
        _worse(before, {"n_tier_apgr": 0.75, "ece": {"local": 0.2, "mid": 0.01}}) or ""
    )


def test_adapt_command_registers_a_challenger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "adapted"
    code = main(
        [
            "adapt",
            "--config",
            str(user_config(tmp_path)),
            "--out",
            str(out),
            "--tracking-uri",
            store,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "| adapted |" in printed and "registered tierpick-trivia-adapted version 1" in printed
    assert main(["promote", "--name", "tierpick-trivia-adapted", "--tracking-uri", store]) == 0
    assert "promoted version 1 to champion" in capsys.readouterr().out
    # the run says what it is: its name, the commit of the code, no local absolute paths
    from mlflow.tracking import MlflowClient

    (run,) = MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("tierpick-adapt").experiment_id]
    )
    assert run.info.run_name.startswith("adapt ") and len(run.data.tags["git_commit"]) == 40
    assert run.data.params["config"] == "trivia.yaml"
    assert not any(str(tmp_path) in v for v in run.data.params.values())
    # promote against a store that does not exist: one line, and no empty store created
    missing = tmp_path / "nowhere.db"
    assert main(["promote", "--name", "x", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err and not missing.exists()
    assert classifier.load(out).manifest.lineage["folds"] == 5


def test_outcomes_of_no_configured_model_fail_in_one_line_leaving_nothing(tmp_path: Path) -> None:
    nobody = {t: [f"no-such-model-{t}"] for t in TIERS}
    config = user_config(tmp_path, nobody, "nobody")
    store = tmp_path / "mlflow.db"
    out = tmp_path / "adapted"
    argv = ["adapt", "--config", str(config), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "tierpick.cli", *argv, "--tracking-uri", f"sqlite:///{store}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tierpick: error: tier 'local' has no outcome on any prompt"), last
    assert "Traceback" not in done.stderr
    assert not out.exists() and not store.exists()  # no artifact, no MLflow store or run


def test_the_head_read_from_the_graph_reproduces_the_served_logits_and_can_be_rewritten(
    tmp_path: Path,
) -> None:
    import onnxruntime as ort

    from tierpick.training.adapt_head import Head, fit_head

    clf = classifier.load()
    head = Head(Path(clf.model_dir) / clf.manifest.graph)
    prompts = ["Who wrote Hamlet?", "What is 2+2?", "Prove that there are infinitely many primes."]
    feats = head.features(clf, prompts)
    assert np.allclose(feats @ head.weight.T + head.bias, clf.predict_logits(prompts), atol=1e-4)
    # a refit on outcomes moves only the rows asked for, towards the data
    targets = np.array([[1.0, 1, 1], [1, 1, 1], [0, 0, 1]])
    mask = np.ones_like(targets)
    w, b = fit_head(feats, targets, mask, head.weight, head.bias, [0], penalty=30.0)
    assert np.array_equal(w[1:], head.weight[1:]) and not np.array_equal(w[0], head.weight[0])
    new = feats @ w.T + b
    old = feats @ head.weight.T + head.bias
    assert new[0, 0] - new[2, 0] > old[0, 0] - old[2, 0]  # local: prompt 0 up, prompt 2 down
    graph = tmp_path / "student.onnx"
    head.write(w, b, graph)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert np.allclose(clf.infer(clf.token_ids(prompts), session), new, atol=1e-4)


@pytest.mark.slow  # ingests all of MMLU-Pro (about 30 s)
def test_with_thousands_of_outcomes_the_head_is_refitted_when_it_measures_better(
    tmp_path: Path,
) -> None:
    config_path = tmp_path / "mmlu.yaml"
    config_path.write_text(
        f"""
name: mmlu-user
data_root: {DATA}
tiers:
  - {{name: local, price_input: 0, price_output: 0, models: [gemma-7b]}}
  - {{name: mid, price_input: 0.5, price_output: 1.5, models: [Mixtral-8x7B-Instruct-v0.1]}}
  - {{name: frontier, price_input: 5, price_output: 15, models: [gemini-1.5-pro-002]}}
sources: [{{path: mmlu-pro}}]
"""
    )
    config = load_config(config_path)
    ds = build_dataset(config)
    parent = classifier.load()
    # the head alone beside the calibration (the memory, tried by default, is tested above)
    result = adapt(config, ds, None, tmp_path / "adapted", methods=("head",))
    assert result.method == "head+calibration", result.notes
    assert result.adapted["n_tier_apgr"] > result.parent["n_tier_apgr"]
    clf = classifier.load(tmp_path / "adapted")
    assert clf.manifest.files[clf.manifest.graph] != parent.manifest.files[parent.manifest.graph]
    assert clf.manifest.lineage["method"] == "head+calibration"


MIXED_TIERS = {
    "local": ["codegemma-7b", "mistral-7b-instruct-v0.3"],
    "mid": ["qwen2.5-7b-instruct", "llama-3.1-8b-instruct"],
    "frontier": ["llama-3.1-nemotron-51b-instruct", "llama-3.3-nemotron-super-49b-v1"],
}


def test_memory_learns_per_prompt_on_a_team_mix_and_the_graph_serves_it(tmp_path: Path) -> None:
    """A team whose traffic mixes multiple choice, math word problems and open questions, with
    tiers of its own: per-prompt learning (the memory) beats the calibration alone,
    cross-fitted, and the rewritten graph serves exactly what was evaluated, without torch."""
    path = user_config(tmp_path, MIXED_TIERS, "mix")
    sources = "".join(
        f"  - {{path: llmrouter/{s}.csv}}\n" for s in ("commonsense_qa", "gsm8k", "natural_qa")
    )
    path.write_text(path.read_text().replace("  - {path: llmrouter/trivia_qa.csv}\n", sources))
    config = load_config(path)
    ds = build_dataset(config)
    out = tmp_path / "adapted"
    result = adapt(config, ds, None, out)
    assert result.method == "memory", result.notes
    measured = result.methods
    assert measured["memory"]["n_tier_apgr"] > measured["calibration"]["n_tier_apgr"] + 0.01
    assert measured["memory"]["n_tier_apgr"] > result.parent["n_tier_apgr"] + 0.05
    assert max(result.adapted["ece"].values()) <= 0.05
    clf = classifier.load(out)
    parent = classifier.load()
    m = clf.manifest
    assert m.lineage["method"] == "memory" and m.lineage["memory"]["clusters"] > 0
    assert m.calibration["a"] == [1.0, 1.0, 1.0] and m.calibration["b"] == [0.0, 0.0, 0.0]
    assert m.files[m.graph] != parent.manifest.files[parent.manifest.graph]
    assert clf.has_embedding  # the graph gained the embedding output on the way
    # per task, the adapted probabilities sit near the team's observed success rates
    data = split_arrays(ds, None)
    tasks = np.array(data.tasks)
    p = clf.predict_proba(data.prompts)
    for task in set(data.tasks):
        rows = tasks == task
        for j in range(3):
            sel = rows & (data.mask[:, j] > 0)
            assert abs(p[sel, j].mean() - data.targets[sel, j].mean()) < 0.08, (task, j)
    code = (
        "import sys, tierpick; c = tierpick.load(sys.argv[1]); c.route(['hi']); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=120)


def test_a_memory_leaves_tiers_without_outcomes_as_the_parent_had_them(tmp_path: Path) -> None:
    """Fitted on two tiers, the memory's third tier is the parent's calibrated logit, in numpy
    and in the written graph alike."""
    from tierpick.classifier.routing import platt
    from tierpick.training.adapt_memory import fit_memory, read_features, write_graph

    parent = classifier.load()
    with (DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl").open() as fh:
        prompts = [__import__("json").loads(line)["prompt"] for line in fh][:120]
    z, e = read_features(parent, prompts)
    rng = np.random.default_rng(0)
    targets = (rng.random((120, 3)) < [0.3, 0.6, 0.9]).astype(float)
    mask = np.ones((120, 3))
    mask[:, 2] = 0  # no outcome on the frontier tier
    a = np.array(parent.manifest.calibration["a"])
    b = np.array(parent.manifest.calibration["b"])
    mem = fit_memory(e, z, targets, mask, a, b, [0, 1])
    assert np.all(mem.weight[2] == 0) and np.any(mem.weight[0] != 0)
    assert np.allclose(mem.proba(z, e)[:, 2], platt(z, a, b)[:, 2])
    graph = tmp_path / "student.onnx"
    write_graph(Path(parent.model_dir) / parent.manifest.graph, mem, graph)
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    served = parent.infer(parent.token_ids(prompts), session)
    assert np.allclose(served, mem.logits(z, e), atol=1e-3)


def test_adapt_says_which_outcome_rows_it_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN, infinite and out-of-range scores used to vanish without a word in adapt."""
    bad = tmp_path / "extra.jsonl"
    rows = [("NaN", 3), ("Infinity", 4), ("1.5", 5), ("1", 6)]
    bad.write_text(
        "".join(
            f'{{"prompt": "Question {i}?", "model": "codegemma-7b", "score": {v}}}\n'
            for v, i in rows
        )
    )
    path = user_config(tmp_path)
    path.write_text(path.read_text() + f"  - {{path: {bad}, format: long}}\n")
    out = tmp_path / "adapted"
    assert main(["adapt", "--config", str(path), "--out", str(out), "--no-mlflow"]) == 0
    printed = capsys.readouterr().out
    assert "3 outcome rows dropped" in printed
    for line in (1, 2, 3):
        assert f"{bad}:{line}" in printed


def test_a_prompt_on_a_cluster_boundary_is_known_to_go_either_way() -> None:
    """The graph assigns clusters in float32: a graded prompt whose two nearest centroids are
    equally near may land in either, so adapt's check that the written graph reproduces the
    memory skips such prompts (``Memory.ambiguous``) instead of refusing a sound model (the
    default model's adapt study met one among 1,000 MMLU-Pro prompts and stopped)."""
    from tierpick.training.adapt_memory import Memory

    mem = Memory([np.eye(3), np.eye(3)[[2, 0, 1]]], np.zeros(3), np.ones(3), np.zeros((3, 9)),
                 np.ones(3), np.zeros(3))  # fmt: skip
    rows = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [2.0, 1.0, 0.5], [0.3, 0.3 + 1e-6, 5.0]])
    assert mem.ambiguous(rows).tolist() == [True, False, False, False]
    assert mem.ambiguous(rows, tol=0.6).tolist() == [True, False, True, False]
