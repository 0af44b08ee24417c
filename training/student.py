"""The student seam: what training asks of a student, and the registry of student kinds.

A student is the model that is served: a small network that reads a prompt's token ids and
gives one logit per tier, distilled from the teacher (a frozen transformer) without labels, its
tier head fitted afterwards. Training touches a student only through :class:`Student` (the
model) and :class:`StudentKind` (how one is distilled); export writes :meth:`Student.outputs` as
the graph contract of :mod:`tierpick.classifier.artifact`. A new kind of student is one module
with a :class:`StudentKind`, named in :data:`KINDS` and chosen by ``train.student.kind``
(``tests/training/bag_student.py`` is one, in 60 lines).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from tierpick.classifier.errors import ConfigError
from tierpick.training.config import TierConfig
from tierpick.training.encoders import pad_ids

FloatArray = npt.NDArray[np.float32]


class Student(Protocol):
    """A served model in training: token ids and their mask in (batch x tokens)."""

    head: nn.Module  # the tier head, set once it is fitted on :meth:`pooled`

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence embedding the tier head reads (batch x width)."""
        ...

    def outputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph's outputs: the logits (batch x tiers; the head's last layer a linear one,
        which ``tierpick adapt`` refits) and the prompt's embedding (batch x width), which
        ``label`` and ``adapt`` read and drift is measured on."""
        ...

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The logits."""
        ...


class StudentContext(Protocol):
    """What a kind may use of a training run: its config, the student's tokenizer, the
    teacher's encoder, and a memo shared by every fit of the run (the model, each fold)."""

    config: TierConfig
    tokenizer: Any
    memo: dict[str, Any]

    def encoder(self) -> nn.Module: ...


@dataclass(frozen=True)
class DistillData:
    """A distillation's inputs: token ids and the teacher's embedding of each training text
    (prompts, then crops of them), the training prompts' ids alone, and the validation set's."""

    ids: list[list[int]]
    targets: FloatArray
    prompt_ids: list[list[int]]
    val_ids: list[list[int]]
    val_targets: FloatArray


class StudentKind(Protocol):
    """How a kind of student is distilled."""

    name: str

    def distill(
        self, ctx: StudentContext, data: DistillData, seed: int
    ) -> tuple[Student, dict[str, Any]]:
        """A student trained to reproduce ``data.targets`` (early-stopped on the validation
        texts) and a summary of its training; its ``head`` is set afterwards."""
        ...


# name (``train.student.kind``) -> "module:class" of its StudentKind, imported when chosen
KINDS: dict[str, str] = {"static": "tierpick.training.static_student:StaticKind"}


def kind_of(config: TierConfig) -> StudentKind:
    """The configured kind of student."""
    import importlib

    name = config.train.student.kind
    if name not in KINDS:
        raise ConfigError(f"train.student.kind: {name!r} is not one of {sorted(KINDS)}")
    module, _, attr = KINDS[name].partition(":")
    kind: StudentKind = getattr(importlib.import_module(module), attr)()
    return kind


@torch.no_grad()
def embeddings(model: Student, ids: Sequence[Sequence[int]], batch: int = 512) -> FloatArray:
    """The student's sentence embedding (before its head) of each token-id row."""
    out = [model.pooled(*pad_ids(ids[s : s + batch])).numpy() for s in range(0, len(ids), batch)]
    if not out:
        return np.zeros((0, int(model.pooled(*pad_ids([[0]])).shape[1])), np.float32)
    return np.concatenate(out)


@torch.no_grad()
def logits(model: Student, ids: Sequence[Sequence[int]], batch: int = 512) -> FloatArray:
    out = []
    for s in range(0, len(ids), batch):
        x, m = pad_ids(ids[s : s + batch])
        out.append(model(x, m).numpy())
    if not out:  # the width comes from the model itself
        return np.zeros((0, int(model(*pad_ids([[0]])).shape[1])), np.float32)
    return np.concatenate(out)
