"""Outcome rows and the report that accounts for every row that was not turned into one."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Outcome:
    """One model's result on one prompt.

    Attributes:
        prompt_id: the source's own identity of the prompt (``mmlu-pro:11285``).
        prompt: the normalized prompt text, as the classifier will see it.
        model: the model name as it appears in the source.
        score: success in [0, 1] (1 = correct / preferred).
        source: where the outcome comes from (``mmlu-pro``, ``alpaca-eval``, ...).
        task: the task or category inside the source.
        origin: ``file:line`` (or ``file[index]``) of the row it was read from.
        family: the configured source family (see :class:`training.config.Source`); empty
            until :func:`training.ingest.read_source` sets it.
    """

    prompt_id: str
    prompt: str
    model: str
    score: float
    source: str
    task: str
    origin: str
    family: str = ""


@dataclass(frozen=True, slots=True)
class Problem:
    """A row that was dropped, with where it was and why."""

    origin: str
    reason: str
    detail: str = ""


@dataclass
class IngestReport:
    """Everything ingestion noticed: dropped rows, notes on kept rows, warnings, files read."""

    problems: list[Problem] = field(default_factory=list)
    notes: collections.Counter[str] = field(default_factory=collections.Counter)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # file -> outcome rows read
    skipped_files: list[str] = field(default_factory=list)

    def drop(self, origin: str, reason: str, detail: str = "") -> None:
        """Record a row that could not become an outcome."""
        self.problems.append(Problem(origin, reason, detail))

    def note(self, reason: str, count: int = 1) -> None:
        """Count something worth knowing about rows that were kept (e.g. a null ``pred``)."""
        self.notes[reason] += count

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def dropped_by_reason(self) -> dict[str, int]:
        return dict(collections.Counter(p.reason for p in self.problems).most_common())

    def merge(self, other: IngestReport) -> None:
        self.problems.extend(other.problems)
        self.notes.update(other.notes)
        for w in other.warnings:
            self.warn(w)
        self.files.update(other.files)
        self.skipped_files.extend(other.skipped_files)
