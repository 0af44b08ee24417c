"""Leave one source family out: for each family, a router is trained without any of its prompts
(not even their text) and evaluated on all of them, as traffic it has never seen. This is the
evaluation an independent router benchmark makes of the shipped model, run on our own data."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierpick.training.dataset import BuiltDataset
from tierpick.training.evaluate import evaluate_split
from tierpick.training.fit import compact, fit_router, routers_for, split_arrays

log = logging.getLogger("tierpick.train")
Array = npt.NDArray[np.float64]


def loso_families(ds: BuiltDataset, min_prompts: int) -> list[str]:
    """The families held out one at a time: those with ``min_prompts`` or more prompts, when
    there are at least two such families."""
    counts: dict[str, int] = {}
    for fam in ds.table["family"].to_pylist():
        counts[fam] = counts.get(fam, 0) + 1
    fams = sorted(f for f, n in counts.items() if n >= min_prompts)
    return fams if len(fams) >= 2 else []


def leave_one_family_out(
    ds: BuiltDataset,
    ctx: Any,
    costs: Array,
    families: list[str] | None = None,
    export_dir: Path | None = None,
) -> dict[str, Any]:
    """Per family: fit on the other families' train split (calibrated and tuned on their val
    split), evaluate on every prompt of the family, with the same reference rows.

    With ``export_dir``, each family's model is also exported there as a full artifact
    (``<export_dir>/<family>/``), beside ``<family>.npz``: the held-out prompts and tasks, its
    probabilities, targets and mask. These are what a team meeting traffic the model never saw
    starts from (``tierpick adapt``'s per-family study, the choice of the default rule).

    Returns:
        ``{"families": {family: compact figures}, "mean_apgr": {router: mean N-tier APGR over
        the families}, "seconds": ...}``.
    """

    cfg = ctx.config.train
    families = families if families is not None else loso_families(ds, cfg.loso_min_prompts)
    everything = split_arrays(ds, None)
    fam = np.array(everything.families)
    split = np.array(ds.table["split"].to_pylist())
    out: dict[str, Any] = {"families": {}}
    t_start = time.perf_counter()
    for family in families:
        t0 = time.perf_counter()
        held_out = fam == family
        train = everything.subset((split == "train") & ~held_out, "train")
        val = everything.subset((split == "val") & ~held_out, "val")
        target = everything.subset(held_out, family)
        log.info(
            "leave out %s: %d train, %d val, %d held out",
            family,
            len(train.prompts),
            len(val.prompts),
            len(target.prompts),
        )
        fitted = fit_router(ctx, train, val, costs)
        routers = routers_for(fitted, ctx, target)
        res = compact(evaluate_split(target, routers, costs, ds.tiers, fitted.cost_weight))
        if export_dir is not None:
            _export_fold(ctx, fitted, ds, family, target, routers["student"], export_dir)
        res["train_prompts"], res["val_prompts"] = len(train.prompts), len(val.prompts)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out["families"][family] = res
    scored = [r for r in out["families"].values() if r["routing"]]
    if scored:
        routers = scored[0]["routing"].keys()
        out["mean_apgr"] = {
            name: float(np.mean([r["routing"][name]["apgr"] for r in scored])) for name in routers
        }
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    return out


def _export_fold(
    ctx: Any,
    fitted: Any,
    ds: BuiltDataset,
    family: str,
    target: Any,
    proba: Array,
    export_dir: Path,
) -> None:
    """A fold's model as an artifact, and its held-out figures, under ``export_dir``."""
    from tierpick.training.export import export_model

    export_dir.mkdir(parents=True, exist_ok=True)
    export_model(
        fitted.student,
        ctx.config,
        export_dir / family,
        version=f"{ds.fingerprint[:8]}-loso-{family}",
        calibration=fitted.calibration,
        default_cost_weight=fitted.cost_weight,
        data_fingerprint=ds.fingerprint,
        evaluation={},
    )
    np.savez_compressed(
        export_dir / f"{family}.npz",
        prompts=np.array(target.prompts),
        tasks=np.array(target.tasks),
        proba=proba,
        targets=target.targets,
        mask=target.mask,
    )
