"""The training config: tiers (cheapest first), the eval-outcome sources, decontamination and split.

Edited by people as YAML and validated on load: every problem names its key path and what is
allowed. Relative paths are taken from ``data_root``, which is itself relative to the config
file's folder unless absolute (``TIERPICK_DATA_ROOT`` or ``--data-root`` override it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from tierpick.classifier.errors import ConfigError
from tierpick.classifier.files import load_yaml
from tierpick.classifier.routing import clip

FORMATS = ("auto", "mmlu-pro", "lm-eval", "wide-csv", "alpaca-eval", "llm-judge", "long")
# Eval sets named for decontamination may also be plain prompt lists (JSONL/CSV/Parquet/TXT).
DECON_FORMATS = (*FORMATS, "prompts")
_TIER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
SPLIT_NAMES = ("train", "val", "test", "ood")


@dataclass(frozen=True)
class Tier:
    """One price tier: the models that represent it and what it costs per 1M tokens (USD)."""

    name: str
    price_input: float
    price_output: float
    models: tuple[str, ...]


@dataclass(frozen=True)
class Success:
    """How a source's raw outcome becomes success in [0, 1]: "this answer is good enough".

    A raw score must lie in ``scale`` (else the row is dropped and reported). With a
    ``threshold``, success is 1 where the raw score reaches it and 0 below; without one, the
    raw score is mapped linearly from ``scale`` onto [0, 1] (a soft success).
    """

    scale: tuple[float, float] = (0.0, 1.0)
    threshold: float | None = None

    def __call__(self, raw: float) -> float | None:
        """Success for a raw score, or None when it is outside ``scale`` (or not a number)."""
        lo, hi = self.scale
        if raw != raw or not lo <= raw <= hi:  # NaN fails every comparison
            return None
        if self.threshold is not None:
            return 1.0 if raw >= self.threshold else 0.0
        return (raw - lo) / (hi - lo)

    def describe(self) -> str:
        lo, hi = (f"{v:g}" for v in self.scale)
        if self.threshold is not None:
            return f"score in [{lo}, {hi}], success = score >= {self.threshold:g}"
        if self.scale == (0.0, 1.0):
            return "score in [0, 1] as it is"
        return f"score in [{lo}, {hi}] scaled to [0, 1]"


IDENTITY = Success()


@dataclass(frozen=True)
class Source:
    """One eval-outcome input: a file, a directory or a glob, and its format.

    ``family`` groups sources of one kind of traffic (multiple choice, judged chat, math,
    code, easy QA, ...): leave-one-family-out evaluation holds out one family at a time.
    An ``optional`` source that is missing or unreadable is reported and skipped.
    """

    path: str
    format: str = "auto"
    name: str | None = None  # source label in the dataset; default: derived by the reader
    options: dict[str, Any] = field(default_factory=dict)
    family: str | None = None  # default: the source label
    success: Success = IDENTITY
    optional: bool = False


@dataclass(frozen=True)
class Decontamination:
    """Eval sets whose prompts must not be trained on, and how a match is found."""

    paths: tuple[Source, ...] = ()
    method: str = "ngram"  # "exact" normalized-text match, or "ngram" word n-gram overlap
    ngram: int = 13


@dataclass(frozen=True)
class Holdout:
    """Whole groups kept out of train/val as the out-of-distribution split."""

    column: str  # "task", "source" or "family"
    values: tuple[str, ...]


@dataclass(frozen=True)
class SplitConfig:
    """Deterministic split by prompt hash, with optional group hold-out."""

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    salt: str = "tierpick"
    holdout: Holdout | None = None


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher's encoder: all-MiniLM-L6-v2 as published (frozen), mean-pooled.

    It is not fine-tuned: one pass over every text serves the final model and every
    leave-one-family-out fold (its embeddings carry no label), and it generalizes to traffic
    the labels never covered (see ``training.encoders``).
    """

    max_tokens: int = 128  # sequence length of the teacher's pass
    inference_batch: int = 64


@dataclass(frozen=True)
class HeadConfig:
    """The tier head that turns a sentence embedding into success logits, one per tier.

    ``ordinal``: one hidden GELU layer -> a single difficulty d(x); tier k's logit is
    a_k (theta_k - d(x)) with a learned ability theta_k and slope a_k per tier (an item-response
    model), so tiers differ by one difficulty, not by independent noisy estimates.
    ``independent``: the hidden layer -> one free logit per tier.
    """

    kind: str = "ordinal"
    hidden: int = 256
    dropout: float = 0.1
    # weight of a loss on the differences between tiers (p_k - p_j against y_k - y_j), the
    # quantity the default (utility) policy decides on
    gap_weight: float = 0.0
    epochs: int = 60  # early stop on validation loss
    patience: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-3


@dataclass(frozen=True)
class StudentConfig:
    """Static token embeddings distilled from the teacher's encoder, trained to reproduce its
    sentence embedding; a tier head then reads the student's own embedding (see
    ``training.encoders``)."""

    dim: int = 256  # PCA dimension of the static embeddings
    # SIF weight a / (a + p(token)) on each static vector, p from the training data's token
    # frequencies; 0: no weighting (the distillation learns each token's weight)
    sif: float = 0.0
    max_tokens: int = 256
    max_chars: int = 1536  # prompts are cut to this many characters before tokenizing
    epochs: int = 8  # embedding-distillation epochs (early stop on validation loss)
    patience: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    embedding_lr: float = 3e-4
    vocab: str = "full"  # "full" tokenizer vocabulary, or "seen": only tokens in the dataset
    # "meanmax": mean and max of the token vectors, concatenated; "mean": the mean only
    pooling: str = "meanmax"
    hidden: int = 384  # width of the projection's hidden layer (0: a linear projection)
    # unlabeled crops (a random run of 30-70% of the words) per training prompt, added to the
    # embedding distillation with the teacher's embedding of each crop
    crops: int = 1
    # share of each text's tokens (past [CLS]) hidden at random in every distillation step, the
    # target staying the teacher's embedding of the whole text
    token_dropout: float = 0.4


@dataclass(frozen=True)
class TrainConfig:
    """Everything `tierpick train` needs beyond the data: seeds, model sizes, calibration."""

    seed: int = 0
    model_name: str = "default"
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    head: HeadConfig = HeadConfig()
    calibration: str = "platt"  # "platt" per tier, or "none"
    export_teacher: bool = True  # also write the teacher as an ONNX artifact in the workdir
    target_quality: float = 0.95  # default cost weight: the cheapest utility-rule routing
    # reaching this share of the top tier's quality on the validation split
    # leave-one-family-out evaluation in `tierpick train` (one student per source family,
    # trained without it and evaluated on it); `tierpick evaluate --loso` runs it on its own
    loso: bool = True
    loso_min_prompts: int = 50  # families with fewer prompts are not held out on their own


@dataclass(frozen=True)
class TierConfig:
    """A whole training-data config: the one place tier names and their order come from."""

    name: str
    tiers: tuple[Tier, ...]
    sources: tuple[Source, ...]
    data_root: Path
    decontamination: Decontamination = Decontamination()
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    path: Path | None = None

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def tier_of_model(self) -> dict[str, str]:
        """Map each configured model name to its tier's name."""
        return {m: t.name for t in self.tiers for m in t.models}

    def resolve(self, path: str) -> Path:
        """Resolve a source path against ``data_root``."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else self.data_root / p


def load_config(path: str | os.PathLike[str], data_root: str | None = None) -> TierConfig:
    """Load and validate a YAML training config.

    Args:
        path: the YAML file.
        data_root: overrides the file's ``data_root`` (else ``TIERPICK_DATA_ROOT``, else the key).

    Returns:
        The validated config.

    Raises:
        ConfigError: the file is missing, not YAML, or does not validate; the message names
            the offending key.
    """
    path = Path(path)
    raw = load_yaml(path, "cannot read config")
    return parse_config(raw, base_dir=path.parent, where=str(path), data_root=data_root)


def parse_config(
    raw: object, base_dir: Path, where: str = "config", data_root: str | None = None
) -> TierConfig:
    """Validate an already-parsed config mapping (see :func:`load_config`)."""
    c = _Checker(where)
    top = c.mapping(raw, "")
    c.known_keys(
        top, "", {"name", "data_root", "tiers", "sources", "decontaminate", "split", "train"}
    )
    name = c.string(top.get("name", "tierpick"), "name")

    root_value = data_root or os.environ.get("TIERPICK_DATA_ROOT") or top.get("data_root", ".")
    root = Path(os.path.expanduser(c.string(root_value, "data_root")))
    root = (root if root.is_absolute() else (base_dir / root)).resolve()

    tiers = tuple(_parse_tier(c, t, f"tiers[{i}]") for i, t in enumerate(c.seq(top, "tiers")))
    if len(tiers) < 2:
        c.fail("tiers", f"needs at least 2 tiers (cheapest first), got {len(tiers)}")
    seen: dict[str, str] = {}
    for i, tier in enumerate(tiers):
        if tier.name in seen:
            c.fail(f"tiers[{i}].name", f"duplicate tier name {tier.name!r}")
        seen[tier.name] = tier.name
    owner: dict[str, str] = {}
    for i, tier in enumerate(tiers):
        for model in tier.models:
            if model in owner:
                c.fail(
                    f"tiers[{i}].models",
                    f"model {model!r} is already in tier {owner[model]!r}; a model has one tier",
                )
            owner[model] = tier.name
    for i in range(1, len(tiers)):
        prev, cur = tiers[i - 1], tiers[i]
        if cur.price_input + cur.price_output < prev.price_input + prev.price_output:
            c.fail(
                f"tiers[{i}]",
                f"tiers must be ordered cheapest first: {cur.name!r} costs less than {prev.name!r}",
            )

    sources = tuple(
        _parse_source(c, s, f"sources[{i}]") for i, s in enumerate(c.seq(top, "sources"))
    )
    if not sources:
        c.fail("sources", "needs at least one source")

    decon = Decontamination()
    if "decontaminate" in top:
        d = c.mapping(top["decontaminate"], "decontaminate")
        c.known_keys(d, "decontaminate", {"paths", "method", "ngram"})
        method = c.choice(d.get("method", "ngram"), "decontaminate.method", ("exact", "ngram"))
        ngram = c.integer(d.get("ngram", 13), "decontaminate.ngram", minimum=3)
        paths = tuple(
            _parse_source(c, s, f"decontaminate.paths[{i}]", DECON_FORMATS)
            for i, s in enumerate(c.seq(d, "paths", "decontaminate"))
        )
        decon = Decontamination(paths=paths, method=method, ngram=ngram)

    split = SplitConfig()
    if "split" in top:
        s = c.mapping(top["split"], "split")
        c.known_keys(s, "split", {"val_fraction", "test_fraction", "salt", "holdout"})
        val = c.fraction(s.get("val_fraction", 0.1), "split.val_fraction")
        test = c.fraction(s.get("test_fraction", 0.1), "split.test_fraction")
        if val + test >= 1.0:
            c.fail("split", f"val_fraction + test_fraction must be < 1, got {val + test:g}")
        holdout = None
        if s.get("holdout") is not None:
            h = c.mapping(s["holdout"], "split.holdout")
            c.known_keys(h, "split.holdout", {"column", "values"})
            column = c.choice(h.get("column"), "split.holdout.column", ("task", "source", "family"))
            values = tuple(
                c.string(v, f"split.holdout.values[{i}]")
                for i, v in enumerate(c.seq(h, "values", "split.holdout"))
            )
            if not values:
                c.fail("split.holdout.values", "needs at least one value")
            holdout = Holdout(column=column, values=values)
        split = SplitConfig(
            val_fraction=val,
            test_fraction=test,
            salt=c.string(s.get("salt", "tierpick"), "split.salt"),
            holdout=holdout,
        )

    train = TrainConfig()
    if top.get("train") is not None:
        t = c.mapping(top["train"], "train")
        teacher = _dataclass_from(c, TeacherConfig, t.pop("teacher", {}), "train.teacher")
        student = _dataclass_from(c, StudentConfig, t.pop("student", {}), "train.student")
        head = _dataclass_from(c, HeadConfig, t.pop("head", {}), "train.head")
        train = _dataclass_from(c, TrainConfig, t, "train")
        train = dataclasses.replace(train, teacher=teacher, student=student, head=head)
        if head.kind not in ("ordinal", "independent"):
            c.fail("train.head.kind", f"must be 'ordinal' or 'independent', got {head.kind!r}")
        if not 0 <= head.dropout < 1:
            c.fail("train.head.dropout", "must be in [0, 1)")
        if head.hidden < 1:
            c.fail("train.head.hidden", "must be >= 1")
        if train.calibration not in ("platt", "none"):
            c.fail(
                "train.calibration", f"must be one of ['platt', 'none'], got {train.calibration!r}"
            )
        if train.student.vocab not in ("full", "seen"):
            c.fail("train.student.vocab", f"must be 'full' or 'seen', got {train.student.vocab!r}")
        if train.student.pooling not in ("mean", "meanmax"):
            c.fail(
                "train.student.pooling",
                f"must be 'mean' or 'meanmax', got {train.student.pooling!r}",
            )
        if train.student.crops < 0:
            c.fail("train.student.crops", "must be >= 0 (0: no crops)")
        if train.student.sif < 0:
            c.fail("train.student.sif", "must be >= 0 (0: no SIF weighting)")
        if not 0 <= train.student.token_dropout < 1:
            c.fail("train.student.token_dropout", "must be in [0, 1)")
        if train.student.hidden < 0:
            c.fail("train.student.hidden", "must be >= 0 (0: a linear projection)")

    return TierConfig(
        name=name,
        tiers=tiers,
        sources=sources,
        data_root=root,
        decontamination=decon,
        split=split,
        train=train,
        path=Path(where) if where != "config" else None,
    )


def _dataclass_from(c: _Checker, cls: Any, raw: object, key: str) -> Any:
    """Build a flat dataclass of numbers/strings from a mapping, checking names and types."""
    values = c.mapping(raw, key)
    fields = {f.name: f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(f.default)}
    c.known_keys(values, key, set(fields))
    out = {}
    for name, value in values.items():
        default = fields[name].default
        ok = (
            isinstance(value, type(default)) and not isinstance(value, bool)
            if not isinstance(default, bool)
            else isinstance(value, bool)
        )
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            c.fail(f"{key}.{name}", f"must be {type(default).__name__}, got {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            c.fail(f"{key}.{name}", f"must be >= 0, got {value!r}")
        out[name] = value
    return cls(**out)


def _parse_tier(c: _Checker, raw: object, key: str) -> Tier:
    t = c.mapping(raw, key)
    c.known_keys(t, key, {"name", "price_input", "price_output", "models"})
    name = c.string(t.get("name"), f"{key}.name")
    if not _TIER_NAME.match(name):
        c.fail(
            f"{key}.name", f"must match {_TIER_NAME.pattern} (used in column names), got {name!r}"
        )
    models = tuple(c.string(m, f"{key}.models[{j}]") for j, m in enumerate(c.seq(t, "models", key)))
    if not models:
        c.fail(f"{key}.models", "needs at least one model name")
    return Tier(
        name=name,
        price_input=c.price(t.get("price_input"), f"{key}.price_input"),
        price_output=c.price(t.get("price_output"), f"{key}.price_output"),
        models=models,
    )


def _parse_source(c: _Checker, raw: object, key: str, formats: tuple[str, ...] = FORMATS) -> Source:
    if isinstance(raw, str):
        return Source(path=raw)
    s = c.mapping(raw, key)
    c.known_keys(s, key, {"path", "format", "name", "options", "family", "success", "optional"})
    options = c.mapping(s.get("options", {}), f"{key}.options")
    name, family = s.get("name"), s.get("family")
    optional = s.get("optional", False)
    if not isinstance(optional, bool):
        c.fail(f"{key}.optional", f"must be true or false, got {optional!r}")
    return Source(
        path=c.string(s.get("path"), f"{key}.path"),
        format=c.choice(s.get("format", "auto"), f"{key}.format", formats),
        name=None if name is None else c.string(name, f"{key}.name"),
        options=dict(options),
        family=None if family is None else c.string(family, f"{key}.family"),
        success=_parse_success(c, s["success"], f"{key}.success") if "success" in s else IDENTITY,
        optional=optional,
    )


def _parse_success(c: _Checker, raw: object, key: str) -> Success:
    s = c.mapping(raw, key)
    c.known_keys(s, key, {"scale", "threshold"})
    scale = s.get("scale", [0, 1])
    if (
        not isinstance(scale, list)
        or len(scale) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in scale)
        or not scale[0] < scale[1]
    ):
        c.fail(f"{key}.scale", f"must be [low, high] with low < high, got {scale!r}")
    threshold = s.get("threshold")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not scale[0] < threshold <= scale[1]
    ):
        c.fail(
            f"{key}.threshold",
            f"must be a number in ({scale[0]}, {scale[1]}] (the scale), got {threshold!r}",
        )
    return Success(
        scale=(float(scale[0]), float(scale[1])),
        threshold=None if threshold is None else float(threshold),
    )


class _Checker:
    """Type checks that raise ConfigError naming the file and the key path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(f"{self.where}: '{key or '<top>'}' {message}")

    def mapping(self, value: object, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping, got {type(value).__name__}")
        return value

    def known_keys(self, value: dict[str, Any], key: str, allowed: set[str]) -> None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            self.fail(key, f"has unknown key(s) {unknown}; allowed: {sorted(allowed)}")

    def seq(self, parent: dict[str, Any], name: str, parent_key: str = "") -> list[Any]:
        key = f"{parent_key}.{name}" if parent_key else name
        value = parent.get(name)
        if not isinstance(value, list):
            self.fail(key, f"must be a list, got {type(value).__name__}")
        return value

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def choice(self, value: object, key: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            self.fail(key, f"must be one of {list(allowed)}, got {value!r}")
        return value

    def price(self, value: object, key: str) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value < math.inf  # NaN and infinity fail too
        ):
            self.fail(key, f"must be a number >= 0, finite (USD per 1M tokens), got {clip(value)}")
        return float(value)

    def fraction(self, value: object, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            self.fail(key, f"must be a number in [0, 1), got {value!r}")
        return float(value)

    def integer(self, value: object, key: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(key, f"must be an integer >= {minimum}, got {value!r}")
        return value
