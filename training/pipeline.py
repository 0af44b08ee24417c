"""`tierpick train`: dataset -> teacher -> student -> calibration -> evaluation -> export -> MLflow.

Stages write into a work directory so that an interrupted run resumes: the dataset, the teacher's
fine-tune (checkpointed every few steps) and the teacher's logits are reused when their inputs
match.
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

from classifier.errors import DatasetError
from training import baselines, metrics
from training.calibrate import apply_platt, fit_platt
from training.config import TeacherConfig, TierConfig
from training.dataset import BuiltDataset, build_dataset, load_dataset, write_dataset
from training.evaluate import SplitData, evaluate_split, write_report

log = logging.getLogger("tierpick.train")
Array = npt.NDArray[np.float64]


@dataclass
class TrainResult:
    model_dir: Path
    report_dir: Path
    report: dict[str, Any]
    metrics: dict[str, float]
    student: Any = None  # the torch student, for parity checks


def split_arrays(ds: BuiltDataset, name: str) -> SplitData:
    t = ds.split(name)
    targets = (
        np.stack(
            [
                np.nan_to_num(np.array(t[f"target_{k}"].to_pylist(), dtype=np.float64))
                for k in ds.tiers
            ],
            axis=1,
        )
        if t.num_rows
        else np.zeros((0, len(ds.tiers)))
    )
    mask = (
        np.stack([np.array(t[f"mask_{k}"].to_pylist(), dtype=np.float64) for k in ds.tiers], axis=1)
        if t.num_rows
        else np.zeros((0, len(ds.tiers)))
    )
    return SplitData(name, t["prompt"].to_pylist(), t["task"].to_pylist(), targets, mask)


def check_trainable(ds: BuiltDataset) -> None:
    """Refuse a dataset that cannot train every tier, before any training starts."""
    train, val = split_arrays(ds, "train"), split_arrays(ds, "val")
    if len(train.prompts) < 10 or len(val.prompts) < 5:
        raise DatasetError(
            f"too few prompts to train: {len(train.prompts)} train, {len(val.prompts)} val "
            "(need >= 10 and >= 5)"
        )
    for j, tier in enumerate(ds.tiers):
        for split in (train, val):
            if split.mask[:, j].sum() == 0:
                raise DatasetError(f"tier {tier!r} has no outcome in the {split.name} split")
    for split in (train, val):
        if not np.isfinite(split.targets).all():
            raise DatasetError(f"the {split.name} split has non-finite targets")


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
        workdir: resumable intermediate state (dataset, teacher checkpoints, logits, report).
        dataset_dir: a dataset built by `tierpick data build` to use instead of building one.
        version: the model version string (default: derived from data and config).
    """
    from training import encoders
    from training.export import export_model, parity

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    tcfg = config.train
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
    train, val, test = (split_arrays(ds, s) for s in ("train", "val", "test"))
    ood = split_arrays(ds, "ood")
    evals = [s for s in (test, ood) if len(s.prompts)]
    cfg_hash = hashlib.sha256(json.dumps(dataclasses.asdict(tcfg), sort_keys=True).encode())
    version = version or f"{ds.fingerprint[:8]}-{cfg_hash.hexdigest()[:8]}"
    log.info(
        "dataset %s: %d train, %d val, %d test, %d ood",
        ds.fingerprint[:12],
        len(train.prompts),
        len(val.prompts),
        len(test.prompts),
        len(ood.prompts),
    )

    # ---- teacher
    t0 = time.perf_counter()
    scfg = tcfg.student
    teacher = encoders.train_teacher(
        train.prompts,
        train.targets.astype(np.float32),
        train.mask.astype(np.float32),
        tcfg.teacher,
        tcfg.seed,
        workdir / "teacher",
        scfg.max_chars,
    )
    timings["teacher_train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    all_splits = [train, val, *evals]
    # keyed by the teacher fine-tune and the data: a change of student settings reuses them
    teacher_key = (workdir / "teacher" / "teacher.key").read_text().strip()[:16]
    outputs_path = workdir / "teacher" / f"outputs-{teacher_key}-{ds.fingerprint[:12]}.npz"
    texts = {s.name: s.prompts for s in all_splits}
    raw_z, teacher_e = cached_teacher_outputs(
        outputs_path, texts, teacher, tcfg.teacher, scfg.max_chars
    )
    teacher_z = {n: z.astype(np.float64) for n, z in raw_z.items()}
    timings["teacher_inference"] = time.perf_counter() - t0

    # ---- unlabeled crops of the training prompts, with the teacher's outputs for them
    t0 = time.perf_counter()
    crops = encoders.crop_prompts(train.prompts, scfg.crops, tcfg.seed)
    crops_path = outputs_path.with_name(f"crops-{scfg.crops}-{tcfg.seed}-{outputs_path.name}")
    zs, es = cached_teacher_outputs(
        crops_path, {"crops": crops}, teacher, tcfg.teacher, scfg.max_chars
    )
    crop_z, crop_e = zs["crops"], es["crops"]
    timings["teacher_inference_crops"] = time.perf_counter() - t0

    # ---- student
    t0 = time.perf_counter()
    tok = encoders.student_tokenizer(scfg.max_tokens)
    ids = {s.name: encoders.encode_ids(tok, s.prompts, scfg.max_chars) for s in all_splits}
    crop_ids = encoders.encode_ids(tok, crops, scfg.max_chars)
    emb = encoders.distill_static_embeddings(teacher, tok, ids["train"], scfg)
    timings["static_distill"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    no_label = np.zeros((len(crops), len(ds.tiers)), np.float32)  # crops have no outcome: masked
    student, student_info = encoders.train_student(
        emb,
        teacher.head,
        ids["train"] + crop_ids,
        np.concatenate([teacher_e["train"], crop_e]),
        np.concatenate([teacher_z["train"], crop_z]).astype(np.float32),
        np.concatenate([train.targets, no_label]).astype(np.float32),
        np.concatenate([train.mask, no_label]).astype(np.float32),
        ids["val"],
        teacher_e["val"],
        scfg,
        tcfg.seed,
    )
    student_z = {
        s.name: encoders.student_logits(student, ids[s.name]).astype(np.float64) for s in all_splits
    }
    timings["student_train"] = time.perf_counter() - t0

    # ---- calibration on val
    k = len(ds.tiers)
    if tcfg.calibration == "platt":
        a, b = fit_platt(student_z["val"], val.targets, val.mask)
        ta, tb = fit_platt(teacher_z["val"], val.targets, val.mask)
    else:
        a, b, ta, tb = [1.0] * k, [0.0] * k, [1.0] * k, [0.0] * k
    calibration = {"method": tcfg.calibration, "a": a, "b": b, "fitted_on": "val"}

    def student_p(name: str) -> Array:
        return apply_platt(student_z[name], a, b)

    # ---- default cost weight from the validation routing curve
    costs = tier_cost_vector(config.tiers)
    full_val = val.mask.min(axis=1) > 0
    cost_weight = 0.0
    if full_val.sum() >= 10:
        curve = metrics.sweep(student_p("val")[full_val], val.targets[full_val], costs)
        cost_weight = metrics.pick_cost_weight(curve, val.targets[full_val], tcfg.target_quality)

    # ---- evaluation with reference routers
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "model_version": version,
        "data_fingerprint": ds.fingerprint,
        "default_cost_weight": round(cost_weight, 6),
        "splits": {},
        "student_training": student_info,
        "tiers": list(ds.tiers),
    }
    for s in evals:
        routers = {
            "student": student_p(s.name),
            "student_uncalibrated": 1 / (1 + np.exp(-student_z[s.name])),
            "teacher": apply_platt(teacher_z[s.name], ta, tb),
            **reference_routers(train, s, tcfg.seed),
        }
        report["splits"][s.name] = evaluate_split(s, routers, costs, ds.tiers)
    per = report["splits"]["test"]["per_tier"] if "test" in report["splits"] else {}
    if per:
        report["calibration_ece"] = {
            "before": {t: per["student_uncalibrated"][t]["ece"] for t in ds.tiers},
            "after": {t: per["student"][t]["ece"] for t in ds.tiers},
        }
    timings["evaluate"] = time.perf_counter() - t0

    # ---- export + parity
    t0 = time.perf_counter()
    summary = flat_metrics(report, ds.tiers)
    manifest = export_model(
        student,
        config,
        out_dir,
        version=version,
        calibration=calibration,
        default_cost_weight=cost_weight,
        data_fingerprint=ds.fingerprint,
        evaluation={k2: round(v, 4) for k2, v in summary.items()},
    )
    sample = (test.prompts or val.prompts)[:200]
    report["onnx_parity_max_abs_diff"] = parity(student, out_dir, sample)
    if tcfg.export_teacher:
        # the teacher in the same artifact contract, for GPU or offline scoring (too large to ship)
        teacher_dir = workdir / "teacher-model"
        export_model(
            teacher,
            config,
            teacher_dir,
            version=f"{version}-teacher",
            calibration={"method": tcfg.calibration, "a": ta, "b": tb, "fitted_on": "val"},
            default_cost_weight=cost_weight,
            data_fingerprint=ds.fingerprint,
            evaluation={},
            graph="teacher.onnx",
            max_tokens=tcfg.teacher.max_tokens,
        )
        report["teacher_model_dir"] = str(teacher_dir)
        report["teacher_onnx_parity_max_abs_diff"] = parity(teacher, teacher_dir, sample)
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
    return TrainResult(out_dir, report_dir, report, summary, student)


def cached_teacher_outputs(
    path: Path,
    texts: dict[str, list[str]],
    teacher: Any,
    cfg: TeacherConfig,
    max_chars: int,
) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, npt.NDArray[np.float32]]]:
    """The teacher's logits and sentence embeddings for each named list of texts, read from
    ``path`` when a run with the same teacher and data wrote it, else computed and written."""
    from training import encoders

    if path.exists():
        cached = np.load(path)
        if all(f"{n}_{k}" in cached.files for n in texts for k in "ze"):  # else: another layout
            return {n: cached[f"{n}_z"] for n in texts}, {n: cached[f"{n}_e"] for n in texts}
    z, e = {}, {}
    for name, batch in texts.items():
        z[name], e[name] = encoders.teacher_outputs(teacher, batch, cfg, max_chars)
    arrays: dict[str, Any] = {f"{n}_z": v for n, v in z.items()}
    arrays.update((f"{n}_e", v) for n, v in e.items())
    np.savez(path, **arrays)
    return z, e


def reference_routers(train: SplitData, split: SplitData, seed: int) -> dict[str, Array]:
    """The reference rows of every report, fitted on ``train`` and scored on ``split``."""
    k = train.targets.shape[1]
    return {
        "tfidf_lr": baselines.tfidf_lr(
            train.prompts, train.targets, train.mask, split.prompts, seed
        ),
        "category_prior": baselines.category_prior(
            train.tasks, train.targets, train.mask, split.tasks
        ),
        "random": baselines.random_scores(len(split.prompts), k, seed),
        "oracle": split.targets,
    }


def tier_cost_vector(tiers: Any) -> Array:
    """Normalized cost per call of each tier, the scale the runtime routes on."""
    from classifier._runtime import normalized_costs

    return normalized_costs([t.price_input for t in tiers], [t.price_output for t in tiers])


def evaluate_model(model_dir: Path, ds: BuiltDataset, seed: int = 0) -> dict[str, Any]:
    """Evaluate an exported model (through the ONNX runtime) on a dataset's test and ood splits,
    with the same reference rows as training reports (the teacher is not part of an artifact)."""
    import classifier

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
            "student_uncalibrated": 1 / (1 + np.exp(-z)),
            **reference_routers(train, s, seed),
        }
        report["splits"][name] = evaluate_split(s, routers, costs, ds.tiers)
    return report


def flat_metrics(report: dict[str, Any], tiers: tuple[str, ...]) -> dict[str, float]:
    """The headline numbers as flat MLflow metric names, e.g. ``test_student_apgr``."""
    out: dict[str, float] = {}
    for split, res in report["splits"].items():
        for router, per in res["per_tier"].items():
            aucs = [per[t]["auc"] for t in tiers if per[t]["auc"] is not None]
            for t in tiers:
                for key in ("auc", "ece", "brier"):
                    if per[t][key] is not None:
                        out[f"{split}_{router}_{key}_{t}"] = float(per[t][key])
            if aucs:
                out[f"{split}_{router}_mean_auc"] = float(np.mean(aucs))
        for router, s in res.get("routing", {}).items():
            for key in ("apgr", "cpt50", "cpt80", "cost_at_95pct_top"):
                if s.get(key) is not None:
                    out[f"{split}_{router}_{key}"] = float(s[key])
    return out
