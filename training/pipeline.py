"""`tierpick train`: dataset -> teacher embeddings -> student -> tier heads -> calibration ->
evaluation (test, ood, leave-one-family-out) -> export -> MLflow.

What is label-free is computed once per run and shared by every fit (the final model and each
leave-one-family-out fold): the teacher encoder's embedding of every text (cached on disk per
text, so an interrupted or repeated run reuses them) and the static token vectors. What learns
from labels is refitted per fold: the student's distillation (on the fold's texts only), its
tier head, the teacher's head, calibration and the default cost weight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierpick.classifier.artifact import GRAPH_OUTPUTS
from tierpick.classifier.routing import sigmoid
from tierpick.training.config import TierConfig
from tierpick.training.dataset import BuiltDataset, build_dataset, load_dataset, write_dataset
from tierpick.training.errors import DatasetError
from tierpick.training.evaluate import SplitData, evaluate_split, write_report
from tierpick.training.fit import (
    Context,
    check_trainable,
    compact,
    fit_router,
    reference_routers,
    routers_for,
    split_arrays,
    tier_cost_vector,
)
from tierpick.training.loso import leave_one_family_out

log = logging.getLogger("tierpick.train")
Array = npt.NDArray[np.float64]


@dataclass
class TrainResult:
    model_dir: Path
    report_dir: Path
    report: dict[str, Any]
    metrics: dict[str, float]
    student: Any = None  # the torch student, for parity checks


def run_training(
    config: TierConfig,
    out_dir: Path,
    workdir: Path,
    *,
    dataset_dir: Path | None = None,
    version: str | None = None,
) -> TrainResult:
    """Train, calibrate, evaluate and export a model; see the module docstring.

    Args:
        config: the tier config (with its ``train`` section).
        out_dir: where the model directory is written.
        workdir: resumable intermediate state (dataset, teacher embeddings, report).
        dataset_dir: a dataset built by `tierpick data build` to use instead of building one.
        version: the model version string (default: derived from data and config).
    """
    from tierpick.training.export import export_model, parity
    from tierpick.training.student import kind_of

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    tcfg = config.train
    kind_of(config)  # an unknown kind of student is refused before any work
    workdir.mkdir(parents=True, exist_ok=True)

    # ---- dataset
    t0 = time.perf_counter()
    if dataset_dir is not None:
        ds = load_dataset(dataset_dir)
        if ds.tiers != config.tier_names:
            raise DatasetError(
                f"dataset tiers {ds.tiers} differ from the config's {config.tier_names}"
            )
    else:
        ds = build_dataset(config)
        write_dataset(ds, workdir / "dataset")
    check_trainable(ds)
    timings["dataset"] = time.perf_counter() - t0
    train, val, test, ood = (split_arrays(ds, s) for s in ("train", "val", "test", "ood"))
    evals = [s for s in (test, ood) if len(s.prompts)]
    # the graph's outputs are part of what a version names: the same data and settings
    # exported with another contract are another artifact
    train_settings = dataclasses.asdict(tcfg)
    if train_settings["student"]["kind"] == "static":
        # the field came after versions were first named: the static student at its default
        # keeps the version an unchanged recipe had (a rerun of make model names its model as
        # the shipped one; from the same cached teacher embeddings it rebuilt it bit for bit)
        del train_settings["student"]["kind"]
    contract = {"train": train_settings, "graph_outputs": list(GRAPH_OUTPUTS)}
    cfg_hash = hashlib.sha256(json.dumps(contract, sort_keys=True).encode())
    version = version or f"{ds.fingerprint[:8]}-{cfg_hash.hexdigest()[:8]}"
    log.info(
        "dataset %s: %d train, %d val, %d test, %d ood",
        ds.fingerprint[:12],
        len(train.prompts),
        len(val.prompts),
        len(test.prompts),
        len(ood.prompts),
    )

    # ---- teacher embeddings of every prompt, once (the folds and the final fit share them)
    t0 = time.perf_counter()
    ctx = Context(config, workdir)
    ctx.teacher_embeddings(split_arrays(ds, None).prompts)
    timings["teacher_embeddings"] = time.perf_counter() - t0

    # ---- the model
    t0 = time.perf_counter()
    costs = tier_cost_vector(config.tiers)
    fitted = fit_router(ctx, train, val, costs)
    timings["fit"] = time.perf_counter() - t0

    # ---- evaluation with reference routers
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "model_version": version,
        "data_fingerprint": ds.fingerprint,
        "default_cost_weight": round(fitted.cost_weight, 6),
        "splits": {},
        "training": fitted.info,
        "tiers": list(ds.tiers),
        "families": report_families(ds),
    }
    for s in evals:
        routers = routers_for(fitted, ctx, s)
        report["splits"][s.name] = evaluate_split(s, routers, costs, ds.tiers, fitted.cost_weight)
        if s.name == "test":
            report["test_by_family"] = evaluate_by_family(
                s, routers, costs, ds.tiers, fitted.cost_weight
            )
    per = report["splits"]["test"]["per_tier"] if "test" in report["splits"] else {}
    if per:
        report["calibration_ece"] = {
            "before": {t: per["student_uncalibrated"][t]["ece"] for t in ds.tiers},
            "after": {t: per["student"][t]["ece"] for t in ds.tiers},
        }
    timings["evaluate"] = time.perf_counter() - t0

    # ---- leave one family out: one fit per family, trained without it, evaluated on it
    if tcfg.loso:
        t0 = time.perf_counter()
        report["loso"] = leave_one_family_out(ds, ctx, costs, export_dir=workdir / "loso-models")
        timings["loso"] = time.perf_counter() - t0

    # ---- export + parity
    t0 = time.perf_counter()
    summary = flat_metrics(report, ds.tiers)
    manifest = export_model(
        fitted.student,
        config,
        out_dir,
        version=version,
        calibration=fitted.calibration,
        default_cost_weight=fitted.cost_weight,
        data_fingerprint=ds.fingerprint,
        evaluation={k2: round(v, 4) for k2, v in summary.items()},
    )
    sample = (test.prompts or val.prompts)[:200]
    report["onnx_parity_max_abs_diff"] = parity(fitted.student, out_dir, sample)
    from tierpick.training import reference  # drift: the training prompts as the model embeds them

    arrays = reference.build(out_dir, train.prompts, tcfg.seed, train.targets, train.mask)
    reference.attach(out_dir, arrays)
    if tcfg.export_teacher:
        # the teacher in the same artifact contract, for GPU or offline scoring (too large to ship)
        teacher_dir = workdir / "teacher-model"
        ta, tb = fitted.teacher_calibration
        export_model(
            fitted.teacher,
            config,
            teacher_dir,
            version=f"{version}-teacher",
            calibration={"method": tcfg.calibration, "a": ta, "b": tb, "fitted_on": "val"},
            default_cost_weight=fitted.cost_weight,
            data_fingerprint=ds.fingerprint,
            evaluation={},
            graph="teacher.onnx",
            max_tokens=tcfg.teacher.max_tokens,
        )
        report["teacher_model_dir"] = str(teacher_dir)
        report["teacher_onnx_parity_max_abs_diff"] = parity(fitted.teacher, teacher_dir, sample)
    timings["export"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    report["timings_seconds"] = {k2: round(v, 1) for k2, v in timings.items()}
    report["train_seconds"] = round(timings["total"], 1)
    report_dir = workdir / "report"
    write_report(report, report_dir, ds.tiers)
    summary["onnx_parity_max_abs_diff"] = report["onnx_parity_max_abs_diff"]
    log.info(
        "exported %s (version %s) in %.0f s", out_dir, manifest.model_version, timings["total"]
    )
    return TrainResult(out_dir, report_dir, report, summary, fitted.student)


def report_families(ds: BuiltDataset) -> dict[str, dict[str, int]]:
    """Prompts per family and split."""
    out: dict[str, dict[str, int]] = {}
    for fam, split in zip(
        ds.table["family"].to_pylist(), ds.table["split"].to_pylist(), strict=True
    ):
        out.setdefault(fam, {}).setdefault(split, 0)
        out[fam][split] += 1
    return dict(sorted(out.items()))


def evaluate_by_family(
    split: SplitData,
    routers: dict[str, Array],
    costs: Array,
    tiers: tuple[str, ...],
    cost_weight: float,
) -> dict[str, Any]:
    """:func:`evaluate_split` on each family's prompts of a split (in distribution)."""
    out = {}
    fams = np.array(split.families)
    for fam in sorted(set(split.families)):
        keep = fams == fam
        sub = split.subset(keep, f"{split.name}:{fam}")
        res = evaluate_split(
            sub, {n: r[keep] for n, r in routers.items()}, costs, tiers, cost_weight
        )
        out[fam] = compact(res)
    return out


def evaluate_model(model_dir: Path, ds: BuiltDataset, seed: int = 0) -> dict[str, Any]:
    """Evaluate an exported model (through the ONNX runtime) on a dataset's test and ood splits,
    with the text-only reference rows (the teacher and kNN are not part of an artifact)."""
    from tierpick import classifier

    clf = classifier.load(model_dir)
    if clf.tiers != ds.tiers:
        raise DatasetError(f"model tiers {clf.tiers} differ from the dataset's {ds.tiers}")
    train = split_arrays(ds, "train")
    costs = tier_cost_vector(clf.manifest.tiers)
    report: dict[str, Any] = {
        "model_version": clf.version,
        "data_fingerprint": ds.fingerprint,
        "model_data_fingerprint": clf.manifest.data_fingerprint,
        "default_cost_weight": clf.manifest.default_cost_weight,
        "splits": {},
        "tiers": list(ds.tiers),
    }
    if clf.manifest.data_fingerprint != ds.fingerprint:
        report["warning"] = (
            "the model was trained on other data: its training rows may overlap these test rows"
        )
    for name in ("test", "ood"):
        s = split_arrays(ds, name)
        if not s.prompts:
            continue
        z = clf.predict_logits(s.prompts).astype(np.float64)
        routers = {
            "student": clf.calibrate(z).astype(np.float64),
            "student_uncalibrated": sigmoid(z),
            **reference_routers(train, s, seed),
        }
        report["splits"][name] = evaluate_split(
            s, routers, costs, ds.tiers, clf.manifest.default_cost_weight
        )
    return report


def flat_metrics(
    report: dict[str, Any], tiers: tuple[str, ...], sep: str = "_"
) -> dict[str, float]:
    """The headline numbers under flat names, e.g. ``test_student_apgr`` (the manifest's
    ``evaluation``, registered versions' tags); with ``sep="/"`` grouped as MLflow shows them
    (``test/student/apgr``, ``loso/chat/student/apgr``)."""

    def key(*parts: str) -> str:
        return sep.join(parts)

    out: dict[str, float] = {}
    for split, res in report["splits"].items():
        for router, per in res["per_tier"].items():
            aucs = [per[t]["auc"] for t in tiers if per[t]["auc"] is not None]
            for t in tiers:
                for k in ("auc", "ece", "brier"):
                    if per[t][k] is not None:
                        out[key(split, router, k, t)] = float(per[t][k])
            if aucs:
                out[key(split, router, "mean_auc")] = float(np.mean(aucs))
        for router, s in res.get("routing", {}).items():
            for k in ("apgr", "cpt50", "cpt80", "cost_at_95pct_top"):
                if s.get(k) is not None:
                    out[key(split, router, k)] = float(s[k])
    for router, value in report.get("loso", {}).get("mean_apgr", {}).items():
        out[key("loso", router, "mean_apgr")] = float(value)
    for fam, res in report.get("loso", {}).get("families", {}).items():
        for router in ("student", "best_fixed_mix", "knn"):
            if router in res["routing"]:
                out[key("loso", fam, router, "apgr")] = float(res["routing"][router]["apgr"])
    return out
