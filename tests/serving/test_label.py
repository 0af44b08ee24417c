"""``tierpick label`` end to end against real HTTP processes: an OpenAI-compatible server that
answers as each tier's model (with injected 429s, 500s, a 400, an answer without usage) and a
judge server that grades deterministically (tests/serving/fake_llm.py), both in their own
processes; the label run itself in process, or as a process killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, REPO
from tests.serving.fake_llm import digest, grade
from tierpick.cli import main
from tierpick.serving.harness.processes import free_port, stop_process

KEY = "sk-test-0123456789abcdef"  # must never leave the environment
TIER_MODELS = {"local": "fake-local", "mid": "fake-mid", "frontier": "fake-frontier"}
FAULTS = [
    "Summarize the theory of evolution [[fail-429-twice]] in one line.",
    "Explain quantum tunnelling [[fail-500]] to a child.",
    "A prompt far too long for the context [[bad-request]].",
    "Rate this essay [[judge-garbage]] please.",
    "List three prime numbers [[no-usage]].",
]


class Fake:
    def __init__(self, role: str, folder: Path, delay: float = 0.0) -> None:
        self.port = free_port()
        self.log = folder / f"{role}-{self.port}.log"
        env = {**os.environ, "FAKE_LLM_KEY": KEY}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.serving.fake_llm", "--port", str(self.port),
             "--role", role, "--log", str(self.log), "--delay", str(delay)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def close(self) -> None:
        stop_process(self.proc, 5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture()
def servers(tmp_path: Path) -> Iterator[tuple[Fake, Fake]]:
    tiers, judge = Fake("tiers", tmp_path), Fake("judge", tmp_path)
    yield tiers, judge
    tiers.close()
    judge.close()


def write_config(folder: Path, tiers: Fake, judge: Fake, **request: Any) -> Path:
    prices = {"local": (0, 0), "mid": (0.5, 1.5), "frontier": (5, 15)}
    lines = ["name: acme", "tiers:"]
    for t, model in TIER_MODELS.items():
        pin, pout = prices[t]
        lines.append(
            f"  {t}: {{model: {model}, base_url: '{tiers.url}', api_key_env: LABEL_TEST_KEY, "
            f"price_input: {pin}, price_output: {pout}}}"
        )
    lines.append(
        f"judge: {{model: fake-judge, base_url: '{judge.url}', api_key_env: LABEL_TEST_KEY, "
        "price_input: 2.5, price_output: 10, pass_grade: 8}"
    )
    req = {"max_tokens": 64, "timeout_s": 5, "retries": 3, "concurrency": 4, **request}
    lines.append("request: {" + ", ".join(f"{k}: {v}" for k, v in req.items()) + "}")
    path = folder / "label.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_log(folder: Path, n: int = 40) -> tuple[Path, list[str]]:
    """Real prompts (the arena-hard log) and the fault prompts, plus two bad rows."""
    real = []
    with (DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl").open() as fh:
        for line in fh:
            real.append(json.loads(line)["prompt"])
            if len(real) == n:
                break
    path = folder / "log.jsonl"
    with path.open("w") as fh:
        for p in [*real, *FAULTS]:
            fh.write(json.dumps({"prompt": p}) + "\n")
        fh.write(json.dumps({"prompt": "   "}) + "\n")
        fh.write("{not json\n")
    return path, real


def run_label(*args: str) -> int:
    os.environ["LABEL_TEST_KEY"] = KEY
    return main(["label", *args])


def outcomes(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "outcomes.jsonl").read_text().splitlines()]


def test_label_grades_every_tier_and_records_every_failure(
    servers: tuple[Fake, Fake], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiers, judge = servers
    config = write_config(tmp_path, tiers, judge)
    log, real = write_log(tmp_path)
    out = tmp_path / "labels"
    assert run_label(str(log), "--config", str(config), "--out", str(out), "--size", "100",
                     "--no-mlflow") == 0  # fmt: skip
    printed = capsys.readouterr().out
    rows = outcomes(out)
    by = {(r["prompt"], r["tier"]): r for r in rows}
    # every real prompt and the 429 / no-usage ones: graded on every tier as the judge graded
    for prompt in [*real, FAULTS[0], FAULTS[4]]:
        for tier, model in TIER_MODELS.items():
            r = by[(prompt, tier)]
            g = grade(model, digest(prompt))
            assert (r["grade"], r["score"], r["model"]) == (g, float(g >= 8), model)
            assert r["answer"] == f"ANSWER by {model}: {digest(prompt)}"
    assert len(rows) == 3 * (len(real) + 2)
    # the 429s were retried (3 calls per tier), the 400 was not (1), the 500 until retries ran out
    calls = Counter((r["model"], r["prompt"]) for r in tiers.requests())
    for model in TIER_MODELS.values():
        assert calls[(model, digest(FAULTS[0]))] == 3
        assert calls[(model, digest(FAULTS[2]))] == 1
        assert calls[(model, digest(FAULTS[1]))] == 4
    problems = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    reasons = {(p["prompt_id"], p["tier"]): p["reason"] for p in problems}
    assert len(reasons) == 9  # 3 faults x 3 tiers, each with its reason
    text = "\n".join(reasons.values())
    assert "HTTP 500: upstream exploded (after 4 attempts)" in text
    assert "HTTP 400: context length exceeded" in text
    assert "holds no [[rating]]" in text
    # the rows without a prompt: reported with their file and line, not lost
    assert f"{log}:46: no prompt text" in printed and f"{log}:47: invalid JSON" in printed
    # the spend: the endpoint's token counts x the prices (the fake server's usage is
    # len(prompt) // 4 + 1 in, 10 out), estimated from characters where it gave none
    prices = {"local": (0, 0), "mid": (0.5, 1.5), "frontier": (5, 15)}
    for r in rows:
        if FAULTS[4] not in r["prompt"]:
            pin, pout = prices[r["tier"]]
            usage = (len(r["prompt"]) // 4 + 1) * pin + 10 * pout
            assert r["cost_usd"] == pytest.approx(usage / 1e6, rel=1e-6)
    summary = json.loads((out / "label.json").read_text())
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    paid = sum(r.get("cost_usd", 0) for r in journal)
    assert summary["spent_usd"] == pytest.approx(paid, rel=1e-5)
    assert paid > sum(r["cost_usd"] + r["judge_cost_usd"] for r in rows)  # failures cost too
    # the key is in no file written
    for f in out.iterdir():
        assert KEY not in f.read_text(errors="replace"), f
    # the outcomes are a dataset: the tier config written beside them reads them as three tiers
    from tierpick.training.config import load_config
    from tierpick.training.dataset import build_dataset

    ds = build_dataset(load_config(out / "tiers.yaml"))
    assert ds.table.num_rows == len(real) + 2 and ds.tiers == ("local", "mid", "frontier")
    # a rerun pays for nothing: every call is in the journal
    before = len(tiers.requests()) + len(judge.requests())
    assert run_label(str(log), "--config", str(config), "--out", str(out), "--no-mlflow") == 0
    assert len(tiers.requests()) + len(judge.requests()) == before
    assert len(outcomes(out)) == len(rows)


def test_a_budget_stops_before_it_is_passed_and_a_rerun_goes_on(
    servers: tuple[Fake, Fake], tmp_path: Path
) -> None:
    tiers, judge = servers
    config = write_config(tmp_path, tiers, judge, concurrency=1)
    log, _ = write_log(tmp_path, 20)
    out = tmp_path / "labels"
    args = [str(log), "--config", str(config), "--out", str(out), "--size", "20", "--no-mlflow"]
    assert run_label(*args, "--budget-usd", "0.02") == 0
    first = json.loads((out / "label.json").read_text())
    assert 0 < first["spent_usd"] <= 0.02
    assert (
        first["problems"].get("budget reached (labelled by a rerun with a larger --budget-usd)", 0)
        > 0
    )
    graded = len(outcomes(out))
    paid = Counter((r["model"], r["prompt"]) for r in tiers.requests())
    assert run_label(*args, "--budget-usd", "1.0") == 0
    assert len(outcomes(out)) > graded
    again = Counter((r["model"], r["prompt"]) for r in tiers.requests())
    assert all(again[k] == n for k, n in paid.items())  # nothing paid for was asked again


def test_a_killed_run_resumes_and_pays_only_for_the_calls_in_flight(tmp_path: Path) -> None:
    tiers, judge = Fake("tiers", tmp_path, delay=0.15), Fake("judge", tmp_path)
    try:
        config = write_config(tmp_path, tiers, judge, concurrency=3)
        log, _ = write_log(tmp_path, 30)
        out = tmp_path / "labels"
        args = [str(log), "--config", str(config), "--out", str(out), "--size", "100"]
        env = {**os.environ, "LABEL_TEST_KEY": KEY}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tierpick.cli", "label", *args, "--no-mlflow"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        journal = out / "journal.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count('"kind": "answer"') >= 20:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert run_label(*args, "--no-mlflow") == 0
        summary = json.loads((out / "label.json").read_text())
        sent_again = summary["calls_sent_again_after_a_kill"]
        assert 0 <= sent_again <= 3 * 2  # at most the calls in flight (answers and grades)
        answered = Counter(
            (r["model"], r["prompt"]) for r in tiers.requests() if r["status"] == 200
        )
        graded = Counter(r["prompt"] for r in judge.requests())
        paid_twice = sum(n - 1 for n in answered.values()) + sum(n - 1 for n in graded.values())
        assert paid_twice <= sent_again
        assert len(outcomes(out)) == 3 * (30 + 2)  # every prompt is graded in the end
    finally:
        tiers.close()
        judge.close()


def test_config_and_environment_errors_are_one_line(
    servers: tuple[Fake, Fake], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiers, judge = servers
    config = write_config(tmp_path, tiers, judge)
    log, _ = write_log(tmp_path, 3)
    os.environ.pop("LABEL_TEST_KEY", None)
    assert main(["label", str(log), "--config", str(config), "--out", str(tmp_path / "o"),
                 "--no-mlflow"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "environment variable LABEL_TEST_KEY" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("pass_grade: 8", "pass_grade: 11"))
    assert run_label(str(log), "--config", str(bad), "--out", str(tmp_path / "o")) == 2
    assert "judge.pass_grade" in capsys.readouterr().err
    two = tmp_path / "two.yaml"
    two.write_text(config.read_text().replace("fake-mid", "fake-local"))
    assert run_label(str(log), "--config", str(two), "--out", str(tmp_path / "o")) == 2
    assert "each tier needs its own" in capsys.readouterr().err


def test_label_draws_from_a_decision_log_stratified_by_its_tiers(tmp_path: Path) -> None:
    """A decision log (prompts allowed) is a prompt log: the sample keeps the log's own tier
    and draws from every (tier, cluster) stratum, rare ones included."""
    from tierpick import classifier
    from tierpick.serving.label.sample import draw, read_pool

    clf = classifier.load()
    log = tmp_path / "decisions.jsonl"
    prompts = []
    with (DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl").open() as fh:
        prompts = [json.loads(line)["prompt"] for line in fh][:200]
    tiers = ["frontier"] * 195 + ["local"] * 5  # the local tier is rare traffic
    with log.open("w") as fh:
        for p, t in zip(prompts, tiers, strict=True):
            fh.write(json.dumps({"prompt": p, "tier": t, "prompt_sha256": "x"}) + "\n")
        fh.write(json.dumps({"tier": "mid", "prompt_sha256": "y"}) + "\n")  # no prompt text
    pool = read_pool([str(log)], "prompt", None, None, 1000, 0)
    assert pool.rows == 201 and pool.skipped == {
        "no prompt text in field 'prompt' (decision log written without prompts)": 1
    }
    sample, summary = draw(pool, clf, 40, clusters=4, seed=0)
    assert summary["by_tier"]["local"] >= 4  # a proportional draw would give it 1
    assert "the log's own tier column" in " ".join(summary["notes"])
    weights = {s.tier: s.weight for s in sample}
    assert weights["local"] < weights["frontier"]  # over-drawn strata weigh less


def test_label_and_adapt_runs_are_linked_in_mlflow(
    servers: tuple[Fake, Fake], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The label run carries its outcomes' sha256; the adapt run on those outcomes finds it
    and the two point at each other; no key reaches the store."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts land under the working directory
    tiers, judge = servers
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = write_config(tmp_path, tiers, judge)
    log, _ = write_log(tmp_path, 60)
    out = tmp_path / "labels"
    assert run_label(str(log), "--config", str(config), "--out", str(out), "--size", "100",
                     "--tracking-uri", store) == 0  # fmt: skip
    model = tmp_path / "adapted"
    assert main(["adapt", "--config", str(out / "tiers.yaml"), "--out", str(model),
                 "--min-outcomes", "20", "--folds", "3", "--force", "--tracking-uri", store,
                 "--register-name", "acme-adapted"]) == 0  # fmt: skip
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    label_run = next(r for r in runs if r.data.tags.get("tierpick_step") == "label")
    adapt_run = next(r for r in runs if r.info.run_name.startswith("adapt "))
    assert (
        label_run.data.tags["outcomes_sha256"]
        == json.loads((out / "label.json").read_text())["outcomes_sha256"]
    )
    assert adapt_run.data.tags["label_run_ids"] == label_run.info.run_id
    assert label_run.data.tags["adapt_run_id"] == adapt_run.info.run_id
    assert label_run.data.tags["adapted_model"] == "acme-adapted/1"
    assert label_run.data.metrics["spent_usd"] > 0
    for path in (tmp_path / "mlflow.db", *tmp_path.rglob("mlruns/**/*")):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_the_example_label_config_is_valid() -> None:
    from tierpick.serving.label import load_label_config

    cfg = load_label_config(REPO / "serving" / "deploy" / "label.yaml")
    assert tuple(cfg.tiers) == ("local", "mid", "frontier") and cfg.judge.pass_grade == 8
    assert cfg.judge.endpoint is not None and cfg.judge.endpoint.api_key_env == "OPENAI_API_KEY"


def test_a_call_past_its_time_out_is_retried_then_recorded(
    servers: tuple[Fake, Fake], tmp_path: Path
) -> None:
    tiers, judge = servers
    config = write_config(tmp_path, tiers, judge, timeout_s=0.5, retries=1)
    log = tmp_path / "slow.jsonl"
    log.write_text(json.dumps({"prompt": "Take your time [[slow]] please."}) + "\n")
    out = tmp_path / "labels"
    assert run_label(str(log), "--config", str(config), "--out", str(out), "--no-mlflow") == 0
    problems = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert len(problems) == 3
    assert all(p["reason"] == "timed out after 0.5 s (after 2 attempts)" for p in problems)
