"""Evaluation report: per-tier discrimination and calibration, routing curves, APGR, CPT, and
reference routers computed in the same run, written as Markdown + JSON + PNG plots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierpick.classifier.routing import rescale, utility_choice
from tierpick.classifier.table import format_table
from tierpick.training import metrics

Array = npt.NDArray[np.float64]
# Routers whose per-tier probabilities are judged for AUC/Brier/ECE (the others only route).
PROBABILISTIC = ("student", "student_uncalibrated", "teacher", "knn", "tfidf_lr", "category_prior")


@dataclass(frozen=True)
class SplitData:
    """One evaluation split: prompts, tasks, families, soft targets (0 where masked), the mask."""

    name: str
    prompts: list[str]
    tasks: list[str]
    targets: Array
    mask: Array
    families: list[str] = field(default_factory=list)

    def subset(self, keep: npt.NDArray[np.bool_], name: str | None = None) -> SplitData:
        idx = np.flatnonzero(keep)
        return SplitData(
            name or self.name,
            [self.prompts[i] for i in idx],
            [self.tasks[i] for i in idx],
            self.targets[idx],
            self.mask[idx],
            [self.families[i] for i in idx] if self.families else [],
        )


MIN_GROUP = 30  # prompts of one tier pattern needed to route on it


def tier_groups(
    mask: Array, min_prompts: int = MIN_GROUP
) -> list[tuple[tuple[int, ...], npt.NDArray[np.int64]]]:
    """Prompts grouped by which tiers have an outcome (two or more), largest group first;
    groups under ``min_prompts`` are left out. Sources with different model sets (one without a
    frontier model, say) are routed on the tiers they measured."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(mask > 0):
        tiers = tuple(int(j) for j in np.flatnonzero(row))
        if len(tiers) >= 2:
            groups.setdefault(tiers, []).append(i)
    out = [
        (t, np.array(idx, dtype=np.int64)) for t, idx in groups.items() if len(idx) >= min_prompts
    ]
    return sorted(out, key=lambda g: (-len(g[1]), g[0]))


def evaluate_split(
    data: SplitData,
    routers: Mapping[str, Array],
    costs: Array,
    tiers: Sequence[str],
    default_cost_weight: float | None = None,
) -> dict[str, Any]:
    """All figures for one split.

    Per tier: AUC, ECE, Brier and the mean predicted probability against the observed success,
    over the prompts with an outcome for that tier. Routing: per group of prompts with outcomes
    for the same tiers (:func:`tier_groups`), every router's cost-quality curve under the
    utility rule (costs rescaled to the group's tiers), the student's under the threshold rule,
    and the best fixed mix of the group's tiers; the headline N-tier APGR is the prompt-weighted
    mean over the groups. With ``default_cost_weight``, the student's default policy as it
    serves: the tier each prompt gets, among the tiers its group measured.
    """
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
                "mean_p": float(p.mean()) if sel.any() else None,
                "mean_y": float(y.mean()) if sel.any() else None,
                "reliability": metrics.reliability(y, p) if sel.any() else [],
            }
        out["per_tier"][name] = rows
    full = data.mask.min(axis=1) > 0
    out["n_routable"] = int(full.sum())
    groups = []
    for group_tiers, idx in tier_groups(data.mask):
        cols = np.array(group_tiers, dtype=np.int64)
        q = data.targets[idx[:, None], cols]
        if q.mean(axis=0)[-1] - q.mean(axis=0)[0] < metrics.MIN_GAP:
            continue  # the dearest tier is no better here: nothing to recover
        c = rescale(costs[cols])
        curves = {name: metrics.sweep(s[idx[:, None], cols], q, c) for name, s in routers.items()}
        if "student" in routers:
            curves["student_threshold_rule"] = metrics.sweep(
                routers["student"][idx[:, None], cols], q, c, rule="threshold"
            )
        curves["best_fixed_mix"] = metrics.mix_curve(q, c)
        group: dict[str, Any] = {
            "tiers": [tiers[j] for j in cols],
            "n": len(idx),
            "tier_quality": {
                tiers[int(j)]: float(v) for j, v in zip(cols, q.mean(axis=0), strict=True)
            },
            "routing": {name: metrics.routing_summary(cv, q) for name, cv in curves.items()},
            "curves": {
                name: {"cost": cv.cost.tolist(), "quality": cv.quality.tolist()}
                for name, cv in curves.items()
            },
        }
        if default_cost_weight is not None and "student" in routers:
            chosen = utility_choice(
                routers["student"][idx[:, None], cols], costs[cols], default_cost_weight
            )
            share = np.bincount(chosen, minlength=len(cols)) / len(idx)
            quality = float(q[np.arange(len(idx)), chosen].mean())
            group["default_policy"] = {
                "share": {tiers[int(j)]: float(v) for j, v in zip(cols, share, strict=True)},
                "quality": quality,
                "pgr": float(metrics.pgr(np.array([quality]), q.mean(0)[0], q.mean(0)[-1])[0]),
                "cost": float(c[chosen].mean()),
            }
        groups.append(group)
    out["groups"] = groups
    if groups:
        weights = np.array([g["n"] for g in groups], dtype=np.float64)
        for name in groups[0]["routing"]:
            apgr = np.array([g["routing"][name]["apgr"] for g in groups])
            out["routing"][name] = {
                "apgr": float(apgr @ weights / weights.sum()),
                # the figures that only make sense on one curve: of the largest group
                **{k: v for k, v in groups[0]["routing"][name].items() if k != "apgr"},
            }
        if all("default_policy" in g for g in groups):
            w = weights / weights.sum()
            shares: dict[str, float] = dict.fromkeys(tiers, 0.0)
            for g, wi in zip(groups, w, strict=True):
                for t, v in g["default_policy"]["share"].items():
                    shares[t] += wi * v
            out["default_policy"] = {
                "cost_weight": default_cost_weight,
                "share": shares,
                "pgr": float(
                    sum(wi * g["default_policy"]["pgr"] for g, wi in zip(groups, w, strict=True))
                ),
            }
        out["curves"] = groups[0]["curves"]
        out["curves_tiers"] = groups[0]["tiers"]
    pair_scores = dict(routers)
    if "student" in routers:
        # the threshold rule between two tiers sends a prompt to the dearer one when the cheaper
        # one's probability is low: rank by 1 - p(cheaper) alone
        pair_scores["student_threshold_rule"] = routers["student"]
    for name, scores in pair_scores.items():
        pairs = {}
        for i in range(len(tiers)):
            for j in range(i + 1, len(tiers)):
                both = (data.mask[:, i] > 0) & (data.mask[:, j] > 0)
                s = scores[both]
                if name == "student_threshold_rule":
                    s = np.zeros_like(s)
                    s[:, j] = 1 - scores[both, i]
                pairs[f"{tiers[i]}->{tiers[j]}"] = (
                    metrics.pair_apgr(s, data.targets[both], i, j)
                    if both.sum() >= MIN_GROUP
                    else {"apgr": None, "cpt50": None, "cpt80": None}
                )
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


ROUTING_ROWS = ("student", "best_fixed_mix", "knn", "teacher", "tfidf_lr", "category_prior")


def family_tables(families: Mapping[str, Any], tiers: Sequence[str]) -> list[str]:
    """Markdown tables of per-family figures (leave-one-family-out, or a split by family)."""
    shown = [r for r in ROUTING_ROWS if any(r in f["routing"] for f in families.values())]
    rows = []
    for fam, res in families.items():
        groups = ", ".join(f"{'+'.join(g['tiers'])} ({g['n']})" for g in res["groups"])
        rows.append(
            [fam, res["n"], groups or "-"]
            + [res["routing"].get(r, {}).get("apgr") for r in shown]
            + [res["routing"].get("student_threshold_rule", {}).get("apgr")]
        )
    scored = [f for f in families.values() if f["routing"]]
    if scored:
        rows.append(
            ["mean", sum(f["n"] for f in families.values()), ""]
            + [float(np.mean([f["routing"][r]["apgr"] for f in scored])) for r in shown]
            + [float(np.mean([f["routing"]["student_threshold_rule"]["apgr"] for f in scored]))]
        )
    out = [
        "N-tier APGR (utility rule swept over the cost weight; prompts routed in groups on the "
        "tiers they have outcomes for, weighted by prompts; 0.5 = random, the best fixed mix "
        "knows the family's tier means):",
        "```",
        format_table(
            ["family", "prompts", "tiers routed (prompts)", *shown, "student threshold rule"],
            rows,
        ),
        "```",
    ]
    rows = []
    for fam, res in families.items():
        per = res["per_tier"]
        row: list[object] = [fam]
        for name in ("student", "teacher", "knn", "tfidf_lr"):
            if name in per:
                row.append("/".join(_f(per[name][t]["auc"]) for t in tiers))
        row.append("/".join(_f(per["student"][t]["ece"]) for t in tiers))
        row.append(
            "/".join(
                f"{_f(per['student'][t]['mean_p'])} vs {_f(per['student'][t]['mean_y'])}"
                for t in tiers
            )
        )
        rows.append(row)
    names = [
        n
        for n in ("student", "teacher", "knn", "tfidf_lr")
        if n in next(iter(families.values()))["per_tier"]
    ]
    tier_names = "/".join(tiers)
    out += [
        "",
        "Per-tier AUC, the student's ECE and its mean probability vs the observed success "
        f"({tier_names}):",
        "```",
        format_table(
            ["family", *[f"AUC {n}" for n in names], "ECE student", "mean p vs observed"], rows
        ),
        "```",
    ]
    rows = []
    pair_names = list(next(iter(families.values()))["pairs"].get("student", {}))
    for fam, res in families.items():
        dp = res.get("default_policy")
        pairs = res["pairs"]
        rows.append(
            [fam]
            + (["/".join(_f(dp["share"][t]) for t in tiers), dp["pgr"]] if dp else ["-", None])
            + [
                f"{_f(pairs['student'][p]['apgr'])} / "
                f"{_f(pairs.get('student_threshold_rule', {}).get(p, {}).get('apgr'))}"
                for p in pair_names
            ]
        )
    out += [
        "",
        "The student's default policy (utility rule at the default cost weight): share of prompts "
        f"per tier ({tier_names}) and PGR; two-tier APGR per pair of tiers, by the default "
        "rule (the probability difference) / by the threshold rule (the cheaper tier's "
        "probability alone):",
        "```",
        format_table(["family", "default policy share", "default policy PGR", *pair_names], rows),
        "```",
    ]
    return out


def _f(value: object) -> str:
    return "-" if value is None else f"{float(value):.3f}"  # type: ignore[arg-type]


def render_markdown(report: dict[str, Any], tiers: Sequence[str], plots: Sequence[str] = ()) -> str:
    parts = [f"# Evaluation: {report.get('model_version', '')}", ""]
    for key in ("data_fingerprint", "default_cost_weight", "train_seconds"):
        if key in report:
            parts.append(f"- {key.replace('_', ' ')}: {report[key]}")
    if report.get("warning"):
        parts += ["", f"**Warning: {report['warning']}**"]
    loso = report.get("loso", {}).get("families")
    if loso:
        parts += [
            "",
            "## Leave one family out: traffic the model has never seen",
            "",
            "For each source family, the whole pipeline (student distillation on the other "
            "families' texts, tier heads, calibration, default cost weight, every reference) "
            "is trained without any of the family's prompts and evaluated on all of them.",
            "",
            *family_tables(loso, tiers),
        ]
    by_family = report.get("test_by_family")
    if by_family:
        parts += [
            "",
            "## In distribution: the test split by family",
            "",
            *family_tables(by_family, tiers),
        ]
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
            groups = ", ".join(
                f"{'+'.join(g['tiers'])}: {g['n']} prompts, quality "
                + "/".join(f"{v:.3f}" for v in g["tier_quality"].values())
                for g in res["groups"]
            )
            parts.append(f"Routed in groups by the tiers measured: {groups}.")
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
                "threshold rule). N-tier APGR: weighted over the groups; CPT and cost at 95%/100% "
                "of the top tier's quality: on the largest group "
                f"({'+'.join(res['groups'][0]['tiers'])}), "
                "cost normalized 0 = its cheapest tier, 1 = its dearest; pairwise APGR as RouteLLM "
                "defines it, over the prompts with both tiers:",
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
            dp = res.get("default_policy")
            if dp:
                parts.append(
                    f"Default policy (cost weight {dp['cost_weight']:.4g}): "
                    + ", ".join(f"{t} {v:.1%}" for t, v in dp["share"].items())
                    + f" of prompts, PGR {dp['pgr']:.3f}."
                )
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
            # the model under evaluation drawn last, thick and on top: with eight references
            # on one plot it was hidden under them
            curves = sorted(res["curves"].items(), key=lambda kv: kv[0] == "student")
            for name, c in curves:
                if name == "student":
                    ax.plot(
                        c["cost"],
                        c["quality"],
                        "-",
                        color="black",
                        lw=2.6,
                        zorder=10,
                        label="student (this model)",
                    )
                    continue
                style = "--" if name in ("random", "oracle", "best_fixed_mix") else "-"
                ax.plot(c["cost"], c["quality"], style, label=name, lw=1.0, alpha=0.75)
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
