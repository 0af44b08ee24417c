"""Evaluation report: per-tier discrimination and calibration, routing curves, APGR, CPT, and
reference routers computed in the same run, written as Markdown + JSON + PNG plots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from classifier._table import format_table
from training import metrics

Array = npt.NDArray[np.float64]
# Routers whose per-tier probabilities are judged for AUC/Brier/ECE (the others only route).
PROBABILISTIC = ("student", "student_uncalibrated", "teacher", "tfidf_lr", "category_prior")


@dataclass(frozen=True)
class SplitData:
    """One evaluation split: prompts, tasks, soft targets (0 where masked) and the mask."""

    name: str
    prompts: list[str]
    tasks: list[str]
    targets: Array
    mask: Array


def evaluate_split(
    data: SplitData, routers: Mapping[str, Array], costs: Array, tiers: Sequence[str]
) -> dict[str, Any]:
    """All figures for one split. Routing uses the prompts where every tier has an outcome."""
    out: dict[str, Any] = {"n": len(data.prompts), "per_tier": {}, "routing": {}, "pairs": {}}
    for name, scores in routers.items():
        if name not in PROBABILISTIC:
            continue
        rows = {}
        for j, tier in enumerate(tiers):
            sel = data.mask[:, j] > 0
            y, p = data.targets[sel, j], scores[sel, j]
            rows[tier] = {
                "n": int(sel.sum()),
                "auc": metrics.roc_auc(y, p) if sel.any() else None,
                "brier": metrics.brier(y, p) if sel.any() else None,
                "ece": metrics.ece(y, p) if sel.any() else None,
                "reliability": metrics.reliability(y, p) if sel.any() else [],
            }
        out["per_tier"][name] = rows
    full = data.mask.min(axis=1) > 0
    out["n_routable"] = int(full.sum())
    if full.sum() < 10:
        return out
    q = data.targets[full]
    out["tier_quality"] = {t: float(v) for t, v in zip(tiers, q.mean(axis=0), strict=True)}
    curves = {name: metrics.sweep(s[full], q, costs) for name, s in routers.items()}
    if "student" in routers:
        curves["student_threshold_rule"] = metrics.sweep(
            routers["student"][full], q, costs, rule="threshold"
        )
    curves["best_fixed_mix"] = metrics.mix_curve(q, costs)
    out["curves"] = {
        name: {"cost": c.cost.tolist(), "quality": c.quality.tolist()} for name, c in curves.items()
    }
    for name, curve in curves.items():
        out["routing"][name] = metrics.routing_summary(curve, q)
    for name, scores in routers.items():
        pairs = {}
        for i in range(len(tiers)):
            for j in range(i + 1, len(tiers)):
                pairs[f"{tiers[i]}->{tiers[j]}"] = metrics.pair_apgr(scores[full], q, i, j)
        out["pairs"][name] = pairs
    return out


def write_report(report: dict[str, Any], out_dir: Path, tiers: Sequence[str]) -> Path:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out_dir, tiers)
    slim = json.loads(json.dumps(report, default=float))
    (out_dir / "report.json").write_text(json.dumps(slim, indent=2) + "\n", encoding="utf-8")
    md = render_markdown(report, tiers, plots)
    (out_dir / "report.md").write_text(md, encoding="utf-8")
    return out_dir / "report.md"


def render_markdown(report: dict[str, Any], tiers: Sequence[str], plots: Sequence[str] = ()) -> str:
    parts = [f"# Evaluation: {report.get('model_version', '')}", ""]
    for key in ("data_fingerprint", "default_cost_weight", "train_seconds"):
        if key in report:
            parts.append(f"- {key.replace('_', ' ')}: {report[key]}")
    cal = report.get("calibration_ece")
    if cal:
        parts += [
            "",
            "## Calibration (student, ECE on the test split)",
            "```",
            format_table(
                ["tier", "before", "after"], [[t, cal["before"][t], cal["after"][t]] for t in tiers]
            ),
            "```",
        ]
    for split, res in report.get("splits", {}).items():
        parts += [
            "",
            f"## Split `{split}`: {res['n']} prompts, {res.get('n_routable', 0)} with "
            "an outcome for every tier",
            "",
        ]
        rows = []
        for name, per in res["per_tier"].items():
            rows.append(
                [
                    name,
                    *[per[t]["auc"] for t in tiers],
                    *[per[t]["ece"] for t in tiers],
                    *[per[t]["brier"] for t in tiers],
                ]
            )
        parts += [
            "Per-tier ROC AUC / ECE / Brier (masked cells excluded):",
            "```",
            format_table(
                [
                    "router",
                    *[f"auc {t}" for t in tiers],
                    *[f"ece {t}" for t in tiers],
                    *[f"brier {t}" for t in tiers],
                ],
                rows,
            ),
            "```",
        ]
        if res.get("routing"):
            quality = res["tier_quality"]
            parts.append(
                "Tier quality on routable prompts: "
                + ", ".join(f"{t} {quality[t]:.3f}" for t in tiers)
            )
            pair_names = list(next(iter(res["pairs"].values())).keys())
            rrows = []
            for name, s in res["routing"].items():
                pairs = res["pairs"].get(name, {})
                rrows.append(
                    [
                        name,
                        s["apgr"],
                        s["cpt50"],
                        s["cpt80"],
                        s["cost_at_95pct_top"],
                        s["cost_at_100pct_top"],
                        *[pairs[p]["apgr"] if p in pairs else None for p in pair_names],
                    ]
                )
            parts += [
                "",
                "Routing by the utility rule swept over the cost weight (the student also by the "
                "threshold rule); cost normalized: 0 = cheapest tier only, 1 = dearest only; "
                "pairwise APGR as RouteLLM defines it:",
                "```",
                format_table(
                    [
                        "router",
                        "N-tier APGR",
                        "CPT(50%)",
                        "CPT(80%)",
                        "cost@95% top",
                        "cost@100% top",
                        *[f"APGR {p}" for p in pair_names],
                    ],
                    rrows,
                ),
                "```",
            ]
    if plots:
        parts += ["", "## Plots", *[f"![{p}]({p})" for p in plots]]
    return "\n".join(parts) + "\n"


def _plots(report: dict[str, Any], out_dir: Path, tiers: Sequence[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for split, res in report.get("splits", {}).items():
        if res.get("curves"):
            fig, ax = plt.subplots(figsize=(6.5, 4.5))
            for name, c in res["curves"].items():
                style = "--" if name in ("random", "oracle", "best_fixed_mix") else "-"
                ax.plot(c["cost"], c["quality"], style, label=name, lw=1.4)
            ax.set_xlabel("normalized cost (0 = cheapest tier, 1 = dearest)")
            ax.set_ylabel("mean success")
            ax.set_title(f"Routing quality vs cost ({split})")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            name = f"routing_{split}.png"
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=110)
            plt.close(fig)
            names.append(name)
        per = res["per_tier"]
        if "student" in per:
            fig, axes = plt.subplots(1, len(tiers), figsize=(4 * len(tiers), 3.8), squeeze=False)
            for ax, tier in zip(axes[0], tiers, strict=True):
                for name in ("student_uncalibrated", "student"):
                    rel = per.get(name, {}).get(tier, {}).get("reliability", [])
                    if rel:
                        ax.plot(
                            [r["mean_p"] for r in rel],
                            [r["mean_y"] for r in rel],
                            "o-",
                            label=name,
                            ms=3,
                        )
                ax.plot([0, 1], [0, 1], "k:", lw=1)
                ax.set_title(f"{tier} ({split})")
                ax.set_xlabel("predicted p")
                ax.set_ylabel("observed success")
                ax.legend(fontsize=7)
            name = f"reliability_{split}.png"
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=110)
            plt.close(fig)
            names.append(name)
    return names
