"""The default rule, chosen on traffic the model did not see.

Two measurements per candidate rule:

- **leave one family out**: each family's prompts routed by the model trained without it
  (``tierpick train`` exports each fold to ``<workdir>/loso-models``: ``<family>.npz`` holds the
  held-out probabilities, targets and mask), the rule's knob swept over its whole range; N-tier
  APGR per family and its mean, computed as the model's evaluation computes it (per group of
  prompts with outcomes for the same tiers, prompt-weighted);
- **first impression**: the hand-written set in ``training/first_impression`` (50 trivially easy
  prompts a user expects on ``local``, 50 research-level ones expected on ``frontier``; see its
  RUBRIC.md), routed by the shipped model: the share of each that lands where expected, at the
  rule's default setting and at the setting that meets the targets best.

Candidates: ``utility`` (the highest p - cost_weight x normalized cost: the served default),
``threshold`` (the cheapest tier reaching min_success), ``margin`` (the cheapest tier within d
of the best tier's probability), ``centered`` (the cheapest tier whose probability exceeds
that tier's mean over the training prompts by d: absolute levels, each tier against its own)
and ``local floor`` (the utility rule, but the cheapest tier whenever its own probability is at
least 1 - 4 x cost_weight: a threshold for the free tier tied to the one knob, which at the
default weight sends a prompt there from p = 0.46).

``python -m tierpick.training.default_rule build/model/loso-models --model models/default``
(run by ``make model``) prints the tables and, with ``--report``, writes them into REPORT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierpick import classifier
from tierpick.classifier.routing import rescale, threshold_choice, utility_choice
from tierpick.classifier.table import format_table
from tierpick.training import metrics
from tierpick.training.evaluate import tier_groups

Array = npt.NDArray[np.float64]
Choice = Callable[[Array, Array, float, Array], npt.NDArray[np.int64]]
FIRST_IMPRESSION = Path(__file__).resolve().parent / "first_impression" / "prompts.jsonl"
TARGETS = {"local": 0.90, "frontier": 0.70}  # share of the easy / hard prompts, at least


FLOOR_SLOPE = 4.0  # local floor: the cheapest tier from p >= 1 - FLOOR_SLOPE x cost_weight


def _local_floor(p: Array, c: Array, weight: float) -> npt.NDArray[np.int64]:
    chosen = np.where(p[:, 0] >= 1 - FLOOR_SLOPE * weight, 0, utility_choice(p, c, weight))
    return chosen.astype(np.int64)


def _cheapest_reaching(values: Array, floor: Array) -> npt.NDArray[np.int64]:
    """The cheapest tier whose value reaches its floor, else the dearest."""
    ok = values >= floor
    chosen: npt.NDArray[np.int64] = np.where(
        ok.any(axis=1), np.argmax(ok, axis=1), values.shape[1] - 1
    ).astype(np.int64)
    return chosen


@dataclass(frozen=True)
class Rule:
    """A routing rule with one knob: ``choose(proba, costs, knob, tier_means)``."""

    name: str
    knob: str
    grid: Array
    choose: Choice


RULES = (
    Rule(
        "utility", "cost_weight", metrics.COST_WEIGHTS, lambda p, c, v, m: utility_choice(p, c, v)
    ),
    Rule(
        "threshold", "min_success", metrics.THRESHOLDS, lambda p, c, v, m: threshold_choice(p, v)[0]
    ),
    Rule(
        "margin",
        "d",
        np.linspace(0.0, 1.0, 401),
        lambda p, c, v, m: _cheapest_reaching(p, p.max(axis=1, keepdims=True) - v),
    ),
    Rule(
        "centered",
        "d",
        np.linspace(-1.0, 1.0, 801),
        lambda p, c, v, m: _cheapest_reaching(p - m, np.full_like(p, v)),
    ),
    Rule(
        "local floor",
        "cost_weight",
        metrics.COST_WEIGHTS,
        lambda p, c, v, m: _local_floor(p, c, v),
    ),
)


def read_folds(loso_dir: Path) -> dict[str, dict[str, Array]]:
    """Every ``<family>.npz`` of a ``loso-models`` folder: proba, targets, mask."""
    folds = {}
    for path in sorted(loso_dir.glob("*.npz")):
        with np.load(path) as d:
            folds[path.stem] = {
                k: np.asarray(d[k], dtype=np.float64) for k in ("proba", "targets", "mask")
            }
    if not folds:
        raise SystemExit(f"{loso_dir}: no <family>.npz (run `tierpick train` with loso on)")
    return folds


def fold_apgr(fold: Mapping[str, Array], rule: Rule, costs: Array, means: Array) -> float | None:
    """The rule's N-tier APGR on one held-out family, its knob swept over ``rule.grid``."""
    total, weighted = 0, 0.0
    for group, idx in tier_groups(fold["mask"]):
        cols = np.array(group, dtype=np.int64)
        q = fold["targets"][idx[:, None], cols]
        if q.mean(axis=0)[-1] - q.mean(axis=0)[0] < metrics.MIN_GAP:
            continue
        c, p = rescale(costs[cols]), fold["proba"][idx[:, None], cols]
        rows = np.arange(len(idx))
        points = sorted(
            (float(c[ch].mean()), float(q[rows, ch].mean()))
            for ch in (rule.choose(p, c, float(v), means[cols]) for v in rule.grid)
        )
        gain = metrics.pgr(np.array([y for _, y in points]), q.mean(0)[0], q.mean(0)[-1])
        weighted += metrics.area(np.array([x for x, _ in points]), gain) * len(idx)
        total += len(idx)
    return weighted / total if total else None


def first_impression(
    proba: Array, expect: list[str], tiers: tuple[str, ...], rule: Rule, costs: Array, means: Array
) -> dict[str, Any]:
    """Where the set lands at each setting of the rule: the share of the easy prompts on the
    cheapest tier and of the hard ones on the dearest, and the setting that meets the targets
    best (the largest worst margin over the two)."""
    easy = np.array([e == tiers[0] for e in expect])
    best: dict[str, Any] | None = None
    for v in rule.grid:
        chosen = rule.choose(proba, costs, float(v), means)
        to_cheap = float((chosen[easy] == 0).mean())
        to_dear = float((chosen[~easy] == len(tiers) - 1).mean())
        margin = min(to_cheap - TARGETS["local"], to_dear - TARGETS["frontier"])
        if best is None or margin > best["margin"]:
            best = {"setting": float(v), "easy": to_cheap, "hard": to_dear, "margin": margin}
    assert best is not None
    return best


def run(loso_dir: Path, model: str | None) -> dict[str, Any]:
    clf = classifier.load(model)
    tiers = clf.tiers
    costs = clf.router(classifier.RoutingPolicy()).costs
    folds = read_folds(loso_dir)
    # each tier's mean probability over the held-out prompts of every fold (the centered rule)
    means = np.concatenate([f["proba"] for f in folds.values()]).mean(axis=0)
    rows = [json.loads(line) for line in FIRST_IMPRESSION.read_text().splitlines() if line]
    expect = [r["expect"] for r in rows]
    proba = np.asarray(clf.predict_proba([r["prompt"] for r in rows]), dtype=np.float64)
    default = clf.route([r["prompt"] for r in rows])
    easy = [d.tier for d, e in zip(default, expect, strict=True) if e == tiers[0]]
    hard = [d.tier for d, e in zip(default, expect, strict=True) if e == tiers[-1]]
    p_cheap = proba[:, 0]
    is_easy = np.array([e == tiers[0] for e in expect])
    out: dict[str, Any] = {
        "model_version": clf.version,
        "first_impression_p_cheapest": {  # where the model puts the set, on the cheapest tier
            "easy_median": float(np.median(p_cheap[is_easy])),
            "easy_p10": float(np.percentile(p_cheap[is_easy], 10)),
            "hard_median": float(np.median(p_cheap[~is_easy])),
            "hard_p90": float(np.percentile(p_cheap[~is_easy], 90)),
            "auc": float(metrics.roc_auc(is_easy.astype(np.float64), p_cheap) or 0.0),
        },
        "tiers": list(tiers),
        "tier_means": means.tolist(),
        "default_policy": {
            "rule": "utility",
            "cost_weight": clf.manifest.default_cost_weight,
            "easy": {t: easy.count(t) / len(easy) for t in tiers},
            "hard": {t: hard.count(t) / len(hard) for t in tiers},
        },
        "rules": {},
    }
    for rule in RULES:
        per_family = {f: fold_apgr(fold, rule, costs, means) for f, fold in folds.items()}
        scored = [v for v in per_family.values() if v is not None]
        out["rules"][rule.name] = {
            "knob": rule.knob,
            "loso": per_family,
            "loso_mean": float(np.mean(scored)) if scored else None,
            "first_impression": first_impression(proba, expect, tiers, rule, costs, means),
        }
    return out


def render(res: Mapping[str, Any]) -> str:
    tiers = res["tiers"]
    fams = list(next(iter(res["rules"].values()))["loso"])
    head = [
        "rule",
        *fams,
        "LOSO mean",
        "knob: best for first impression",
        "easy -> local",
        "hard -> frontier",
    ]
    table = []
    for name, r in res["rules"].items():
        fi = r["first_impression"]
        table.append(
            [
                name,
                *(f"{r['loso'][f]:.3f}" if r["loso"][f] is not None else "-" for f in fams),
                f"{r['loso_mean']:.3f}",
                f"{r['knob']} = {fi['setting']:.3g}",
                f"{fi['easy']:.0%}",
                f"{fi['hard']:.0%}",
            ]
        )
    d = res["default_policy"]
    lines = [
        "# Default rule: leave one family out, and first impressions",
        "",
        f"Model {res['model_version']}. Per rule: N-tier APGR of each held-out family, routed by "
        "the fold's model with the rule's knob swept, and the first-impression set "
        "(training/first_impression: 50 trivially easy prompts expected on "
        f"{tiers[0]}, 50 research-level ones on {tiers[-1]}; targets "
        f"{TARGETS['local']:.0%} and {TARGETS['frontier']:.0%}) routed by this model at the "
        "rule's setting that meets them best.",
        "",
        "```",
        format_table(head, table),
        "```",
        "",
        f"The default policy (utility, cost_weight {d['cost_weight']:.4g}): easy prompts "
        + ", ".join(f"{t} {v:.0%}" for t, v in d["easy"].items())
        + "; hard prompts "
        + ", ".join(f"{t} {v:.0%}" for t, v in d["hard"].items())
        + ".",
        "",
        *_choice(res),
    ]
    return "\n".join(lines) + "\n"


def _choice(res: Mapping[str, Any]) -> list[str]:
    """The reading of the table: which rule leads on traffic the model did not see, which meet
    both first-impression targets and at what leave-one-family-out cost, and why."""
    rules = res["rules"]
    best = max(rules, key=lambda r: rules[r]["loso_mean"])
    meets = [
        r
        for r, v in rules.items()
        if v["first_impression"]["easy"] >= TARGETS["local"]
        and v["first_impression"]["hard"] >= TARGETS["frontier"]
    ]
    runner = sorted((v["loso_mean"], r) for r, v in rules.items() if r != best)[-1]
    fi, d = res["first_impression_p_cheapest"], res["default_policy"]
    cheap, dear = res["tiers"][0], res["tiers"][-1]
    lines = [
        f"Choice: on traffic the model did not see, **{best}** leads (LOSO mean "
        f"{rules[best]['loso_mean']:.3f}; next, {runner[1]}, {runner[0]:.3f})"
        + (
            ", and it is the served default. "
            if best == res["default_policy"]["rule"]
            else f"; the served default is {res['default_policy']['rule']}: it should change. "
        )
        + (
            "Rules that meet both first-impression targets at some setting: "
            + ", ".join(f"{r} (LOSO {rules[r]['loso_mean']:.3f})" for r in meets)
            + f"; none keeps the leader's {rules[best]['loso_mean']:.3f}."
            if meets and best not in meets
            else f"{best} also meets both first-impression targets."
            if best in meets
            else "No rule meets both first-impression targets at any setting."
        ),
        "",
        f"Why: the set's easy prompts get p({cheap}) {fi['easy_median']:.2f} at the median "
        f"(10th percentile {fi['easy_p10']:.2f}), the research-level ones {fi['hard_median']:.2f} "
        f"(90th percentile {fi['hard_p90']:.2f}). The model ranks them apart (AUC "
        f"{fi['auc']:.2f} on p({cheap})), but a probability calibrated on benchmark prompts "
        f"of {fi['easy_median']:.2f} says the {cheap} tier fails "
        f"{1 - fi['easy_median']:.0%} of prompts like these, and a rule that decides on "
        f"differences between tiers (utility) takes {cheap} only where the next tier adds almost "
        "nothing. Rules that decide on levels reach the targets and route held-out traffic "
        "worse; what would move both is outcomes of trivially easy prompts to train on, which "
        "the public data lacks and `label` + `adapt` give a team. The default policy sends "
        f"{d['hard'][dear]:.0%} of the research-level set to {dear} (target "
        f"{TARGETS['frontier']:.0%}) and {d['easy'][cheap]:.0%} of the easy set to {cheap} "
        f"(target {TARGETS['local']:.0%}).",
    ]
    return lines


def put_beside_loso(report: Path, md: str) -> None:
    """``md`` as the report's section right after its leave-one-family-out section (an earlier
    copy of it removed first)."""
    section = "#" + md.rstrip() + "\n"  # one level down in the report
    text = report.read_text(encoding="utf-8")

    def span(head: str) -> tuple[int, int] | None:
        start = text.find(head)
        if start < 0:
            return None
        end = text.find("\n## ", start + len(head))
        return start, (end + 1 if end >= 0 else len(text))

    old = span(section.splitlines()[0])
    if old is not None:
        text = text[: old[0]] + text[old[1] :]
    loso = span("## Leave one family out")
    at = loso[1] if loso is not None else len(text)
    text = text[:at].rstrip() + "\n\n" + section + "\n" + text[at:].lstrip()
    report.write_text(text.rstrip() + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("loso_dir", help="<workdir>/loso-models of a `tierpick train` run")
    ap.add_argument(
        "--model", help="the model whose first impressions are measured (default: shipped)"
    )
    ap.add_argument("--out", help="directory for default_rule.md and default_rule.json")
    ap.add_argument("--report", help="also write the table into this REPORT.md")
    args = ap.parse_args(argv)
    res = run(Path(args.loso_dir), args.model)
    md = render(res)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "default_rule.json").write_text(json.dumps(res, indent=1))
        (out / "default_rule.md").write_text(md)
    if args.report:
        put_beside_loso(Path(args.report), md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
