"""The training config: tiers (cheapest first), the eval-outcome sources, decontamination and split.

Edited by people as YAML and validated on load, declaratively: each dataclass below is also the
schema of its YAML mapping (pydantic validates it: types, ranges and choices in the field
annotations, each default written once), and every problem of a file is reported at once,
naming its key path (:func:`tierpick.classifier.settings.parse_settings`). Relative paths are
taken from ``data_root``, which is itself relative to the config file's folder unless absolute
(``TIERPICK_DATA_ROOT`` or ``--data-root`` override it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, with_config

from tierpick.classifier.files import load_yaml
from tierpick.classifier.routing import clip
from tierpick.classifier.settings import Name, StrictBool, StrictInt, parse_settings

FORMATS = ("auto", "mmlu-pro", "lm-eval", "wide-csv", "alpaca-eval", "llm-judge", "long")
# Eval sets named for decontamination may also be plain prompt lists (JSONL/CSV/Parquet/TXT).
DECON_FORMATS = (*FORMATS, "prompts")
_TIER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
SPLIT_NAMES = ("train", "val", "test", "ood")

# the schema's types: a YAML number is an int or a float, never a bool or a string
Count = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(ge=1)]
NonNegative = Annotated[float, Field(strict=True, ge=0)]
Fraction = Annotated[float, Field(strict=True, ge=0, lt=1)]  # in [0, 1)
Price = Annotated[
    float, Field(strict=True, ge=0, allow_inf_nan=False, description="USD per 1M tokens")
]
TierName = Annotated[
    str,
    Field(strict=True, pattern=_TIER_NAME.pattern, description="used in column names"),
]
SCHEMA = ConfigDict(extra="forbid")  # every mapping: unknown keys refused


@with_config(SCHEMA)
@dataclass(frozen=True)
class Tier:
    """One price tier: the models that represent it and what it costs per 1M tokens (USD)."""

    name: TierName
    price_input: Price
    price_output: Price
    models: Annotated[tuple[Name, ...], Field(min_length=1)]


def _scale(value: object) -> object:
    if not (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and value[0] < value[1]
    ):
        raise ValueError(f"must be [low, high] with low < high, got {clip(value)}")
    return tuple(map(float, value))


@with_config(SCHEMA)
@dataclass(frozen=True)
class Success:
    """How a source's raw outcome becomes success in [0, 1]: "this answer is good enough".

    A raw score must lie in ``scale`` (else the row is dropped and reported). With a
    ``threshold``, success is 1 where the raw score reaches it and 0 below; without one, the
    raw score is mapped linearly from ``scale`` onto [0, 1] (a soft success).
    """

    scale: Annotated[tuple[float, float], BeforeValidator(_scale)] = (0.0, 1.0)
    threshold: Annotated[float, Field(strict=True)] | None = None

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if self.threshold is not None and not lo < self.threshold <= hi:
            raise ValueError(
                f"threshold must be a number in ({lo:g}, {hi:g}] (the scale), got "
                f"{self.threshold:g}"
            )

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


def _source(value: object) -> object:
    return {"path": value} if isinstance(value, str) else value  # a bare path


@with_config(SCHEMA)
@dataclass(frozen=True)
class Source:
    """One eval-outcome input: a file, a directory or a glob, and its format.

    ``family`` groups sources of one kind of traffic (multiple choice, judged chat, math,
    code, easy QA, ...): leave-one-family-out evaluation holds out one family at a time.
    An ``optional`` source that is missing or unreadable is reported and skipped.
    """

    path: Name
    # one of FORMATS (or "prompts" for a decontamination set, DECON_FORMATS)
    format: Literal[DECON_FORMATS] = "auto"  # type: ignore[valid-type]
    name: Name | None = None  # source label in the dataset; default: derived by the reader
    options: dict[str, Any] = field(default_factory=dict)
    family: Name | None = None  # default: the source label
    success: Success = IDENTITY
    optional: StrictBool = False


SourceEntry = Annotated[Source, BeforeValidator(_source)]  # a mapping, or a bare path


@with_config(SCHEMA)
@dataclass(frozen=True)
class Decontamination:
    """Eval sets whose prompts must not be trained on, and how a match is found."""

    paths: tuple[SourceEntry, ...] = ()
    # "exact" normalized-text match, or "ngram" word n-gram overlap
    method: Literal["exact", "ngram"] = "ngram"
    ngram: Annotated[StrictInt, Field(ge=3)] = 13


@with_config(SCHEMA)
@dataclass(frozen=True)
class Holdout:
    """Whole groups kept out of train/val as the out-of-distribution split."""

    column: Literal["task", "source", "family"]
    values: Annotated[tuple[Name, ...], Field(min_length=1)]


@with_config(SCHEMA)
@dataclass(frozen=True)
class SplitConfig:
    """Deterministic split by prompt hash, with optional group hold-out."""

    val_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.1
    salt: Name = "tierpick"
    holdout: Holdout | None = None

    def __post_init__(self) -> None:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "val_fraction + test_fraction must be < 1, got "
                f"{self.val_fraction + self.test_fraction:g}"
            )


@with_config(SCHEMA)
@dataclass(frozen=True)
class TeacherConfig:
    """The teacher's encoder: all-MiniLM-L6-v2 as published (frozen), mean-pooled.

    It is not fine-tuned: one pass over every text serves the final model and every
    leave-one-family-out fold (its embeddings carry no label), and it generalizes to traffic
    the labels never covered (see ``training.encoders``).
    """

    max_tokens: Positive = 128  # sequence length of the teacher's pass
    inference_batch: Positive = 64


@with_config(SCHEMA)
@dataclass(frozen=True)
class HeadConfig:
    """The tier head that turns a sentence embedding into success logits, one per tier.

    ``ordinal``: one hidden GELU layer -> a single difficulty d(x); tier k's logit is
    a_k (theta_k - d(x)) with a learned ability theta_k and slope a_k per tier (an item-response
    model), so tiers differ by one difficulty, not by independent noisy estimates.
    ``independent``: the hidden layer -> one free logit per tier.
    """

    kind: Literal["ordinal", "independent"] = "ordinal"
    hidden: Positive = 256
    dropout: Fraction = 0.1
    # weight of a loss on the differences between tiers (p_k - p_j against y_k - y_j), the
    # quantity the default (utility) policy decides on
    gap_weight: NonNegative = 0.0
    epochs: Count = 60  # early stop on validation loss
    patience: Count = 5
    batch_size: Positive = 128
    lr: NonNegative = 1e-3
    weight_decay: NonNegative = 1e-3


@with_config(SCHEMA)
@dataclass(frozen=True)
class StudentConfig:
    """Static token embeddings distilled from the teacher's encoder, trained to reproduce its
    sentence embedding; a tier head then reads the student's own embedding (see
    ``training.encoders``)."""

    # the kind of student (training.student.KINDS); the fields below are the static one's
    kind: Name = "static"
    dim: Positive = 256  # PCA dimension of the static embeddings
    # SIF weight a / (a + p(token)) on each static vector, p from the training data's token
    # frequencies; 0: no weighting (the distillation learns each token's weight)
    sif: NonNegative = 0.0
    max_tokens: Positive = 256
    max_chars: Positive = 1536  # prompts are cut to this many characters before tokenizing
    epochs: Count = 8  # embedding-distillation epochs (early stop on validation loss)
    patience: Count = 3
    batch_size: Positive = 64
    lr: NonNegative = 1e-3
    embedding_lr: NonNegative = 3e-4
    # "full" tokenizer vocabulary, or "seen": only tokens in the dataset
    vocab: Literal["full", "seen"] = "full"
    # "meanmax": mean and max of the token vectors, concatenated; "mean": the mean only
    pooling: Literal["mean", "meanmax"] = "meanmax"
    hidden: Count = 384  # width of the projection's hidden layer (0: a linear projection)
    # unlabeled crops (a random run of 30-70% of the words) per training prompt, added to the
    # embedding distillation with the teacher's embedding of each crop
    crops: Count = 1
    # share of each text's tokens (past [CLS]) hidden at random in every distillation step, the
    # target staying the teacher's embedding of the whole text
    token_dropout: Fraction = 0.4


@with_config(SCHEMA)
@dataclass(frozen=True)
class TrainConfig:
    """Everything `tierpick train` needs beyond the data: seeds, model sizes, calibration."""

    seed: Count = 0
    model_name: Name = "default"
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    head: HeadConfig = HeadConfig()
    calibration: Literal["platt", "none"] = "platt"  # "platt" per tier, or "none"
    export_teacher: StrictBool = True  # also write the teacher as an ONNX artifact (workdir)
    # default cost weight: the cheapest utility-rule routing reaching this share of the top
    # tier's quality on the validation split
    target_quality: Annotated[float, Field(strict=True, gt=0, le=1)] = 0.95
    # leave-one-family-out evaluation in `tierpick train` (one student per source family,
    # trained without it and evaluated on it); `tierpick evaluate --loso` runs it on its own
    loso: StrictBool = True
    loso_min_prompts: Positive = 50  # families with fewer prompts are not held out on their own


def _loader_only(value: object) -> object:
    if value is not None and not isinstance(value, Path):  # a key of the file, not the loader
        raise ValueError("unknown key: the config's own path is set when the file is read")
    return value


@with_config(SCHEMA)
@dataclass(frozen=True)
class TierConfig:
    """A whole training-data config: the one place tier names and their order come from.

    In YAML, ``decontamination`` is the key ``decontaminate``; ``path`` is the file's own."""

    tiers: Annotated[tuple[Tier, ...], Field(min_length=2, description="cheapest first")]
    sources: Annotated[tuple[SourceEntry, ...], Field(min_length=1)]
    data_root: Path
    name: Name = "tierpick"
    decontamination: Annotated[Decontamination, Field(alias="decontaminate")] = Decontamination()
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    path: Annotated[Path | None, BeforeValidator(_loader_only)] = None

    def problems(self) -> Iterator[tuple[str, str]]:
        """The checks across entries (each entry's own run as it is read)."""
        owner: dict[str, str] = {}
        for i, tier in enumerate(self.tiers):
            if any(t.name == tier.name for t in self.tiers[:i]):
                yield f"tiers[{i}].name", f"duplicate tier name {tier.name!r}"
            for model in tier.models:
                if model in owner:
                    yield (
                        f"tiers[{i}].models",
                        f"model {model!r} is already in tier {owner[model]!r}; a model has one "
                        "tier",
                    )
                owner.setdefault(model, tier.name)
            prev = self.tiers[i - 1] if i else None
            if prev and tier.price_input + tier.price_output < prev.price_input + prev.price_output:
                yield (
                    f"tiers[{i}]",
                    f"tiers must be ordered cheapest first: {tier.name!r} costs less than "
                    f"{prev.name!r}",
                )
        for i, source in enumerate(self.sources):
            if source.format not in FORMATS:
                yield (
                    f"sources[{i}].format",
                    f"must be one of {list(FORMATS)}, got {source.format!r}",
                )

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
    label = f"{where}:"
    if isinstance(raw, dict):
        root_value = data_root or os.environ.get("TIERPICK_DATA_ROOT") or raw.get("data_root", ".")
        raw = dict(raw)
        if isinstance(root_value, str) and root_value.strip():
            root = Path(os.path.expanduser(root_value))
            raw["data_root"] = (root if root.is_absolute() else base_dir / root).resolve()
        else:
            raw["data_root"] = root_value  # refused below, naming data_root
        if where != "config" and "path" not in raw:  # a "path" key of the file is refused
            raw["path"] = Path(where)
    return parse_settings(TierConfig, raw, label)
