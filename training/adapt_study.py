"""The study behind ``tierpick adapt``'s figures, played as the independent evaluation plays a
team: for each source family, start from the model trained without it (``tierpick train``
exports each leave-one-family-out fold to ``<workdir>/loso-models``), grade n of the family's
prompts (n = 250, 500, 1,000, 2,000; several random draws), adapt on them, and route the rest.

Rows, each measured on the prompts not graded:

- ``parent``: the fold's model as it is;
- ``calibration``, ``memory``, ``head``: each way ``adapt`` fits, fitted on the n graded prompts;
- ``adapt``: what ``tierpick adapt`` writes (its cross-fitted choice, through the written
  artifact and the runtime), or the parent when it refuses;
- ``knn``: a reference that uses only the team's outcomes: each tier's mean success over the k
  graded prompts nearest by the same embedding (k tuned on a fifth of them).

``python -m tierpick.training.adapt_study build/model/loso-models --out build/adapt-study``
(``make adapt-study`` after ``make model``) writes ``study.md`` and ``study.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierpick import classifier
from tierpick.classifier.routing import platt
from tierpick.classifier.table import format_table
from tierpick.training import baselines
from tierpick.training.adapt import (
    MIN_HEAD_OUTCOMES,
    MIN_OUTCOMES,
    _calibrate,
    _mean_ece,
    adapt_data,
)
from tierpick.training.adapt_head import Head, fit_head
from tierpick.training.adapt_memory import fit_memory, read_features
from tierpick.training.errors import DatasetError
from tierpick.training.evaluate import SplitData, evaluate_split
from tierpick.training.fit import tier_cost_vector

SIZES = (250, 500, 1000, 2000)
MIN_REST = 200  # prompts left to route, at least
ROWS = ("parent", "calibration", "memory", "head", "adapt", "knn")


def _measure(
    data: SplitData, p: np.ndarray, costs: np.ndarray, tiers: tuple[str, ...]
) -> tuple[float, float]:
    """N-tier APGR and mean ECE over the tiers measured."""
    res = evaluate_split(data, {"student": p}, costs, tiers)
    apgr = res["routing"]["student"]["apgr"] if "student" in res["routing"] else float("nan")
    eces = [v["ece"] for v in res["per_tier"]["student"].values() if v["ece"] is not None]
    return float(apgr), float(np.mean(eces)) if eces else float("nan")


@dataclass
class Family:
    """A family's fold model and what it reads of every prompt, computed once for all draws."""

    clf: Any
    data: SplitData
    z: np.ndarray
    emb: np.ndarray
    head: Head | None = None
    feats: np.ndarray | None = None  # the head's input, read when a draw first needs it

    @classmethod
    def load(cls, loso_dir: Path, family: str) -> Family:
        clf = classifier.load(loso_dir / family)
        data = load_family(loso_dir, family)
        return cls(clf, data, *read_features(clf, data.prompts))

    def head_features(self) -> tuple[Head, np.ndarray]:
        if self.head is None or self.feats is None:
            self.head = Head(Path(self.clf.model_dir) / self.clf.manifest.graph)
            self.feats = self.head.features(self.clf, self.data.prompts)
        return self.head, self.feats


def one_draw(fam: Family, n: int, seed: int) -> dict[str, Any]:
    """Every row of the study for one family, one n, one random draw."""
    clf, data, z, emb = fam.clf, fam.data, fam.z, fam.emb
    tiers = clf.tiers
    costs = tier_cost_vector(clf.manifest.tiers)
    order = np.random.default_rng(seed).permutation(len(data.prompts))
    graded_rows, rest_rows = np.sort(order[:n]), np.sort(order[n:])
    keep = np.zeros(len(order), dtype=bool)
    keep[graded_rows] = True
    graded, rest = data.subset(keep, "graded"), data.subset(~keep, "rest")
    a0 = np.array(clf.manifest.calibration["a"], dtype=float)
    b0 = np.array(clf.manifest.calibration["b"], dtype=float)
    out: dict[str, Any] = {"n": n, "seed": seed, "rest": len(rest_rows)}
    p: dict[str, np.ndarray] = {"parent": platt(z[rest_rows], a0, b0)}
    a, b, fitted, *_ = _calibrate(z[graded_rows], graded, tiers, a0, b0, MIN_OUTCOMES)
    p["calibration"] = platt(z[rest_rows], a, b)
    cols = [tiers.index(t) for t in fitted]
    mem = fit_memory(emb[graded_rows], z[graded_rows], graded.targets, graded.mask, a, b, cols)
    p["memory"] = mem.proba(z[rest_rows], emb[rest_rows])
    head_cols = [j for j in cols if (graded.mask[:, j] > 0).sum() >= MIN_HEAD_OUTCOMES]
    if head_cols:
        head, feats = fam.head_features()
        w, hb = fit_head(
            feats[graded_rows], graded.targets, graded.mask, head.weight, head.bias, head_cols, 30.0
        )
        zh = feats @ w.T + hb
        ah, bh, *_ = _calibrate(zh[graded_rows], graded, tiers, a0, b0, MIN_OUTCOMES)
        p["head"] = platt(zh[rest_rows], ah, bh)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            res = adapt_data(
                clf, graded, clf.manifest.tiers, f"study-{n}-{seed}", Path(tmp) / "m", seed=seed
            )
            p["adapt"] = classifier.load(Path(tmp) / "m").predict_proba(rest.prompts)
            out["chosen"] = res.method
            out["cross_fitted"] = {
                m: {"n_tier_apgr": h["n_tier_apgr"], "mean_ece": _mean_ece(h)}
                for m, h in res.methods.items()
            }
        except DatasetError as exc:  # refused: the team keeps its parent, and is told why
            p["adapt"] = p["parent"]
            out["chosen"] = "refused"
            out["refused"] = str(exc)
    # the kNN reference: k tuned on a fifth of the graded prompts, then fitted on all of them
    tune = np.random.default_rng(seed + 1).random(n) < 0.2
    e_g = emb[graded_rows]
    k = baselines.tuned_knn(
        e_g[~tune],
        graded.targets[~tune],
        graded.mask[~tune],
        e_g[tune],
        graded.targets[tune],
        graded.mask[tune],
    )
    p["knn"] = baselines.knn(e_g, graded.targets, graded.mask, emb[rest_rows], k)
    measured = {name: _measure(rest, q, costs, tiers) for name, q in p.items()}
    out["apgr"] = {name: m[0] for name, m in measured.items()}
    out["ece"] = {name: m[1] for name, m in measured.items()}
    return out


def load_family(loso_dir: Path, family: str) -> SplitData:
    d = np.load(loso_dir / f"{family}.npz")
    prompts = [str(x) for x in d["prompts"]]
    return SplitData(family, prompts, [str(x) for x in d["tasks"]], d["targets"], d["mask"])


def run_study(
    loso_dir: Path,
    sizes: tuple[int, ...] = SIZES,
    draws: int = 3,
    families: list[str] | None = None,
) -> dict[str, Any]:
    fams = families or sorted(p.stem for p in loso_dir.glob("*.npz"))
    results: dict[str, Any] = {"families": {}, "sizes": list(sizes), "draws": draws}
    for fam in fams:
        family = Family.load(loso_dir, fam)
        data = family.data
        per: dict[str, Any] = {"prompts": len(data.prompts), "by_n": {}}
        for n in sizes:
            if len(data.prompts) - n < MIN_REST:
                continue
            t0 = time.perf_counter()
            runs = [one_draw(family, n, seed) for seed in range(draws)]
            per["by_n"][str(n)] = {
                "mean": {
                    row: float(np.mean([r["apgr"][row] for r in runs]))
                    for row in ROWS
                    if all(row in r["apgr"] for r in runs)
                },
                "ece": {
                    row: float(np.mean([r["ece"][row] for r in runs]))
                    for row in ROWS
                    if all(row in r["ece"] for r in runs)
                },
                "chosen": [r["chosen"] for r in runs],
                "cross_fitted": [r.get("cross_fitted") for r in runs],
                "draws": [r["apgr"] for r in runs],
                "refused": [r.get("refused") for r in runs if r.get("refused")],
            }
            print(
                f"{fam} n={n}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in per["by_n"][str(n)]["mean"].items())
                + f" ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        results["families"][fam] = per
    return results


def render(results: dict[str, Any]) -> str:
    fams = list(results["families"])
    lines = [
        "# adapt, played as a team: N-tier APGR on the prompts not graded",
        "",
        f"Each family from its leave-one-family-out model; mean of {results['draws']} random "
        "draws of the graded prompts. `adapt`: what `tierpick adapt` writes (its cross-fitted "
        "choice, served through the runtime; the parent when it refuses). `knn`: the team's "
        "outcomes alone (k nearest graded prompts by the same embedding).",
    ]
    for n in results["sizes"]:
        cols = [f for f in fams if str(n) in results["families"][f]["by_n"]]
        if not cols:
            continue
        rows = []
        for row in ROWS:
            cells, vals = [], []
            for f in cols:
                v = results["families"][f]["by_n"][str(n)]["mean"].get(row)
                cells.append("-" if v is None else f"{v:.3f}")
                if v is not None:
                    vals.append(v)
            if vals:
                mean = f"{np.mean(vals):.3f}" if len(vals) == len(cols) else "-"
                rows.append([row, *cells, mean])
        chosen = [", ".join(results["families"][f]["by_n"][str(n)]["chosen"]) for f in cols]
        rows.append(["adapt chose", *chosen, ""])
        lines += ["", f"## n = {n} graded prompts", "", "```"]
        lines.append(format_table(["", *cols, "mean"], rows))
        lines.append("```")
        by = {f: results["families"][f]["by_n"][str(n)]["mean"] for f in cols}
        worst = min(cols, key=lambda f: by[f]["adapt"] - by[f]["parent"])
        lines.append(
            f"adapt - parent: mean {np.mean([by[f]['adapt'] - by[f]['parent'] for f in cols]):+.3f}"
            f", worst family {worst} {by[worst]['adapt'] - by[worst]['parent']:+.3f}; adapt - knn: "
            f"mean {np.mean([by[f]['adapt'] - by[f]['knn'] for f in cols]):+.3f}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("loso_dir", help="<workdir>/loso-models of a `tierpick train` run")
    ap.add_argument("--out", required=True, help="directory for study.md and study.json")
    ap.add_argument("--draws", type=int, default=3, help="random draws per family and n")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="graded prompts, comma list")
    ap.add_argument("--families", help="comma list (default: every family)")
    ap.add_argument(
        "--report",
        help="also write the tables into this model report (REPORT.md), replacing an earlier "
        "study there",
    )
    args = ap.parse_args(argv)
    results = run_study(
        Path(args.loso_dir),
        tuple(int(s) for s in args.sizes.split(",")),
        args.draws,
        args.families.split(",") if args.families else None,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(results, indent=1))
    md = render(results)
    (out / "study.md").write_text(md)
    if args.report:
        append_to_report(Path(args.report), md)
    sys.stdout.write(md)
    return 0


def append_to_report(report: Path, md: str) -> None:
    """``md`` as the report's last section (an earlier study's section replaced)."""
    section = "#" + md  # one level down in the report
    head = section.splitlines()[0]
    text = report.read_text(encoding="utf-8")
    if head in text:
        text = text[: text.index(head)]
    report.write_text(text.rstrip() + "\n\n" + section)


if __name__ == "__main__":
    sys.exit(main())
