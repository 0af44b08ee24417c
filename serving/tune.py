"""``tierpick tune``: the routing policy that meets a budget on a user's own traffic.

The model's probabilities were calibrated on public benchmarks, so what share of a user's
prompts a given ``cost_weight`` or ``min_success`` sends to each tier is unknown until it is
measured on their prompts. ``tune`` scores a prompt log (``tierpick score``'s readers and
engines), then sweeps the policy's one knob over a grid, routing every prompt with the same
:class:`~tierpick.classifier.routing.Router` the service uses, and keeps the policy with the
highest predicted success among those that meet every constraint:

- ``max_share``: at most this share of the log's prompts on a tier (``frontier=0.2``);
- ``budget_per_1k``: at most this many USD per 1,000 requests, costed as ``tierpick report``
  does (input tokens from the prompt's length, a fixed number of output tokens, the model's
  prices);
- ``min_quality``: a predicted success at least this fraction of always-the-dearest-tier's
  ("quality at least 95% of always-frontier"); given alone, the cheapest policy that meets it
  is kept instead.

Only the policy is chosen; the model is untouched. The policy file it writes is read by
``tierpick serve --policy``, the gateway config (``policy: FILE``) and
:func:`tierpick.read_policy` for ``TierClassifier.route``. With ``holdout``, the policy is chosen
on a random part of the log and its tier mix measured on the rest, which says how far the
constraint can be trusted on next week's traffic.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierpick.classifier import RoutingPolicy, TierClassifier
from tierpick.classifier.errors import ConfigError, MissingDependencyError, TierpickError
from tierpick.classifier.routing import CHARS_PER_TOKEN, OUTPUT_TOKENS, RULE_KNOB
from tierpick.serving.report import Costs, read_scored
from tierpick.serving.scoring import ScoreOptions, score

RULES = ("utility", "threshold")
# the knob's grid: the utility rule's cost_weight spans where a probability gap (0-1) meets a
# normalized cost gap (0-1): 0, then 601 points from 0.001 to 1,000 (geometric); the threshold
# rule's min_success every 0.005
COST_WEIGHTS = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 601)])
THRESHOLDS = np.round(np.arange(1, 201) * 0.005, 3)


@dataclass(frozen=True)
class Constraint:
    """What the chosen policy must meet on the log: tier shares and a spend at most, a
    predicted success at least ``min_quality`` times always-the-dearest-tier's. With only a
    quality floor the cheapest policy that meets it is chosen; otherwise the one with the
    highest predicted success."""

    max_share: dict[str, float] = field(default_factory=dict)  # tier -> share of prompts
    budget_per_1k: float | None = None  # USD per 1,000 requests
    min_quality: float | None = None  # of always-the-dearest-tier's predicted success
    top_success: float = math.nan  # always-the-dearest-tier's, on the log (set by choose)

    def check(self, tiers: tuple[str, ...]) -> None:
        if not self.max_share and self.budget_per_1k is None and self.min_quality is None:
            raise ConfigError(
                "give at least one --max-share TIER=SHARE, --budget-per-1k USD or "
                "--min-quality FRACTION"
            )
        for tier, share in self.max_share.items():
            if tier not in tiers:
                raise ConfigError(f"--max-share {tier}: not a tier of the model {list(tiers)}")
            if not 0.0 <= share <= 1.0:  # NaN too
                raise ConfigError(f"--max-share {tier}={share}: a share must be in [0, 1]")
        if self.budget_per_1k is not None and not 0.0 <= self.budget_per_1k < math.inf:
            raise ConfigError(f"--budget-per-1k must be >= 0 and finite, got {self.budget_per_1k}")
        if self.min_quality is not None and not 0.0 < self.min_quality <= 1.0:
            raise ConfigError(f"--min-quality must be in (0, 1], got {self.min_quality}")

    @property
    def cheapest_first(self) -> bool:
        """Only a quality floor: the cheapest policy meeting it is the one wanted."""
        return self.min_quality is not None and not self.max_share and self.budget_per_1k is None

    def met_by(self, summary: dict[str, Any]) -> bool:
        if any(summary["mix"][t] > s + 1e-12 for t, s in self.max_share.items()):
            return False
        if self.min_quality is not None and (
            summary["predicted_success"] < self.min_quality * self.top_success - 1e-12
        ):
            return False
        return self.budget_per_1k is None or per_1k(summary) <= self.budget_per_1k + 1e-12

    def describe(self) -> str:
        parts = [f"{t} <= {s:.1%} of calls" for t, s in self.max_share.items()]
        if self.budget_per_1k is not None:
            parts.append(f"<= ${self.budget_per_1k:g} per 1,000 requests")
        if self.min_quality is not None:
            parts.append(
                f"predicted success >= {self.min_quality:.1%} of always-the-dearest-tier's"
            )
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "max_share": dict(self.max_share),
            "budget_per_1k_usd": self.budget_per_1k,
            "min_quality": self.min_quality,
        }


def per_1k(summary: dict[str, Any]) -> float:
    return float(summary["cost_per_1m_requests_usd"]) / 1000.0


def parse_share(text: str) -> tuple[str, float]:
    """``TIER=SHARE`` (a fraction, or a percentage such as ``20%``)."""
    tier, sep, value = text.partition("=")
    if not sep or not tier:
        raise ConfigError(f"--max-share {text!r}: write TIER=SHARE, e.g. frontier=0.2")
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise ConfigError(f"--max-share {text!r}: {value!r} is not a number") from None
    if not 0.0 <= share <= 1.0:  # NaN too
        raise ConfigError(f"--max-share {text!r}: the share must be in [0, 1] (or 0-100%)")
    return tier.strip(), share


@dataclass
class Tuned:
    """The chosen policy, its figures, and the whole swept curve."""

    policy: RoutingPolicy
    rule: str
    chosen: dict[str, Any]  # figures on the rows it was chosen on
    curve: list[dict[str, Any]]  # one entry per grid point: knob, figures, meets
    index: int  # the chosen point in ``curve``
    always: dict[str, dict[str, Any]]  # "always <tier>" figures on the same rows
    constraint: Constraint
    rows: int
    holdout: dict[str, Any] | None = None  # figures on the held-out rows
    holdout_rows: int = 0


def _policy(base: RoutingPolicy, rule: str, knob: float) -> RoutingPolicy:
    if rule == "utility":
        return replace(base, min_success=0.0, cost_weight=knob)
    return replace(base, min_success=knob)


def sweep(
    costs: Costs, clf: TierClassifier, rule: str, base: RoutingPolicy
) -> list[tuple[float, dict[str, Any]]]:
    """Every grid value of ``rule``'s knob (``base`` fixes the other fields) and its figures,
    routed by the model's own :class:`Router` (a policy the model refuses raises PolicyError)."""
    if rule not in RULES:
        raise ConfigError(f"--rule {rule!r} is not one of {list(RULES)}")
    grid = COST_WEIGHTS if rule == "utility" else THRESHOLDS
    return [(float(k), route(costs, clf, _policy(base, rule, float(k)))) for k in grid]


def route(costs: Costs, clf: TierClassifier, policy: RoutingPolicy) -> dict[str, Any]:
    chosen, _ = clf.router(policy).choose(costs.proba)
    return costs.summarize(chosen)


def _refine(
    costs: Costs,
    clf: TierClassifier,
    constraint: Constraint,
    rule: str,
    base: RoutingPolicy,
    points: list[tuple[float, dict[str, Any]]],
    steps: int = 30,
) -> list[tuple[float, dict[str, Any]]]:
    """Where the grid crosses the constraint's boundary, bisect the knob between the two grid
    points, so that the chosen policy comes as close to the budget as the log allows (a grid
    step can move a tier's share by a few points)."""
    found = []
    for (k0, s0), (k1, s1) in itertools.pairwise(points):
        ok0, ok1 = constraint.met_by(s0), constraint.met_by(s1)
        if ok0 == ok1:
            continue
        good, bad = (k0, k1) if ok0 else (k1, k0)
        best = (good, s0 if ok0 else s1)
        for _ in range(steps):
            mid = math.sqrt(good * bad) if rule == "utility" and good > 0 else (good + bad) / 2
            summary = route(costs, clf, _policy(base, rule, mid))
            if constraint.met_by(summary):
                good, best = mid, (mid, summary)
            else:
                bad = mid
        found.append(best)
    return found


def choose(
    costs: Costs,
    clf: TierClassifier,
    constraint: Constraint,
    rule: str = "utility",
    base: RoutingPolicy | None = None,
) -> Tuned:
    """The policy with the highest predicted success (with a quality floor alone: the
    cheapest) that meets ``constraint`` on ``costs``
    (ties: the cheaper), from a grid of the knob refined where it crosses the constraint's
    boundary; a constraint no policy meets is an error that says how close the cheapest came."""
    constraint.check(clf.tiers)
    base = base or RoutingPolicy()
    dearest = np.full(len(costs), len(clf.tiers) - 1, dtype=np.int64)
    constraint = replace(constraint, top_success=costs.summarize(dearest)["predicted_success"])
    points = sweep(costs, clf, rule, base)
    points = sorted(points + _refine(costs, clf, constraint, rule, base, points))
    curve = [{"knob": k, **s, "meets": constraint.met_by(s)} for k, s in points]
    feasible = [i for i, c in enumerate(curve) if c["meets"]]
    if not feasible:
        cheapest = min((s for _, s in points), key=per_1k)
        mix = ", ".join(f"{t} {v:.1%}" for t, v in cheapest["mix"].items())
        likeliest = max(s["predicted_success"] for _, s in points)
        raise TierpickError(
            f"no {rule} policy meets {constraint.describe()} on this log; the cheapest one "
            f"routes {mix} at ${per_1k(cheapest):.4g} per 1,000 requests, and the best "
            f"predicted success is {likeliest / constraint.top_success:.1%} of "
            "always-the-dearest-tier's"
        )
    if constraint.cheapest_first:
        best = min(feasible, key=lambda i: (per_1k(curve[i]), -curve[i]["predicted_success"]))
    else:
        best = max(feasible, key=lambda i: (curve[i]["predicted_success"], -per_1k(curve[i])))
    always = {
        f"always {t}": costs.summarize(np.full(len(costs), k, dtype=np.int64))
        for k, t in enumerate(clf.tiers)
    }
    policy = _policy(base, rule, points[best][0])
    return Tuned(policy, rule, points[best][1], curve, best, always, constraint, len(costs))


def _knob(policy: RoutingPolicy, rule: str) -> float:
    return float(policy.cost_weight if rule == "utility" else policy.min_success)  # type: ignore[arg-type]


def split_rows(n: int, holdout: float, seed: int) -> tuple[npt.NDArray[np.int64], ...]:
    """A random (choose, held out) split of ``n`` rows."""
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"--holdout must be in [0, 1), got {holdout}")
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    cut = n - round(n * holdout)
    if holdout > 0 and (cut < 1 or cut == n):
        raise ConfigError(f"--holdout {holdout} leaves no rows on one side of {n} routed rows")
    return np.sort(order[:cut]), np.sort(order[cut:])


def tune(
    costs: Costs,
    clf: TierClassifier,
    constraint: Constraint,
    rule: str = "utility",
    base: RoutingPolicy | None = None,
    holdout: float = 0.0,
    seed: int = 0,
) -> Tuned:
    """:func:`choose` on the log's rows (less a random ``holdout`` share), then the chosen
    policy's figures on the held-out rows."""
    pick, held = split_rows(len(costs), holdout, seed)
    result = choose(costs.subset(pick), clf, constraint, rule, base)
    if len(held):
        chosen, _ = clf.router(result.policy).choose(costs.proba[held])
        result.holdout = costs.subset(held).summarize(chosen)
        result.holdout_rows = len(held)
    return result


def score_log(
    inputs: list[str],
    clf: TierClassifier,
    opts: ScoreOptions,
    workers: int | None,
    engine: str,
    work: Path,
) -> Path:
    """Score raw logs into ``work`` with ``tierpick score``'s engines; the scored path."""
    one_file = len(inputs) == 1 and Path(inputs[0]).is_file()
    out = work / ("scored.parquet" if one_file else "scored")
    opts = replace(opts, out_kind=".parquet")
    score(inputs, out, clf, opts, workers=workers, engine=engine)
    return out


def reference_prompts(clf: TierClassifier) -> list[str]:
    """The training prompts the artifact keeps as its reference (near its centroids), the
    traffic a plain target is translated on before there is a log.

    Raises:
        ConfigError: the model has none (exported before references were added).
    """
    prompts = clf.reference.prompts if clf.reference is not None else []
    if not prompts:
        raise ConfigError(
            f"model {clf.version} has no reference prompts (reference.npz): give a prompt log"
        )
    return prompts


def reference_log(clf: TierClassifier, folder: Path) -> Path:
    """:func:`reference_prompts` as a JSONL prompt log in ``folder``."""
    path = folder / "reference-prompts.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for prompt in reference_prompts(clf):
            fh.write(json.dumps({"prompt": prompt}) + "\n")
    return path


def render_markdown(t: Tuned, source: str, clf: TierClassifier) -> str:
    tiers = list(clf.tiers)
    knob = RULE_KNOB[t.rule]
    head = "| | " + " | ".join(tiers) + " | USD per 1k requests | predicted success |"
    rule = "|---|" + "---:|" * (len(tiers) + 2)

    def row(name: str, s: dict[str, Any]) -> str:
        return (
            f"| {name} | "
            + " | ".join(f"{s['mix'][x]:.1%}" for x in tiers)
            + f" | {per_1k(s):.4g} | {s['predicted_success']:.3f} |"
        )

    lines = [
        f"# Tuned policy: {source}",
        "",
        f"Model `{clf.manifest.model_name}` {clf.version}; constraint: {t.constraint.describe()}.",
        f"Chosen: **{t.rule} rule, {knob} = {_knob(t.policy, t.rule):.4g}**, the "
        + ("cheapest" if t.constraint.cheapest_first else "highest predicted success")
        + f" of the {sum(c['meets'] for c in t.curve)} policies tried (of {len(t.curve)}: a "
        "grid of the knob, refined where it crosses the constraint) that meet the constraint.",
        "",
        head,
        rule,
        row(f"chosen, on the {t.rows:,} rows it was chosen on", t.chosen),
    ]
    if t.holdout is not None:
        lines.append(row(f"chosen, on {t.holdout_rows:,} held-out rows", t.holdout))
    lines += [row(name, s) for name, s in t.always.items()]
    if t.holdout is not None:
        lines += ["", *_held_out_shares(t)]
    lines += [
        "",
        f"## The curve around the chosen point ({knob}; distinct routings only)",
        "",
        f"| {knob} | " + " | ".join(tiers) + " | USD per 1k | predicted success | meets |",
        "|---:|" + "---:|" * (len(tiers) + 3),
    ]
    for c in _around(t.curve, t.index):
        mark = "**" if c is t.curve[t.index] else ""
        lines.append(
            f"| {mark}{c['knob']:.4g}{mark} | "
            + " | ".join(f"{c['mix'][x]:.1%}" for x in tiers)
            + f" | {per_1k(c):.4g} | {c['predicted_success']:.3f} | "
            + ("yes" if c["meets"] else "no")
            + " |"
        )
    lines.append("")
    return "\n".join(lines)


def _around(curve: list[dict[str, Any]], index: int, k: int = 5) -> list[dict[str, Any]]:
    """Up to ``k`` distinct routings on each side of the chosen point."""

    def key(c: dict[str, Any]) -> tuple[float, ...]:
        return tuple(round(v, 6) for v in c["mix"].values())

    out = [curve[index]]
    for step in (-1, 1):
        seen = {key(curve[index])}
        i = index + step
        while 0 <= i < len(curve) and len(seen) <= k:
            if key(curve[i]) not in seen:
                seen.add(key(curve[i]))
                out.append(curve[i])
            i += step
    return sorted(out, key=lambda c: c["knob"])


def plot(t: Tuned, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError(
            f"the tuning curve PNG needs matplotlib (pip install 'tierpick[report]'): {exc}"
        ) from exc
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ok = [c for c in t.curve if c["meets"]]
    no = [c for c in t.curve if not c["meets"]]
    for points, color, label in ((no, "0.7", "fails the constraint"), (ok, "C0", "meets it")):
        ax.scatter(
            [per_1k(c) for c in points],
            [c["predicted_success"] for c in points],
            s=8,
            color=color,
            label=label,
        )
    for i, (name, s) in enumerate(t.always.items()):
        ax.scatter([per_1k(s)], [s["predicted_success"]], marker="s", color=f"C{i + 2}", label=name)
    chosen = t.curve[t.index]
    ax.scatter(
        [per_1k(chosen)],
        [chosen["predicted_success"]],
        marker="*",
        s=160,
        color="C1",
        label=f"chosen ({t.rule} {_knob(t.policy, t.rule):.3g})",
    )
    ax.set_xlabel("USD per 1,000 requests")
    ax.set_ylabel("predicted success")
    ax.set_title(f"Policies swept over {t.rows:,} prompts: {t.constraint.describe()}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tuned_record(
    t: Tuned, clf: TierClassifier, source: str, assumptions: dict[str, Any]
) -> dict[str, Any]:
    """What the policy file records of how its policy was chosen."""
    return {
        "model": {"name": clf.manifest.model_name, "version": clf.version},
        "log": source,
        "rule": t.rule,
        "constraint": t.constraint.to_json(),
        "rows": t.rows,
        "chosen_on_log": _figures(t.chosen),
        "held_out": None if t.holdout is None else {"rows": t.holdout_rows, **_figures(t.holdout)},
        "assumptions": assumptions,
    }


def _figures(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "mix": {k: round(v, 6) for k, v in s["mix"].items()},
        "usd_per_1k_requests": round(per_1k(s), 6),
        "predicted_success": round(s["predicted_success"], 6),
    }


def wilson(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score 95% interval of a share observed on ``n`` rows."""
    if n <= 0:
        return 0.0, 1.0
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _held_out_shares(t: Tuned) -> list[str]:
    """Each capped tier's share on the held-out rows with its 95% interval, and whether the cap
    holds there (a 20% cap chosen on one half came out at 22% on the other, with no word)."""
    assert t.holdout is not None
    out = []
    for tier, cap in t.constraint.max_share.items():
        share = t.holdout["mix"][tier]
        lo, hi = wilson(share, t.holdout_rows)
        verdict = (
            "within the cap"
            if share <= cap
            else "over the cap, within sampling noise"
            if lo <= cap
            else "OVER THE CAP beyond sampling noise: choose on more rows or a lower cap"
        )
        out.append(
            f"Held-out share of {tier}: {100 * share:.1f}% (95% interval {100 * lo:.1f}-"
            f"{100 * hi:.1f}%, {t.holdout_rows:,} rows) against the cap {100 * cap:.0f}%: "
            f"{verdict}."
        )
    return out


def run_tune(
    inputs: list[str],
    clf: TierClassifier,
    constraint: Constraint,
    *,
    scored: bool = False,
    rule: str = "utility",
    base: RoutingPolicy | None = None,
    holdout: float = 0.0,
    seed: int = 0,
    opts: ScoreOptions | None = None,
    workers: int | None = None,
    engine: str = "local",
    output_tokens: int = OUTPUT_TOKENS,
    chars_per_token: float = CHARS_PER_TOKEN,
    out: Path | None = None,
    report_dir: Path | None = None,
) -> tuple[Tuned, str, str | None]:
    """The whole command: score (unless ``scored``), tune, write the policy file and the report.
    Returns the result, its Markdown, and a note when the PNG could not be drawn."""
    from tierpick.classifier.settings import write_policy

    constraint.check(clf.tiers)  # before any scoring work
    Costs.check_assumptions(output_tokens, chars_per_token)
    opts = opts or ScoreOptions()
    source = ", ".join(inputs) if len(inputs) <= 3 else f"{inputs[0]} and {len(inputs) - 1} more"
    with tempfile.TemporaryDirectory(prefix="tierpick-tune-") as work:
        if not inputs:  # no log yet: the model's own reference training prompts stand for one
            if scored:
                raise ConfigError("--scored needs the scored log as INPUT")
            inputs, source = (
                [str(reference_log(clf, Path(work)))],
                (f"the model's {len(reference_prompts(clf))} reference training prompts"),
            )
            opts = replace(opts, prompt_field="prompt")
        if scored:
            if len(inputs) != 1:
                raise ConfigError("--scored takes one scored file or directory")
            path = Path(inputs[0])
        else:
            path = score_log(inputs, clf, opts, workers, engine, Path(work))
        try:
            log = read_scored(path, clf.tiers, opts.prompt_field, opts.output_prefix)
        except TierpickError as exc:
            if scored:
                raise
            # the scored copy is this command's own temporary file: name the user's log
            raise TierpickError(
                f"{source}: nothing to tune on ({str(exc).replace(str(path), 'its scores')})"
            ) from exc
        log.check_model(clf, path)
    costs = Costs.of(log, clf, output_tokens, chars_per_token)
    result = tune(costs, clf, constraint, rule, base, holdout, seed)
    md = render_markdown(result, source, clf)
    errors = len(log.tier) - len(costs)
    if errors:
        md += f"\n{errors:,} rows of the log could not be scored (error rows) and are left out.\n"
    note = None
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        try:
            plot(result, report_dir / "tune_curve.png")
            md += "\n![policies swept](tune_curve.png)\n"
        except MissingDependencyError as exc:
            note = str(exc)
        (report_dir / "tune.md").write_text(md, encoding="utf-8")
    if out is not None:
        assumptions = {
            "input_tokens": f"ceil(prompt characters / {chars_per_token:g})",
            "output_tokens_per_call": output_tokens,
            "error_rows_left_out": errors,
        }
        write_policy(out, result.policy, tuned_record(result, clf, source, assumptions))
    return result, md, note


__all__ = ["Constraint", "Tuned", "choose", "parse_share", "run_tune", "tune"]
