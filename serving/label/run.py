"""A ``tierpick label`` run: draw the sample (once), ask every tier's model for each prompt's
answer, grade each answer, and write the outcomes, all resumable.

The output directory holds:

- ``sample.jsonl``: the prompts drawn, with stratum and weight; written once, reused by a
  rerun (a rerun with other tiers or another judge is refused: ``--restart`` starts over).
- ``journal.jsonl``: append-only, one line per paid call as soon as it returns (flushed to
  disk), and one before it starts. A rerun skips every call the journal holds, so nothing
  paid for is paid again; only calls that were in flight when the run was killed are sent
  again, and the run says how many.
- ``outcomes.jsonl``: one row per graded (prompt, tier), the long format ``tierpick adapt``,
  ``train`` and ``data build`` read: ``prompt_id, prompt, model, tier, score`` and ``grade``,
  ``answer``, ``rationale``, ``weight``, ``task``, tokens and cost.
- ``problems.jsonl``: every prompt or call that gave no outcome, with its reason.
- ``tiers.yaml``: a tier config over ``outcomes.jsonl`` (your tiers, models and prices) for
  ``tierpick adapt --config``; ``label.md``/``label.json``: what was done and spent.

Budget: before a prompt starts, its worst case (every tier's answer at ``max_tokens``, every
grade, input tokens estimated as 1.5 x characters / 4) is reserved against ``budget_usd``; what
a call really cost (the endpoint's ``usage`` x the prices) replaces the reservation when it
returns. A prompt that does not fit is left for a later run ("budget reached"), so the spend
stays under the cap unless an endpoint counts far more input tokens than the estimate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from tierpick.classifier import TierClassifier
from tierpick.classifier.errors import ConfigError
from tierpick.classifier.routing import CHARS_PER_TOKEN
from tierpick.serving.label.calls import CallFailed, Client, Redactor, judge_answer
from tierpick.serving.label.config import LabelConfig
from tierpick.serving.label.sample import Candidate, Sampled, draw, read_pool

log = logging.getLogger("tierpick.label")

SAMPLE, JOURNAL, OUTCOMES, PROBLEMS = (
    "sample.jsonl",
    "journal.jsonl",
    "outcomes.jsonl",
    "problems.jsonl",
)
STATE = "label.json"
JUDGE_OVERHEAD_TOKENS = 300  # the judge prompt's own words


@dataclass(frozen=True)
class LabelOptions:
    size: int | None = None  # prompts to draw (default: what the budget allows, else 200)
    budget_usd: float | None = None  # hard cap on what the run may spend
    prompt_field: str = "prompt"
    reference_field: str | None = None
    task_field: str | None = None
    clusters: int = 20
    pool: int = 20_000
    seed: int = 0
    restart: bool = False
    retry_problems: bool = False
    progress: bool = True


class Journal:
    """The append-only record of paid calls (see the module): read back on a rerun."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[tuple[str, str, str], dict[str, Any]] = {}  # (id, tier, stage) -> rec
        self.started: set[tuple[str, str, str]] = set()
        self.spent = 0.0
        if path.exists():
            self._read()
        self._fh = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def _read(self) -> None:
        raw = self.path.read_bytes()
        good = raw.rfind(b"\n") + 1
        if good < len(raw):  # a line cut by the kill: it never happened
            with self.path.open("r+b") as fh:
                fh.truncate(good)
        for line in raw[:good].decode("utf-8").splitlines():
            rec = json.loads(line)
            key = (rec["id"], rec["tier"], rec["stage"])
            if rec["kind"] == "start":
                self.started.add(key)
            else:
                self.done[key] = rec
                self.spent += float(rec.get("cost_usd") or 0.0)

    def in_flight_at_kill(self) -> int:
        return len(self.started - set(self.done))

    def write(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            if rec["kind"] != "start":
                self.done[(rec["id"], rec["tier"], rec["stage"])] = rec

    def close(self) -> None:
        self._fh.close()


class Budget:
    """Reservations against a cap (None: no cap), under a lock."""

    def __init__(self, cap: float | None, spent: float) -> None:
        self.cap, self.spent, self.reserved = cap, spent, 0.0
        self._lock = threading.Lock()

    def reserve(self, amount: float) -> bool:
        with self._lock:
            if self.cap is not None and self.spent + self.reserved + amount > self.cap:
                return False
            self.reserved += amount
            return True

    def settle(self, reserved: float, actual: float) -> None:
        with self._lock:
            self.reserved -= reserved
            self.spent += actual


@dataclass
class Progress:
    total: int
    out: TextIO | None
    started: float = field(default_factory=time.perf_counter)
    prompts: int = 0
    answers: int = 0
    grades: int = 0
    problems: int = 0
    budget: Budget | None = None
    _last: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def tick(self, what: str, force: bool = False) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)
            now = time.perf_counter()
            if self.out is None or (now - self._last < 2.0 and not force):
                return
            self._last = now
            self.out.write("\r" + self.line() + " " * 4)
            self.out.flush()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.prompts / elapsed if elapsed > 0 else 0.0
        left = self.total - self.prompts
        eta = f"{left / rate / 60:.1f} min" if rate > 0 else "-"
        b = self.budget
        spend = (
            f"${b.spent:.2f}" + (f" of ${b.cap:.2f}" if b.cap is not None else "")
            if b is not None
            else "-"
        )
        return (
            f"label: {self.prompts}/{self.total} prompts, {self.answers} answers, "
            f"{self.grades} grades, {self.problems} problems; spent {spend}; ETA {eta}"
        )


def _estimate(cfg: LabelConfig, prompt: str) -> float:
    """The most a prompt can cost: every tier's answer at max_tokens, every grade."""
    tokens_in = math.ceil(len(prompt) / CHARS_PER_TOKEN * 1.5) + 16
    max_out = cfg.request.max_tokens
    total = sum(e.cost(tokens_in, max_out) for e in cfg.tiers.values())
    if cfg.judge.endpoint is not None:
        judge_in = tokens_in + math.ceil(max_out * 1.5) + JUDGE_OVERHEAD_TOKENS
        total += len(cfg.tiers) * cfg.judge.endpoint.cost(judge_in, cfg.judge.max_tokens)
    return total


def _fingerprint(cfg: LabelConfig) -> str:
    doc = {k: v for k, v in cfg.public().items() if k != "request"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@dataclass
class LabelResult:
    out: Path
    summary: dict[str, Any]
    markdown: str
    outcomes_sha256: str


def run_label(
    inputs: Sequence[str],
    out: Path,
    cfg: LabelConfig,
    clf: TierClassifier,
    opts: LabelOptions,
    on_outcomes: Callable[[LabelResult], None] | None = None,
) -> LabelResult:
    """Draw (or reuse) the sample, label it within the budget, write the outputs."""
    if tuple(cfg.tiers) != clf.tiers:
        raise ConfigError(
            f"label config tiers {list(cfg.tiers)} must be the model's tiers {list(clf.tiers)}, "
            "in the same order"
        )
    keys = {t: e.key() for t, e in cfg.tiers.items()}  # a missing variable fails here, first
    judge_key = cfg.judge.endpoint.key() if cfg.judge.endpoint is not None else None
    redact = Redactor([k for k in [*keys.values(), judge_key] if k])
    if opts.budget_usd is not None and not (math.isfinite(opts.budget_usd) and opts.budget_usd > 0):
        raise ConfigError(f"--budget-usd must be a positive number, got {opts.budget_usd}")
    if opts.size is not None and opts.size < 1:
        raise ConfigError(f"--size must be >= 1, got {opts.size}")
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE
    fingerprint = _fingerprint(cfg)
    if opts.restart:
        for name in (SAMPLE, JOURNAL, OUTCOMES, PROBLEMS, STATE):
            (out / name).unlink(missing_ok=True)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state and state.get("config_fingerprint") != fingerprint:
        raise ConfigError(
            f"{out} was labelled with other tiers or another judge (config "
            f"{state.get('config_fingerprint')}, now {fingerprint}): use a new --out, or "
            "--restart to start over (what was paid for there is lost)"
        )
    started = time.perf_counter()
    if (out / SAMPLE).exists():
        sample = [_sampled_from(r) for r in _read_jsonl(out / SAMPLE)]
        drawn = state.get("sample", {})
        log.info("reusing the sample of %d prompts in %s", len(sample), out / SAMPLE)
    else:
        size = opts.size
        pool = read_pool(
            inputs, opts.prompt_field, opts.reference_field, opts.task_field, opts.pool, opts.seed
        )
        if size is None:
            per = sum(_estimate(cfg, c.prompt) for c in pool.candidates) / len(pool.candidates)
            size = max(1, int(opts.budget_usd / per)) if opts.budget_usd and per > 0 else 200
        sample, drawn = draw(pool, clf, size, opts.clusters, opts.seed)
        drawn.update(
            rows=pool.rows,
            distinct=pool.distinct,
            skipped=dict(pool.skipped),
            skipped_examples=pool.examples,
        )
        _write_jsonl(out / SAMPLE, [_sampled_row(s) for s in sample])
        state = {"config_fingerprint": fingerprint, "sample": drawn}
        state_path.write_text(json.dumps(state, indent=1))
    journal = Journal(out / JOURNAL)
    in_flight = journal.in_flight_at_kill()
    budget = Budget(opts.budget_usd, journal.spent)
    stop = threading.Event()
    client = Client(cfg.request, redact, stop)
    progress = Progress(len(sample), sys.stderr if opts.progress else None, budget=budget)
    left_for_budget: list[str] = []
    lock = threading.Lock()

    def unit(s: Sampled) -> None:
        c = s.candidate
        todo = [
            t
            for t in cfg.tiers
            if not _final(journal.done.get((c.id, t, "grade")), opts.retry_problems)
            and not _final(journal.done.get((c.id, t, "answer")), opts.retry_problems, True)
        ]
        if not todo or stop.is_set():
            progress.tick("prompts")
            return
        reserve = _estimate(cfg, c.prompt) * len(todo) / len(cfg.tiers)
        if not budget.reserve(reserve):
            with lock:
                left_for_budget.append(c.id)
            return
        spent = 0.0
        try:
            for tier in todo:
                if stop.is_set():
                    return
                spent += _tier(cfg, client, journal, keys[tier], judge_key, c, tier, progress)
        finally:
            budget.settle(reserve, spent)
        progress.tick("prompts")

    previous = signal.getsignal(signal.SIGINT) if _main_thread() else None

    def interrupt(signum: int, frame: Any) -> None:
        stop.set()
        print("\nlabel: stopping after the calls in flight (journal kept)", file=sys.stderr)

    if _main_thread():
        signal.signal(signal.SIGINT, interrupt)
    try:
        with futures.ThreadPoolExecutor(cfg.request.concurrency, "tierpick-label") as pool_:
            list(pool_.map(unit, sample))
    finally:
        if _main_thread():
            signal.signal(signal.SIGINT, previous)
        client.close()
        journal.close()
        if progress.out is not None:
            progress.out.write("\r" + progress.line() + "\n")
    result = _write_outputs(
        out, cfg, sample, journal, budget, drawn, left_for_budget, in_flight, stop.is_set(), started
    )
    if on_outcomes is not None:
        on_outcomes(result)
    return result


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _final(rec: dict[str, Any] | None, retry: bool, answer_stage: bool = False) -> bool:
    """Whether a journalled step needs no new call: it succeeded, or it failed for good (a
    failure is tried again with ``--retry-problems``). An answer counts as final only when it
    failed (a good answer still needs its grade)."""
    if rec is None:
        return False
    if rec["kind"] == "problem":
        return not retry
    return not answer_stage


def _tier(
    cfg: LabelConfig,
    client: Client,
    journal: Journal,
    key: str | None,
    judge_key: str | None,
    c: Candidate,
    tier: str,
    progress: Progress,
) -> float:
    """One tier of one prompt: its answer (unless journalled) then its grade; returns what was
    spent."""
    endpoint = cfg.tiers[tier]
    spent = 0.0
    answer = journal.done.get((c.id, tier, "answer"))
    if answer is None or answer["kind"] == "problem":
        journal.write({"kind": "start", "id": c.id, "tier": tier, "stage": "answer"})
        try:
            a = client.chat(
                endpoint, key, [{"role": "user", "content": c.prompt}], cfg.request.max_tokens
            )
        except CallFailed as exc:
            journal.write(_problem(c.id, tier, "answer", exc.reason, exc.cost_usd))
            progress.tick("problems")
            return exc.cost_usd
        answer = {
            "kind": "answer",
            "id": c.id,
            "tier": tier,
            "stage": "answer",
            "answer": a.text,
            "input_tokens": a.input_tokens,
            "output_tokens": a.output_tokens,
            "cost_usd": round(a.cost_usd, 8),
            "usage_estimated": a.estimated,
            "attempts": a.attempts,
        }
        journal.write(answer)
        spent += a.cost_usd
        progress.tick("answers")
    journal.write({"kind": "start", "id": c.id, "tier": tier, "stage": "grade"})
    try:
        g = judge_answer(
            client,
            cfg.judge,
            judge_key,
            c.prompt,
            answer["answer"],
            c.reference,
            tier,
            endpoint.model,
        )
    except CallFailed as exc:
        journal.write(_problem(c.id, tier, "grade", exc.reason, exc.cost_usd))
        progress.tick("problems")
        return spent + exc.cost_usd
    journal.write(
        {
            "kind": "grade",
            "id": c.id,
            "tier": tier,
            "stage": "grade",
            "score": g.score,
            "grade": g.grade,
            "rationale": g.rationale,
            "cost_usd": round(g.cost_usd, 8),
        }
    )
    progress.tick("grades")
    return spent + g.cost_usd


def _problem(pid: str, tier: str, stage: str, reason: str, cost: float) -> dict[str, Any]:
    return {
        "kind": "problem",
        "id": pid,
        "tier": tier,
        "stage": stage,
        "reason": reason,
        "cost_usd": round(cost, 8),
    }


def _sampled_row(s: Sampled) -> dict[str, Any]:
    c = s.candidate
    return {
        "id": c.id,
        "prompt": c.prompt,
        "reference": c.reference,
        "task": c.task,
        "log_tier": c.tier,
        "where": c.where,
        "tier": s.tier,
        "cluster": s.cluster,
        "weight": s.weight,
    }


def _sampled_from(r: dict[str, Any]) -> Sampled:
    c = Candidate(r["id"], r["prompt"], r["reference"], r["task"], r["log_tier"], r["where"])
    return Sampled(c, r["tier"], int(r["cluster"]), float(r["weight"]))


def _write_outputs(
    out: Path,
    cfg: LabelConfig,
    sample: list[Sampled],
    journal: Journal,
    budget: Budget,
    drawn: dict[str, Any],
    left_for_budget: list[str],
    in_flight: int,
    interrupted: bool,
    started: float,
) -> LabelResult:
    outcomes, problems = [], []
    reasons: Counter[str] = Counter()
    graded: Counter[str] = Counter()
    success: Counter[str] = Counter()
    complete = 0
    for s in sample:
        c = s.candidate
        tiers_done = 0
        for tier, endpoint in cfg.tiers.items():
            a = journal.done.get((c.id, tier, "answer"))
            g = journal.done.get((c.id, tier, "grade"))
            bad = next((r for r in (a, g) if r is not None and r["kind"] == "problem"), None)
            if bad is not None:
                problems.append(
                    {
                        "prompt_id": c.id,
                        "tier": tier,
                        "stage": bad["stage"],
                        "reason": bad["reason"],
                        "where": c.where,
                    }
                )
                reasons[f"{bad['stage']}: {bad['reason'].split(':')[0]}"] += 1
                continue
            if a is None or g is None:
                continue
            tiers_done += 1
            graded[tier] += 1
            success[tier] += g["score"]
            outcomes.append(
                {
                    "prompt_id": c.id,
                    "prompt": c.prompt,
                    "model": endpoint.model,
                    "tier": tier,
                    "score": g["score"],
                    "grade": g["grade"],
                    "answer": a["answer"],
                    "rationale": g["rationale"],
                    "task": c.task or f"cluster-{s.cluster:02d}",
                    "source": f"label-{cfg.name}",
                    "weight": s.weight,
                    "stratum_tier": s.tier,
                    "input_tokens": a["input_tokens"],
                    "output_tokens": a["output_tokens"],
                    "cost_usd": a["cost_usd"],
                    "judge_cost_usd": g["cost_usd"],
                }
            )
        complete += tiers_done == len(cfg.tiers)
    budget_left = set(left_for_budget)
    for pid in sorted(budget_left):
        problems.append(
            {"prompt_id": pid, "tier": None, "stage": "budget", "reason": "budget reached"}
        )
    if budget_left:
        reasons["budget reached (labelled by a rerun with a larger --budget-usd)"] = len(
            budget_left
        )
    _write_jsonl(out / OUTCOMES, outcomes)
    _write_jsonl(out / PROBLEMS, problems)
    sha = hashlib.sha256((out / OUTCOMES).read_bytes()).hexdigest()
    _write_tier_config(out, cfg)
    summary = {
        "name": cfg.name,
        "prompts": len(sample),
        "prompts_graded_on_every_tier": complete,
        "outcomes": len(outcomes),
        "outcomes_sha256": sha,
        "graded": dict(graded),
        "success_rate": {t: round(success[t] / graded[t], 4) for t in graded if graded[t]},
        "problems": dict(reasons),
        "spent_usd": round(budget.spent, 6),
        "budget_usd": budget.cap,
        "calls_sent_again_after_a_kill": in_flight,
        "interrupted": interrupted,
        "seconds": round(time.perf_counter() - started, 1),
        "sample": drawn,
        "config": cfg.public(),
    }
    (out / STATE).write_text(
        json.dumps({"config_fingerprint": _fingerprint(cfg), **summary}, indent=1)
    )
    md = render(summary)
    (out / "label.md").write_text(md, encoding="utf-8")
    return LabelResult(out, summary, md, sha)


def _write_tier_config(out: Path, cfg: LabelConfig) -> None:
    """A tier config over the outcomes (``tierpick adapt --config``, ``train``, ``data build``)."""
    doc = {
        "name": cfg.name,
        "data_root": ".",
        "tiers": [
            {
                "name": t,
                "price_input": e.price_input,
                "price_output": e.price_output,
                "models": [e.model],
            }
            for t, e in cfg.tiers.items()
        ],
        "sources": [{"path": OUTCOMES, "format": "long", "family": cfg.name}],
    }
    header = (
        "# Written by tierpick label: your tiers, models and prices over the graded outcomes.\n"
        "# tierpick adapt --config THIS_FILE --out DIR\n"
    )
    (out / "tiers.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False))


def render(summary: dict[str, Any]) -> str:
    s = summary
    lines = [
        f"# tierpick label: {s['name']}",
        "",
        f"- prompts drawn: {s['prompts']} (from {s['sample'].get('rows', '?')} log rows, "
        f"{s['sample'].get('distinct', '?')} distinct; {s['sample'].get('strata', '?')} strata "
        "of current tier x cluster)",
        f"- graded on every tier: {s['prompts_graded_on_every_tier']}; outcomes: {s['outcomes']}",
        f"- spent: ${s['spent_usd']:.4f}"
        + (f" of a ${s['budget_usd']:.2f} budget" if s["budget_usd"] is not None else ""),
    ]
    if s["calls_sent_again_after_a_kill"]:
        lines.append(
            f"- {s['calls_sent_again_after_a_kill']} call(s) were in flight when an earlier run "
            "was killed: sent again (paid twice)"
        )
    if s["interrupted"]:
        lines.append("- interrupted: rerun the same command to go on")
    for note in s["sample"].get("notes", []):
        lines.append(f"- {note}")
    skipped = s["sample"].get("skipped") or {}
    for reason, n in skipped.items():
        lines.append(f"- log rows skipped: {n} x {reason}")
    for ex in s["sample"].get("skipped_examples") or []:
        lines.append(f"  - {ex}")
    lines += ["", "| tier | graded | success rate |", "|---|---:|---:|"]
    for tier, n in s["graded"].items():
        lines.append(f"| {tier} | {n} | {s['success_rate'].get(tier, 0):.3f} |")
    if s["problems"]:
        lines += ["", "| problem | count |", "|---|---:|"]
        lines += [f"| {r} | {n} |" for r, n in Counter(s["problems"]).most_common()]
    lines += [
        "",
        "Next: `tierpick adapt --config tiers.yaml --out DIR` (in this folder), then "
        "`tierpick report --outcomes outcomes.jsonl --model DIR` for the savings.",
    ]
    return "\n".join(lines) + "\n"
