"""``tierpick report --outcomes``: what a routing policy saves on a team's own graded outcomes,
with bootstrap 95% intervals, before the team switches it on.

The outcomes are long rows (``tierpick label`` writes them): ``prompt_id``, ``tier``, ``score``
in [0, 1], and where known ``cost_usd`` (the answer's real cost), ``input_tokens`` and
``output_tokens`` (else the cost is estimated from the prompt's length and ``output_tokens`` at
the model's prices), ``weight`` (a stratified sample's weight back to the traffic; 1 when
absent) and ``prompt``. Only prompts graded on every tier count: on them the routed tier's
real outcome and cost are known, as are always-one-tier's.

For the policy, and for always sending every prompt to each tier: the weighted mean cost per
request and the weighted mean quality (score); then cost and quality relative to
always-frontier (the dearest tier) and always-mid, each with a 95% percentile interval from
``resamples`` bootstrap resamples of the prompts ("-62% cost [-66, -58], quality 97% [95, 99] of
always-frontier"). The same resample serves every row, so the intervals of differences are
paired.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from tierpick.classifier import RoutingPolicy, TierClassifier
from tierpick.classifier.errors import ConfigError, MissingDependencyError, TierpickError
from tierpick.classifier.files import open_text
from tierpick.classifier.routing import CHARS_PER_TOKEN, OUTPUT_TOKENS
from tierpick.classifier.table import format_table

RESAMPLES = 2000


@dataclass
class Graded:
    """Prompts graded on every tier: text, per-tier score and cost, weight."""

    prompts: list[str]
    score: np.ndarray  # (n, tiers)
    cost: np.ndarray  # (n, tiers) USD per call
    weight: np.ndarray  # (n,)
    dropped: dict[str, int]
    estimated_cost: bool


def read_outcomes(path: Path, clf: TierClassifier) -> Graded:
    """Read long outcome rows; every malformed row is an error with its line."""
    tiers = clf.tiers
    index = {t: i for i, t in enumerate(tiers)}
    rows: dict[str, dict[str, Any]] = defaultdict(dict)
    text: dict[str, str] = {}
    weight: dict[str, float] = {}
    estimated = False
    p_in = np.array([t.price_input for t in clf.manifest.tiers])
    p_out = np.array([t.price_output for t in clf.manifest.tiers])
    try:
        fh = open_text(path, "r")
    except OSError as exc:
        raise ConfigError(f"--outcomes {path}: {exc.strerror or exc}") from exc
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise TierpickError(f"{where}: not a JSON object ({exc})"[:300]) from exc
            if not isinstance(row, dict):
                raise TierpickError(f"{where}: not a JSON object")
            pid, tier, score = row.get("prompt_id"), row.get("tier"), row.get("score")
            if not isinstance(pid, str | int) or isinstance(pid, bool):
                raise TierpickError(f"{where}: 'prompt_id' missing or not a string")
            if tier not in index:
                raise TierpickError(
                    f"{where}: 'tier' {str(tier)[:50]!r} is not one of the model's tiers "
                    f"{list(tiers)} (outcomes written by tierpick label carry it)"
                )
            if (
                isinstance(score, bool)
                or not isinstance(score, int | float)
                or not 0.0 <= score <= 1.0
            ):
                raise TierpickError(
                    f"{where}: 'score' must be a number in [0, 1], got {score!r}"[:300]
                )
            j = index[str(tier)]
            cost = row.get("cost_usd")
            if not _number(cost):
                tin = row.get("input_tokens")
                if not _number(tin):
                    prompt = row.get("prompt")
                    tin = math.ceil(len(prompt) / CHARS_PER_TOKEN) if isinstance(prompt, str) else 0
                tout = row.get("output_tokens")
                tout = tout if _number(tout) else OUTPUT_TOKENS
                cost = (float(tin) * p_in[j] + float(tout) * p_out[j]) / 1e6
                estimated = True
            w = row.get("weight", 1.0)
            if not _number(w) or float(w) <= 0:
                raise TierpickError(f"{where}: 'weight' must be a positive number, got {w!r}"[:300])
            key = str(pid)
            rows[key][str(tier)] = (float(score), float(cost))
            weight[key] = float(w)
            if isinstance(row.get("prompt"), str):
                text[key] = row["prompt"]
    complete = [k for k, v in rows.items() if len(v) == len(tiers) and k in text]
    dropped = {
        "not graded on every tier": sum(1 for v in rows.values() if len(v) < len(tiers)),
        "no prompt text": sum(1 for k, v in rows.items() if len(v) == len(tiers) and k not in text),
    }
    if not complete:
        raise TierpickError(
            f"{path}: no prompt is graded on every tier {list(tiers)} with its text "
            f"({sum(dropped.values())} prompts read)"
        )
    score = np.array([[rows[k][t][0] for t in tiers] for k in complete])
    cost = np.array([[rows[k][t][1] for t in tiers] for k in complete])
    return Graded(
        [text[k] for k in complete],
        score,
        cost,
        np.array([weight[k] for k in complete]),
        {k: v for k, v in dropped.items() if v},
        estimated,
    )


def _number(value: object) -> TypeGuard[float]:
    """A finite number >= 0 (not a bool)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and value >= 0
    )


def savings(
    graded: Graded,
    clf: TierClassifier,
    policy: RoutingPolicy | None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """The figures of the module: per row (policy, always-<tier>) cost and quality, and
    relative to always-frontier and always-mid, with 95% bootstrap intervals."""
    tiers = clf.tiers
    router = clf.router(policy)
    chosen, _ = router.choose(clf.predict_proba(graded.prompts))
    n = len(chosen)
    rows = np.arange(n)
    per = {"policy": (graded.cost[rows, chosen], graded.score[rows, chosen])}
    for j, t in enumerate(tiers):
        per[f"always {t}"] = (graded.cost[:, j], graded.score[:, j])
    refs = {"frontier": f"always {tiers[-1]}"}
    if len(tiers) >= 3:
        refs["mid"] = f"always {tiers[len(tiers) // 2]}"
    rng = np.random.default_rng(seed)
    w = graded.weight
    draws = rng.integers(0, n, size=(resamples, n))
    wb = w[draws]
    out: dict[str, Any] = {
        "prompts": n,
        "resamples": resamples,
        "policy": {
            "rule": router.rule,
            "cost_weight": router.cost_weight,
            "min_success": router.min_success,
            "allowed_tiers": [t for t, ok in zip(tiers, router.allowed, strict=True) if ok],
        },
        "share": {t: float(np.sum(w * (chosen == j)) / np.sum(w)) for j, t in enumerate(tiers)},
        "rows": {},
        "dropped": graded.dropped,
        "cost_estimated": graded.estimated_cost,
        "model_version": clf.version,
    }
    boot = {
        name: (
            np.sum(c[draws] * wb, axis=1) / np.sum(wb, axis=1),
            np.sum(q[draws] * wb, axis=1) / np.sum(wb, axis=1),
        )
        for name, (c, q) in per.items()
    }
    for name, (c, q) in per.items():
        row: dict[str, Any] = {
            "cost_per_1k": 1000 * float(np.sum(c * w) / np.sum(w)),
            "quality": float(np.sum(q * w) / np.sum(w)),
        }
        for ref_name, ref in refs.items():
            rc, rq = per[ref]
            bc, bq = boot[name]
            brc, brq = boot[ref]
            with np.errstate(divide="ignore", invalid="ignore"):
                cost_change = float(np.sum(c * w) / np.sum(rc * w) - 1)
                quality_ratio = float(np.sum(q * w) / np.sum(rq * w))
                row[f"vs_{ref_name}"] = {
                    "cost_change": cost_change,
                    "cost_change_ci": _ci(bc / brc - 1),
                    "quality_ratio": quality_ratio,
                    "quality_ratio_ci": _ci(bq / brq),
                }
        out["rows"][name] = row
    return out


def _ci(values: np.ndarray) -> list[float | None]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return [None, None]
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return [float(lo), float(hi)]


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:+.0f}%"


def _ratio(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def headline(res: dict[str, Any]) -> str:
    """ "-62% cost [-66, -58], quality 97% [95, 99] of always-frontier"."""
    v = res["rows"]["policy"].get("vs_frontier")
    if not v:
        return ""
    (clo, chi), (qlo, qhi) = v["cost_change_ci"], v["quality_ratio_ci"]
    return (
        f"{_pct(v['cost_change'])} cost [{_pct(clo)}, {_pct(chi)}], quality "
        f"{_ratio(v['quality_ratio'])} [{_ratio(qlo)}, {_ratio(qhi)}] of always-frontier"
    )


def render(res: dict[str, Any]) -> str:
    pol = res["policy"]
    rule = (
        f"threshold rule, min_success {pol['min_success']:g}"
        if pol["rule"] == "threshold"
        else f"utility rule, cost_weight {pol['cost_weight']:g}"
    )
    lines = [
        "# Savings on your graded outcomes",
        "",
        f"**The policy ({rule}): {headline(res)}**",
        "",
        f"{res['prompts']} prompts graded on every tier (model {res['model_version']}); "
        f"95% intervals from {res['resamples']} bootstrap resamples of the prompts; rows "
        "weighted back to the traffic by the sample's weights.",
        "Tier mix under the policy: "
        + ", ".join(f"{t} {100 * s:.0f}%" for t, s in res["share"].items())
        + ".",
    ]
    if res["cost_estimated"]:
        lines.append(
            "Some costs are estimated (characters / 4 input tokens, 300 output tokens, the "
            "model's prices): those rows had no cost_usd or token counts."
        )
    for reason, n in res["dropped"].items():
        lines.append(f"Left out: {n} prompts {reason}.")
    headers = ["routing", "USD per 1k requests", "quality", "cost vs always-frontier"]
    headers += ["quality vs always-frontier"]
    has_mid = any("vs_mid" in r for r in res["rows"].values())
    if has_mid:
        headers += ["cost vs always-mid", "quality vs always-mid"]
    table = []
    for name, r in res["rows"].items():
        cells = [name, f"{r['cost_per_1k']:.4f}", f"{r['quality']:.3f}"]
        for ref in ("frontier", "mid") if has_mid else ("frontier",):
            v = r[f"vs_{ref}"]
            (clo, chi), (qlo, qhi) = v["cost_change_ci"], v["quality_ratio_ci"]
            cells.append(f"{_pct(v['cost_change'])} [{_pct(clo)}, {_pct(chi)}]")
            cells.append(f"{_ratio(v['quality_ratio'])} [{_ratio(qlo)}, {_ratio(qhi)}]")
        table.append(cells)
    lines += ["", "```", format_table(headers, table), "```"]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> str | None:
    """Cost and quality of each routing relative to always-frontier, with the intervals, as a
    PNG a manager reads; returns why it was not written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return str(
            MissingDependencyError("the plot needs matplotlib (pip install 'tierpick[report]')")
        )
    names = list(res["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, ci_key, title, scale, base in (
        (axes[0], "cost_change", "cost_change_ci", "Cost vs always-frontier", 100, 0),
        (axes[1], "quality_ratio", "quality_ratio_ci", "Quality vs always-frontier", 100, 0),
    ):
        vals = [res["rows"][n]["vs_frontier"][key] * scale for n in names]
        lo = [res["rows"][n]["vs_frontier"][ci_key][0] for n in names]
        hi = [res["rows"][n]["vs_frontier"][ci_key][1] for n in names]
        err = [
            [
                v - (lo_ or 0) * scale if lo_ is not None else 0
                for v, lo_ in zip(vals, lo, strict=True)
            ],
            [
                (hi_ or 0) * scale - v if hi_ is not None else 0
                for v, hi_ in zip(vals, hi, strict=True)
            ],
        ]
        colors = ["tab:blue" if n == "policy" else "tab:gray" for n in names]
        ax.barh(names, vals, xerr=err, color=colors, capsize=4)
        ax.axvline(base if key == "cost_change" else 100, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("% change" if key == "cost_change" else "% of always-frontier")
        ax.invert_yaxis()
    fig.suptitle(f"Routing on {res['prompts']} graded prompts (95% bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_savings(
    outcomes: Path, out: Path, clf: TierClassifier, policy: RoutingPolicy | None
) -> tuple[str, str | None]:
    graded = read_outcomes(outcomes, clf)
    res = savings(graded, clf, policy)
    out.mkdir(parents=True, exist_ok=True)
    md = render(res)
    (out / "savings.md").write_text(md, encoding="utf-8")
    (out / "savings.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    note = plot(res, out / "savings.png")
    return md, note


__all__ = ["headline", "read_outcomes", "savings", "write_savings"]
