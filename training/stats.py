"""Dataset statistics: what was read, what was dropped and why, and how the tiers' labels look."""

from __future__ import annotations

import collections
from typing import Any

import pyarrow as pa

from tierpick.classifier.table import format_table
from tierpick.training.dataset import BuiltDataset


def _tier_means(
    table: pa.Table, tiers: tuple[str, ...], groups: list[str]
) -> dict[str, tuple[int, dict[str, float]]]:
    """Per group: its prompt count and each tier's mean target where it has one."""
    sums: dict[str, dict[str, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    counts = collections.Counter(groups)
    for tier in tiers:
        for g, y, m in zip(
            groups,
            table[f"target_{tier}"].to_pylist(),
            table[f"mask_{tier}"].to_pylist(),
            strict=True,
        ):
            if m:
                sums[g][tier].append(y)
    return {
        g: (counts[g], {t: sum(v) / len(v) for t, v in by_tier.items()})
        for g, by_tier in sums.items()
    }


def tier_means_by_source(table: pa.Table, tiers: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Mean target of each tier over the prompts where it has an outcome, per primary source
    (and over all prompts, as ``(all)``)."""
    sources = table["source"].to_pylist()
    means = {g: m for g, (_, m) in _tier_means(table, tiers, sources).items()}
    means["(all)"] = _tier_means(table, tiers, ["(all)"] * len(sources))["(all)"][1]
    return means


def tier_means_by_task(
    table: pa.Table, tiers: tuple[str, ...]
) -> dict[str, tuple[int, dict[str, float]]]:
    """Per ``source/task``: its prompt count and each tier's mean target where it has one."""
    groups = [
        f"{s}/{t}"
        for s, t in zip(table["source"].to_pylist(), table["task"].to_pylist(), strict=True)
    ]
    return _tier_means(table, tiers, groups)


ORDER_TOLERANCE = 0.005  # a smaller lead of a cheaper tier is a tie, not a broken order


def tier_order_warnings(table: pa.Table, tiers: tuple[str, ...]) -> list[str]:
    """Warn where a cheaper tier's mean success beats a dearer one's on the same source, or on
    one task of a source."""
    warnings = []
    tasks = tier_means_by_task(table, tiers)
    counts = {g: n for g, (n, _) in tasks.items()}
    by_task = sorted((g, means) for g, (_, means) in tasks.items())
    groups = sorted(tier_means_by_source(table, tiers).items()) + by_task
    for src, means in groups:
        size = f" ({counts[src]} prompts)" if src in counts else ""
        present = [t for t in tiers if t in means]
        for i, cheap in enumerate(present):
            for dear in present[i + 1 :]:
                if means[cheap] > means[dear] + ORDER_TOLERANCE:
                    warnings.append(
                        f"tier order: on {src}{size}, cheaper tier {cheap!r} ({means[cheap]:.3f}) "
                        f"outscores dearer tier {dear!r} ({means[dear]:.3f}); cheapest-tier "
                        "routing will rarely pick the dearer one"
                    )
    return warnings


def stats_report(ds: BuiltDataset) -> tuple[str, dict[str, Any]]:
    """Render the stats tables for a built dataset; also return them as a JSON-able dict."""
    tiers, table, outcomes, rep = ds.tiers, ds.table, ds.outcomes, ds.report
    parts: list[str] = []

    # Rows per source and model.
    per_model: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
    for src, model, tier, score in zip(
        outcomes["source"].to_pylist(),
        outcomes["model"].to_pylist(),
        outcomes["tier"].to_pylist(),
        outcomes["score"].to_pylist(),
        strict=True,
    ):
        per_model[(src, model, tier or "(none)")].append(score)
    model_rows = [
        [src, model, tier, len(v), sum(v) / len(v)]
        for (src, model, tier), v in sorted(per_model.items())
    ]
    parts.append(
        format_table(
            ["source", "model", "tier", "rows", "mean score"],
            model_rows,
            "Outcome rows per source and model",
        )
    )

    # Distinct prompts and outcomes per source and task.
    prompts_per = collections.Counter(
        zip(table["source"].to_pylist(), table["task"].to_pylist(), strict=True)
    )
    outcomes_per = collections.Counter(
        zip(outcomes["source"].to_pylist(), outcomes["task"].to_pylist(), strict=True)
    )
    parts.append(
        format_table(
            ["source", "task", "outcome rows", "dataset prompts"],
            [[s, t, n, prompts_per.get((s, t), 0)] for (s, t), n in sorted(outcomes_per.items())],
            "Rows per source and task",
        )
    )

    # Dropped rows and notes.
    dropped = rep.get("dropped_by_reason", {})
    by_file: dict[tuple[str, str], int] = collections.Counter()
    for p in rep.get("dropped_rows", []):
        file = p["origin"].split("!")[0].rsplit("[", 1)[0].rsplit(":", 1)[0]
        by_file[(file, p["reason"])] += 1
    drop_rows = [[reason, file, n] for (file, reason), n in sorted(by_file.items())]
    drop_rows += [[f"(kept) {reason}", "", n] for reason, n in sorted(rep.get("notes", {}).items())]
    parts.append(
        format_table(
            ["dropped / noted", "file", "rows"],
            drop_rows or [["none", "", 0]],
            f"Dropped rows by reason ({sum(dropped.values())} dropped)",
        )
    )

    # Per-tier label balance.
    n = table.num_rows
    tier_rows = []
    for tier in tiers:
        mask = table[f"mask_{tier}"].to_pylist()
        ys = [y for y, m in zip(table[f"target_{tier}"].to_pylist(), mask, strict=True) if m]
        tier_rows.append(
            [
                tier,
                len(ys),
                1 - len(ys) / n if n else 0.0,
                sum(ys) / len(ys) if ys else None,
                sum(y >= 0.5 for y in ys) / len(ys) if ys else None,
            ]
        )
    parts.append(
        format_table(
            ["tier", "prompts", "masked frac", "mean target", "share >= 0.5"],
            tier_rows,
            f"Per-tier labels ({n} prompts)",
        )
    )

    means = tier_means_by_source(table, tiers)
    parts.append(
        format_table(
            ["source", *tiers],
            [[src, *[means[src].get(t) for t in tiers]] for src in sorted(means)],
            "Mean tier success per source (tiers cheapest first)",
        )
    )

    splits = rep.get("splits", {})
    summary = [
        ["outcome rows read", rep.get("outcome_rows")],
        ["distinct prompts (after dedupe)", rep.get("distinct_prompts")],
        ["outcome rows merged into existing prompts", rep.get("duplicate_outcome_rows_merged")],
        ["repeated (prompt, model) outcomes averaged", rep.get("repeated_model_outcomes_averaged")],
        ["prompts with no outcome from a tier model", rep.get("prompts_without_tier_outcome")],
        *[
            [
                f"decontaminated by {d['eval_set']} "
                f"({d['method']}, {d['eval_prompts']} eval prompts)",
                d["matched"],
            ]
            for d in rep.get("decontamination", [])
        ],
        *[[f"split {k}", v] for k, v in sorted(splits.items())],
        ["dataset rows", table.num_rows],
    ]
    parts.append(format_table(["what", "count"], summary, "Dataset"))

    warnings = [*rep.get("warnings", []), *tier_order_warnings(table, tiers)]
    if warnings:
        parts.append("Warnings\n" + "\n".join(f"- {w}" for w in warnings))
    parts.append(f"fingerprint {ds.fingerprint}")
    data = {
        "per_model": [
            dict(zip(["source", "model", "tier", "rows", "mean_score"], r, strict=True))
            for r in model_rows
        ],
        "dropped_by_reason": dropped,
        "tiers": [
            dict(
                zip(
                    ["tier", "prompts", "masked_fraction", "mean_target", "share_ge_0.5"],
                    r,
                    strict=True,
                )
            )
            for r in tier_rows
        ],
        "tier_means_by_source": means,
        "warnings": warnings,
    }
    return "\n\n".join(parts) + "\n", data
