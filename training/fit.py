"""What one fit of the router is, shared by `tierpick train` (the final model), the
leave-one-family-out folds (:mod:`.loso`) and ``adapt``: a dataset's splits as arrays, the
label-free context every fit shares (teacher embeddings, token ids, static vectors), fitting the
student and the heads on a split, scoring a split with every router, and the compact figures.

It imports neither the pipeline nor the folds: both import it (they used to import each other).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierpick.classifier.routing import platt, sigmoid
from tierpick.training import baselines, metrics
from tierpick.training.calibrate import fit_platt
from tierpick.training.config import TierConfig
from tierpick.training.dataset import BuiltDataset
from tierpick.training.errors import DatasetError
from tierpick.training.evaluate import SplitData

Array = npt.NDArray[np.float64]


def split_arrays(ds: BuiltDataset, name: str | None) -> SplitData:
    """One split of a dataset as arrays (``None``: every row)."""
    t = ds.split(name) if name is not None else ds.table
    if not t.num_rows:
        empty = np.zeros((0, len(ds.tiers)))
        return SplitData(name or "all", [], [], empty, empty, [])
    targets = np.stack(
        [np.nan_to_num(np.array(t[f"target_{k}"].to_pylist(), dtype=np.float64)) for k in ds.tiers],
        axis=1,
    )
    mask = np.stack(
        [np.array(t[f"mask_{k}"].to_pylist(), dtype=np.float64) for k in ds.tiers], axis=1
    )
    families = t["family"].to_pylist() if "family" in t.column_names else []
    return SplitData(
        name or "all", t["prompt"].to_pylist(), t["task"].to_pylist(), targets, mask, families
    )


def check_trainable(ds: BuiltDataset) -> None:
    """Refuse a dataset that cannot train every tier, before any training starts."""
    train, val = split_arrays(ds, "train"), split_arrays(ds, "val")
    check_fit_data(train, val, ds.tiers)


def check_fit_data(train: SplitData, val: SplitData, tiers: tuple[str, ...]) -> None:
    if len(train.prompts) < 10 or len(val.prompts) < 5:
        raise DatasetError(
            f"too few prompts to train: {len(train.prompts)} train, {len(val.prompts)} val "
            "(need >= 10 and >= 5)"
        )
    for j, tier in enumerate(tiers):
        for split in (train, val):
            if split.mask[:, j].sum() == 0:
                raise DatasetError(f"tier {tier!r} has no outcome in the {split.name} split")
    for split in (train, val):
        if not np.isfinite(split.targets).all():
            raise DatasetError(f"the {split.name} split has non-finite targets")


class Context:
    """What every fit of one training run shares, none of it learned from labels: the teacher
    encoder's embeddings (through an on-disk cache), the student's tokenization and the static
    token vectors (:attr:`memo`, kept by the student's kind)."""

    def __init__(self, config: TierConfig, workdir: Path) -> None:
        from tierpick.training import encoders

        self.config = config
        tcfg, scfg = config.train.teacher, config.train.student
        self.cache = encoders.EmbeddingCache(
            workdir / "teacher" / f"embeddings-{tcfg.max_tokens}-{scfg.max_chars}.npz",
            tcfg,
            scfg.max_chars,
        )
        self.tokenizer = encoders.student_tokenizer(scfg.max_tokens)
        self._ids: dict[str, list[int]] = {}
        self.memo: dict[str, Any] = {}  # what a student kind shares across the run's fits

    def encoder(self) -> Any:
        return self.cache.encoder()

    def teacher_embeddings(self, prompts: list[str]) -> npt.NDArray[np.float32]:
        return self.cache.get(prompts)

    def ids(self, prompts: list[str]) -> list[list[int]]:
        from tierpick.training import encoders

        new = [p for p in dict.fromkeys(prompts) if p not in self._ids]
        scfg = self.config.train.student
        for p, row in zip(
            new, encoders.encode_ids(self.tokenizer, new, scfg.max_chars), strict=True
        ):
            self._ids[p] = row
        return [self._ids[p] for p in prompts]


@dataclass
class Fitted:
    """A router fitted on one training set: the student (with its tier head), the teacher's
    head on the frozen encoder, calibrations, the default cost weight, the kNN reference's k."""

    student: Any
    teacher: Any
    calibration: dict[str, Any]
    teacher_calibration: tuple[list[float], list[float]]
    cost_weight: float
    knn_k: int
    train: SplitData
    train_teacher_emb: npt.NDArray[np.float32]
    info: dict[str, Any]


def fit_router(ctx: Context, train: SplitData, val: SplitData, costs: Array) -> Fitted:
    """Distil a student on ``train``'s texts (and crops of them), fit the tier heads on the
    labels, calibrate on ``val`` and pick the default cost weight there."""
    from tierpick.training import encoders, student

    cfg = ctx.config.train
    scfg = cfg.student
    kind = student.kind_of(ctx.config)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    te_train = ctx.teacher_embeddings(train.prompts)
    te_val = ctx.teacher_embeddings(val.prompts)
    crops = encoders.crop_prompts(train.prompts, scfg.crops, cfg.seed)
    te_crops = ctx.teacher_embeddings(crops)
    timings["teacher_embeddings"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ids_train, ids_val, ids_crops = ctx.ids(train.prompts), ctx.ids(val.prompts), ctx.ids(crops)
    data = student.DistillData(
        ids=ids_train + ids_crops,
        targets=np.concatenate([te_train, te_crops]),
        prompt_ids=ids_train,
        val_ids=ids_val,
        val_targets=te_val,
    )
    model, student_info = kind.distill(ctx, data, cfg.seed)
    timings["student_distill"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    se_train = student.embeddings(model, ids_train)
    se_val = student.embeddings(model, ids_val)
    y, m = train.targets.astype(np.float32), train.mask.astype(np.float32)
    yv, mv = val.targets.astype(np.float32), val.mask.astype(np.float32)
    head, head_info = encoders.train_head(se_train, y, m, se_val, yv, mv, cfg.head, cfg.seed)
    model.head = head
    t_head, t_head_info = encoders.train_head(te_train, y, m, te_val, yv, mv, cfg.head, cfg.seed)
    teacher = encoders.Teacher(ctx.cache.encoder(), t_head)
    timings["heads"] = time.perf_counter() - t0

    k = len(costs)
    z_val = encoders.head_logits(head, se_val).astype(np.float64)
    tz_val = encoders.head_logits(t_head, te_val).astype(np.float64)
    if cfg.calibration == "platt":
        a, b = fit_platt(z_val, val.targets, val.mask)
        ta, tb = fit_platt(tz_val, val.targets, val.mask)
    else:
        a, b, ta, tb = [1.0] * k, [0.0] * k, [1.0] * k, [0.0] * k
    calibration = {"method": cfg.calibration, "a": a, "b": b, "fitted_on": "val"}

    full_val = val.mask.min(axis=1) > 0
    cost_weight = 0.0
    if full_val.sum() >= 10:
        p_val = platt(z_val, a, b)[full_val]
        curve = metrics.sweep(p_val, val.targets[full_val], costs)
        cost_weight = metrics.pick_cost_weight(curve, val.targets[full_val], cfg.target_quality)
    knn_k = baselines.tuned_knn(
        te_train.astype(np.float64),
        train.targets,
        train.mask,
        te_val.astype(np.float64),
        val.targets,
        val.mask,
    )
    return Fitted(
        student=model,
        teacher=teacher,
        calibration=calibration,
        teacher_calibration=(ta, tb),
        cost_weight=cost_weight,
        knn_k=knn_k,
        train=train,
        train_teacher_emb=te_train,
        info={
            "student": student_info,
            "head": head_info,
            "teacher_head": t_head_info,
            "knn_k": knn_k,
            "timings_seconds": {n: round(v, 1) for n, v in timings.items()},
        },
    )


def student_logits(fitted: Fitted, ctx: Context, prompts: list[str]) -> Array:
    from tierpick.training import student

    return student.logits(fitted.student, ctx.ids(prompts)).astype(np.float64)


def routers_for(fitted: Fitted, ctx: Context, split: SplitData) -> dict[str, Array]:
    """The student (calibrated and raw) and every reference router, scored on ``split``."""
    from tierpick.training import encoders

    cal = fitted.calibration
    z = student_logits(fitted, ctx, split.prompts)
    te = ctx.teacher_embeddings(split.prompts)
    tz = encoders.head_logits(fitted.teacher.head, te).astype(np.float64)
    train = fitted.train
    return {
        "student": platt(z, cal["a"], cal["b"]),
        "student_uncalibrated": sigmoid(z),
        "teacher": platt(tz, *fitted.teacher_calibration),
        "knn": baselines.knn(
            fitted.train_teacher_emb.astype(np.float64),
            train.targets,
            train.mask,
            te.astype(np.float64),
            fitted.knn_k,
        ),
        **reference_routers(train, split, ctx.config.train.seed),
    }


def reference_routers(train: SplitData, split: SplitData, seed: int) -> dict[str, Array]:
    """The text-only reference rows of every report, fitted on ``train``, scored on ``split``."""
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


def compact(res: dict[str, Any]) -> dict[str, Any]:
    """A split's figures without curves and reliability bins (for per-family tables)."""
    return {
        "n": res["n"],
        "per_tier": {
            name: {
                t: {k: v for k, v in row.items() if k != "reliability"} for t, row in per.items()
            }
            for name, per in res["per_tier"].items()
        },
        "routing": {name: {"apgr": r["apgr"]} for name, r in res["routing"].items()},
        "groups": [
            {
                "tiers": g["tiers"],
                "n": g["n"],
                "apgr": {name: r["apgr"] for name, r in g["routing"].items()},
                **({"default_policy": g["default_policy"]} if "default_policy" in g else {}),
            }
            for g in res["groups"]
        ],
        "pairs": res["pairs"],
        **({"default_policy": res["default_policy"]} if "default_policy" in res else {}),
    }


def tier_cost_vector(tiers: Any) -> Array:
    """Normalized cost per call of each tier, the scale the runtime routes on."""
    from tierpick.classifier.routing import normalized_costs

    return normalized_costs([t.price_input for t in tiers], [t.price_output for t in tiers])
