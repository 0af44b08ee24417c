"""``tierpick report SCORED``: what routing a scored prompt log would cost, against always
sending every prompt to one tier.

Reads the output of ``tierpick score`` (a file, or a directory of parts, of any kind it writes)
and the model's manifest for the tier prices (USD per 1M input and output tokens). Assumptions,
stated in the report: a prompt's input tokens are its characters / ``chars_per_token`` (4 by
default, a common rule for English text) rounded up, and every call produces
``output_tokens`` tokens (300 by default). "Predicted success" is the model's own calibrated
probability for the chosen tier, averaged over rows: an estimate, not a measurement.

The cost curve re-routes every row with the threshold rule (the cheapest tier whose probability
reaches t, else the dearest) as t moves from 0 to 1, from the probabilities in the log.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierpick.classifier import TierClassifier
from tierpick.classifier.errors import ConfigError, MissingDependencyError, TierpickError
from tierpick.classifier.files import open_text
from tierpick.classifier.routing import (
    CHARS_PER_TOKEN,
    OUTPUT_TOKENS,
    call_costs,
    clip,
    threshold_choice,
)
from tierpick.serving.scoring import ScoreOptions, expand_inputs, kind_of
from tierpick.serving.scoring.options import MODEL_VERSION

THRESHOLDS = np.round(np.linspace(0.0, 1.0, 51), 2)


@dataclass
class ScoredLog:
    """The columns a report needs, one entry per row of the scored log."""

    chars: npt.NDArray[np.int64]  # prompt length in characters (0 for error rows)
    proba: npt.NDArray[np.float32]  # (n, tiers); NaN for error rows
    tier: npt.NDArray[np.int64]  # index of the routed tier; -1 for error rows
    files: int
    versions: set[str] = field(default_factory=set)  # model versions that scored it (if said)
    sample: list[str] = field(default_factory=list)  # a uniform sample of the routed prompts

    def check_model(self, clf: TierClassifier, where: Path | str) -> None:
        """Refuse a model other than the one that scored the log (a log scored before scoring
        recorded the version is taken as it is)."""
        if self.versions and self.versions != {clf.version}:
            raise TierpickError(
                f"{where} was scored by model version {sorted(self.versions)}, not by "
                f"{clf.version} (--model): give the model that scored it, or score it again"
            )


def read_scored(
    path: Path,
    tiers: tuple[str, ...],
    prompt_field: str = ScoreOptions.prompt_field,
    prefix: str = "",
) -> ScoredLog:
    """Read a scored log; the probability columns must be this model's tiers (named with the
    ``--output-prefix`` the log was scored with)."""
    index = {t: i for i, t in enumerate(tiers)}
    cols = [f"{prefix}p_{t}" for t in tiers]
    chars: list[int] = []
    proba: list[list[float]] = []
    routed: list[int] = []
    versions: set[str] = set()
    sample: list[str] = []  # reservoir sampling, seeded: the same log gives the same sample
    seen = 0
    rng = random.Random(0)
    files, _ = expand_inputs([path])  # a file, or every scored file under a directory
    version_col = f"{prefix}{MODEL_VERSION}"
    for f in files:
        for text, probs, tier, version, where in _rows(
            f, prompt_field, cols, f"{prefix}tier", version_col
        ):
            if isinstance(version, str) and version:
                versions.add(version)
            if tier is None:
                chars.append(0)
                proba.append([math.nan] * len(cols))
                routed.append(-1)
                continue
            if tier not in index:
                raise TierpickError(f"{where}: tier {tier!r} is not one of the model's {tiers}")
            if not all(_probability(p) for p in probs):
                bad = next(p for p in probs if not _probability(p))
                raise TierpickError(
                    f"{where}: a routed row's probability must be a number in [0, 1], got "
                    f"{clip(bad, 50)}"
                )
            chars.append(
                len(text)
                if isinstance(text, str)
                else text
                if isinstance(text, int) and not isinstance(text, bool)
                else 0
            )
            proba.append([float(p) for p in probs])  # type: ignore[arg-type]
            routed.append(index[tier])
            if isinstance(text, str) and text.strip():
                seen += 1
                if len(sample) < DRIFT_SAMPLE:
                    sample.append(text)
                elif (j := rng.randrange(seen)) < DRIFT_SAMPLE:
                    sample[j] = text
    return ScoredLog(
        np.array(chars, dtype=np.int64),
        np.array(proba, dtype=np.float32).reshape(-1, len(cols)),
        np.array(routed, dtype=np.int64),
        len(files),
        versions,
        sample,
    )


DRIFT_SAMPLE = 2000  # prompts of a log whose familiarity the report measures
UNFAMILIAR = 0.05  # a familiarity under this: unlike the training data (see Reference)


def drift(log: ScoredLog, clf: TierClassifier) -> dict[str, Any] | None:
    """How far the log's prompts are from the training data: the familiarity of a uniform
    sample (None when the model has no reference or the log kept no prompt text)."""
    if clf.reference is None or not log.sample:
        return None
    reading = clf.read(log.sample, familiarity=True)
    assert reading.familiarity is not None
    f = reading.familiarity
    return {
        "sampled_prompts": len(f),
        "unfamiliar_share": float((f < UNFAMILIAR).mean()),
        "familiarity_quantiles": {
            str(q): float(np.quantile(f, q)) for q in (0.05, 0.25, 0.5, 0.75)
        },
    }


def _float(text: str | None) -> object:
    """A CSV cell as a float when it reads as one, else as it is (checked by the caller)."""
    try:
        return float(text) if text else None
    except ValueError:
        return text


def _probability(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0.0 <= value <= 1.0  # NaN fails
    )


Record = tuple[object, list[object], str | None, object, str]


def _rows(
    path: Path, prompt_field: str, cols: list[str], tier_col: str, version_col: str
) -> Iterator[Record]:
    """(prompt, probabilities, tier, model version, location) per row of one scored file."""
    kind = kind_of(path)
    needed = [prompt_field, tier_col, *cols]
    if kind == ".parquet":
        import pyarrow.parquet as pq

        if path.stat().st_size == 0:  # a part that had no rows
            return
        pf = pq.ParquetFile(path)
        missing = [c for c in needed if c not in pf.schema_arrow.names]
        if missing:
            raise TierpickError(
                f"{path}: no column(s) {missing}: not scored by this model, or not a scored log"
            )
        row = 0
        has_version = version_col in pf.schema_arrow.names
        for rb in pf.iter_batches(columns=needed + ([version_col] if has_version else [])):
            data = rb.to_pydict()
            versions = data[version_col] if has_version else [None] * rb.num_rows
            for i in range(rb.num_rows):
                yield (
                    data[prompt_field][i],
                    [data[c][i] for c in cols],
                    data[tier_col][i],
                    versions[i],
                    f"{path} row {row + i}",
                )
            row += rb.num_rows
        return
    with open_text(path, "r") as fh:
        if kind == ".csv":
            reader = csv.DictReader(fh)
            missing = [c for c in needed if c not in (reader.fieldnames or [])]
            if missing:
                raise TierpickError(f"{path}: no column(s) {missing}: not a scored log")
            for rec in reader:
                probs: list[object] = [_float(rec[c]) for c in cols]
                where = f"{path}:{reader.line_num}"
                yield rec[prompt_field], probs, rec[tier_col] or None, rec.get(version_col), where
            return
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TierpickError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or tier_col not in obj:
                raise TierpickError(f"{path}:{lineno}: not a scored row (no {tier_col!r} field)")
            yield (
                # a decision log without prompt texts still has their length
                obj.get(prompt_field, obj.get("prompt_chars")),
                [obj.get(c) for c in cols],
                obj[tier_col],
                obj.get(version_col),
                f"{path}:{lineno}",
            )


@dataclass
class Costs:
    """What each tier would cost and is predicted to achieve on each routed row of a scored log:
    the one cost model of ``tierpick report`` and ``tierpick tune``."""

    tiers: list[str]
    proba: npt.NDArray[np.float32]  # (routed rows, tiers), as served: routing compares in float32
    cost: npt.NDArray[np.float64]  # (routed rows, tiers), USD per call
    in_tokens: npt.NDArray[np.float64]

    @classmethod
    def of(
        cls,
        log: ScoredLog,
        clf: TierClassifier,
        output_tokens: int = OUTPUT_TOKENS,
        chars_per_token: float = CHARS_PER_TOKEN,
    ) -> Costs:
        """Input tokens estimated as ceil(characters / chars_per_token), ``output_tokens`` per
        call, the tiers' prices from the model's manifest; error rows are left out."""
        cls.check_assumptions(output_tokens, chars_per_token)
        ok = log.tier >= 0
        if not ok.any():
            raise TierpickError("the scored log has no routed row")
        in_tokens = np.ceil(log.chars[ok] / chars_per_token)
        cost = call_costs(log.chars[ok], clf.manifest.tiers, output_tokens, chars_per_token)
        return cls(list(clf.tiers), log.proba[ok], cost, in_tokens)

    @staticmethod
    def check_assumptions(output_tokens: int, chars_per_token: float) -> None:
        if not 0 <= output_tokens < 10**9 or not 0 < chars_per_token < math.inf:  # NaN fails
            raise ConfigError(
                "--output-tokens must be >= 0 and --chars-per-token a finite number > 0, got "
                f"{output_tokens} and {chars_per_token}"
            )

    def __len__(self) -> int:
        return len(self.proba)

    def subset(self, rows: npt.NDArray[np.int64]) -> Costs:
        return Costs(self.tiers, self.proba[rows], self.cost[rows], self.in_tokens[rows])

    def summarize(self, choice: npt.NDArray[np.int64]) -> dict[str, Any]:
        """Tier mix, total cost, cost per 1M requests and mean predicted success of a routing."""
        n = len(self)
        rows = np.arange(n)
        counts = np.bincount(choice, minlength=len(self.tiers))
        total = float(self.cost[rows, choice].sum())
        return {
            "mix": {t: float(c / n) for t, c in zip(self.tiers, counts, strict=True)},
            "cost_usd": total,
            "cost_per_1m_requests_usd": total / n * 1e6,
            "predicted_success": float(self.proba[rows, choice].mean(dtype=np.float64)),
        }


def build_report(
    log: ScoredLog,
    clf: TierClassifier,
    output_tokens: int = OUTPUT_TOKENS,
    chars_per_token: float = 4.0,
) -> dict[str, Any]:
    """The savings report as a JSON-ready dict."""
    costs = Costs.of(log, clf, output_tokens, chars_per_token)
    tiers = costs.tiers
    n_ok = len(costs)
    summarize = costs.summarize
    in_tokens = costs.in_tokens
    ok = log.tier >= 0
    routings = {"as scored": summarize(log.tier[ok])}
    for k, t in enumerate(tiers):
        routings[f"always {t}"] = summarize(np.full(n_ok, k, dtype=np.int64))
    for r in routings.values():
        r["saving_vs"] = {
            f"always {t}": 1.0 - r["cost_usd"] / routings[f"always {t}"]["cost_usd"]
            for t in tiers[1:]
            if routings[f"always {t}"]["cost_usd"] > 0
        }
    curve = []
    for t in THRESHOLDS:
        s = summarize(threshold_choice(costs.proba, float(t))[0])
        curve.append({"threshold": float(t), **s})
    return {
        "model": {"name": clf.manifest.model_name, "version": clf.version},
        "scored_by": sorted(log.versions),
        "rows": len(log.tier),
        "routed_rows": n_ok,
        "error_rows": len(log.tier) - n_ok,
        "files": log.files,
        "assumptions": {
            "input_tokens": f"ceil(prompt characters / {chars_per_token:g})",
            "output_tokens_per_call": output_tokens,
            "prices_usd_per_1m_tokens": {
                t.name: {"input": t.price_input, "output": t.price_output}
                for t in clf.manifest.tiers
            },
            "mean_input_tokens": float(in_tokens.mean()),
            "predicted_success": "the model's calibrated probability for the chosen tier, "
            "averaged: an estimate, not a measurement",
        },
        "routings": routings,
        "threshold_curve": curve,
        "drift": drift(log, clf),
    }


def render_markdown(report: dict[str, Any], source: str) -> str:
    tiers = list(report["assumptions"]["prices_usd_per_1m_tokens"])
    a = report["assumptions"]
    top = f"always {tiers[-1]}"
    lines = [
        f"# Routing savings: {source}",
        "",
        f"Model `{report['model']['name']}` {report['model']['version']}; "
        f"{report['routed_rows']:,} routed rows of {report['rows']:,} "
        f"({report['error_rows']:,} rows with errors are not costed), {report['files']} file(s).",
        "",
        f"Assumptions: input tokens = {a['input_tokens']} (mean {a['mean_input_tokens']:.0f}); "
        f"{a['output_tokens_per_call']} output tokens per call; prices per 1M tokens "
        + ", ".join(
            f"{t} ${p['input']:g} in / ${p['output']:g} out"
            for t, p in a["prices_usd_per_1m_tokens"].items()
        )
        + ". Predicted success is "
        + a["predicted_success"]
        + ".",
        "",
        "| routing | "
        + " | ".join(tiers)
        + f" | cost (USD) | per 1M requests | saving vs {top} | predicted success |",
        "|---|" + "---:|" * (len(tiers) + 4),
    ]
    for name, r in report["routings"].items():
        saving = r["saving_vs"].get(top)
        lines.append(
            f"| {name} | "
            + " | ".join(f"{r['mix'][t]:.1%}" for t in tiers)
            + f" | {r['cost_usd']:,.2f} | {r['cost_per_1m_requests_usd']:,.0f} | "
            + (f"{saving:.1%}" if saving is not None else "-")
            + f" | {r['predicted_success']:.3f} |"
        )
    d = report.get("drift")
    if d is not None:
        q = d["familiarity_quantiles"]
        lines += [
            "",
            "## Drift: how far these prompts are from the training data",
            "",
            f"{d['unfamiliar_share']:.1%} of {d['sampled_prompts']:,} sampled prompts are unlike "
            f"the training data (familiarity under {UNFAMILIAR}; about 10-18% of prompts like the "
            "training data are, and a family the model never saw measured 17-97%). Familiarity "
            "quantiles 5/25/50/75%: " + " / ".join(f"{v:.3f}" for v in q.values()) + ".",
        ]
    lines += [
        "",
        "## Threshold rule: the cheapest tier whose probability reaches t",
        "",
        "| t | " + " | ".join(tiers) + " | cost (USD) | predicted success |",
        "|---:|" + "---:|" * (len(tiers) + 2),
    ]
    for point in report["threshold_curve"][::5]:
        lines.append(
            f"| {point['threshold']:.1f} | "
            + " | ".join(f"{point['mix'][t]:.1%}" for t in tiers)
            + f" | {point['cost_usd']:,.2f} | {point['predicted_success']:.3f} |"
        )
    lines.append("")
    return "\n".join(lines)


def usd(x: float) -> str:
    """A dollar amount with the digits that matter: $1,234, $12.50, $0.25, $0.0042."""
    if abs(x) >= 100:
        return f"${x:,.0f}"
    if abs(x) >= 1 or x == 0:
        return f"${x:,.2f}"
    return f"${x:.2g}"


def plot_curve(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError(
            f"the cost-curve PNG needs matplotlib (pip install 'tierpick[report]'): {exc}"
        ) from exc
    curve = report["threshold_curve"]
    t = [c["threshold"] for c in curve]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(t, [c["cost_usd"] for c in curve], color="C0", label="threshold routing")
    for i, (name, r) in enumerate(report["routings"].items()):
        ax.axhline(
            r["cost_usd"],
            ls="--" if name != "as scored" else ":",
            color=f"C{i + 1}",
            label=f"{name} ({usd(r['cost_usd'])})",
        )
    ax.set_xlabel("threshold t (cheapest tier with probability >= t)")
    ax.set_ylabel("projected cost (USD)")
    ax2 = ax.twinx()
    ax2.plot(t, [c["predicted_success"] for c in curve], color="gray", alpha=0.6)
    ax2.set_ylabel("predicted success (gray)")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"Projected cost over {report['routed_rows']:,} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    scored: Path,
    out_dir: Path,
    clf: TierClassifier,
    prompt_field: str = ScoreOptions.prompt_field,
    output_tokens: int = OUTPUT_TOKENS,
    chars_per_token: float = CHARS_PER_TOKEN,
    prefix: str = "",
) -> tuple[dict[str, Any], str, str | None]:
    """Write report.md, report.json and cost_curve.png; returns the report, its Markdown and
    a note when the PNG could not be drawn."""
    log = read_scored(scored, clf.tiers, prompt_field, prefix)
    log.check_model(clf, scored)
    report = build_report(log, clf, output_tokens, chars_per_token)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    md = render_markdown(report, scored.name)
    note = None
    try:
        plot_curve(report, out_dir / "cost_curve.png")
        md += "\n![cost curve](cost_curve.png)\n"
    except MissingDependencyError as exc:
        note = str(exc)
    (out_dir / "report.md").write_text(md)
    return report, md, note


__all__ = ["Costs", "ScoredLog", "build_report", "read_scored", "write_report"]
