"""Scoring: a batch of raw prompt values (bad ones become error rows), and a whole part into its
output file, committed atomically with a record of its counts. The same code on every engine."""

from __future__ import annotations

import itertools
import os
import resource
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tierpick.classifier import TierClassifier
from tierpick.classifier.errors import TierpickError
from tierpick.serving.scoring.options import (
    BOOKKEEPING,
    MAX_EXAMPLES,
    Part,
    ScoreOptions,
    ScoreSummary,
    check_no_clash,
    kind_of,
    output_columns,
)
from tierpick.serving.scoring.read import batched, csv_rows, jsonl_rows
from tierpick.serving.scoring.resume import atomic_write_json, record_path
from tierpick.serving.scoring.write import Writer

EMPTY_ONCE_NORMALIZED = (
    "empty prompt once normalized (only white space, control or zero-width characters)"
)


def _prompt_error(value: object) -> str | None:
    if value is None:
        return "missing prompt"
    if not isinstance(value, str):
        return f"prompt is not a string ({type(value).__name__})"
    if not value.strip():
        return "empty prompt"
    return None


class PredictionCache:
    """Probabilities of prompts already scored in this run, keyed by the exact prompt text.

    Prompt logs repeat themselves (retries, templated prompts); a hit skips tokenization and
    inference. Bounded: the oldest entries go first. ``size=0`` turns it off.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._rows: dict[str, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def predict(self, clf: TierClassifier, prompts: list[str]) -> np.ndarray:
        """Probabilities of prompts already prepared (:meth:`TierClassifier.prepare`)."""
        if self.size <= 0:
            self.misses += len(prompts)
            return clf.predict_proba(prompts, prepared=True)
        out = np.empty((len(prompts), len(clf.tiers)), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            row = self._rows.get(p)
            if row is None:
                todo.setdefault(p, []).append(i)
            else:
                out[i] = row
        self.hits += len(prompts) - sum(len(v) for v in todo.values())
        self.misses += sum(len(v) for v in todo.values())
        if todo:
            fresh = clf.predict_proba(list(todo), prepared=True)
            for (p, idx), row in zip(todo.items(), fresh, strict=True):
                out[idx] = row
                self._rows[p] = row
            while len(self._rows) > self.size:
                del self._rows[next(iter(self._rows))]
        return out


def score_prompts(
    clf: TierClassifier, values: list[object], cache: PredictionCache | None = None
) -> tuple[np.ndarray, list[str | None], list[str | None]]:
    """Probabilities (NaN for bad rows), tiers and errors for a batch of raw prompt values."""
    errors = [_prompt_error(v) for v in values]
    candidates = [i for i, e in enumerate(errors) if e is None]
    texts = clf.prepare([values[i] for i in candidates])  # type: ignore[misc]
    good, prompts = [], []
    for i, text in zip(candidates, texts, strict=True):
        if text:
            good.append(i)
            prompts.append(text)
        else:
            errors[i] = EMPTY_ONCE_NORMALIZED
    proba = np.full((len(values), len(clf.tiers)), np.nan, dtype=np.float32)
    tiers: list[str | None] = [None] * len(values)
    if good:
        p = (cache or PredictionCache(0)).predict(clf, prompts)
        proba[good] = p
        chosen, _ = clf.router().choose(p)
        for i, c in zip(good, chosen, strict=True):
            tiers[i] = clf.tiers[int(c)]
    return proba, tiers, errors


def score_part(
    clf: TierClassifier,
    part: Part,
    work: Path,
    opts: ScoreOptions,
    cache: PredictionCache | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> ScoreSummary:
    """Score one part into ``work/part.name``, commit it and record its counts; ``on_rows`` is
    told of each batch's rows as it is written (the run's progress within a part)."""
    summary = ScoreSummary(parts=1)
    cache = cache or PredictionCache(opts.cache_size)
    hits, misses = cache.hits, cache.misses
    src = Path(part.source)
    tmp = work / BOOKKEEPING / "tmp" / f"{part.index:05d}{opts.out_kind}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    writer = Writer(tmp, opts.out_kind, output_columns(opts, clf.tiers), clf.version)
    try:
        if kind_of(src) == ".parquet":
            _score_parquet(clf, part, opts, cache, writer, summary, on_rows)
        else:
            reader = csv_rows if kind_of(src) == ".csv" else jsonl_rows
            for batch in batched(reader(part, summary), opts.batch_size):
                fields = {k for row, _, _ in batch for k in row}
                if set(writer.added) & fields:
                    line = next(n for row, _, n in batch if set(row) & set(writer.added))
                    check_no_clash(fields, writer.added, f"{src}:{line}")
                values = [
                    row.get(opts.prompt_field) if err is None else None for row, err, _ in batch
                ]
                proba, tiers, errors = score_prompts(clf, values, cache)
                errors = [pre or err for (_, pre, _), err in zip(batch, errors, strict=True)]
                writer.write_rows([row for row, _, _ in batch], proba, tiers, errors)
                _count(summary, tiers, errors, [f"{src}:{line}" for _, _, line in batch])
                if on_rows is not None:
                    on_rows(len(batch))
    finally:
        writer.close()
    out = work / part.name
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    summary.cache_hits, summary.cache_misses = cache.hits - hits, cache.misses - misses
    summary.worker_peak_rss_mb = peak_rss_mb()
    atomic_write_json(record_path(work, part), summary.to_json())
    return summary


def _score_parquet(
    clf: TierClassifier,
    part: Part,
    opts: ScoreOptions,
    cache: PredictionCache,
    writer: Writer,
    summary: ScoreSummary,
    on_rows: Callable[[int], None] | None = None,
) -> None:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(part.source)
    if opts.prompt_field not in pf.schema_arrow.names:
        raise TierpickError(
            f"{part.source}: no column {opts.prompt_field!r}; columns: {pf.schema_arrow.names}"
        )
    check_no_clash(pf.schema_arrow.names, writer.added, part.source)
    first = sum(pf.metadata.row_group(g).num_rows for g in range(part.start))
    batches = pf.iter_batches(batch_size=opts.batch_size, row_groups=range(part.start, part.stop))
    for rb in itertools.chain(batches, [pf.schema_arrow.empty_table().to_batches()]):
        if isinstance(rb, list):  # the end: an empty batch keeps an empty file's columns
            if writer.written:
                break
            import pyarrow as pa

            rb = pa.RecordBatch.from_pylist([], schema=pf.schema_arrow)
        values = rb.column(opts.prompt_field).to_pylist()
        proba, tiers, errors = score_prompts(clf, values, cache)
        writer.write_arrow(rb, proba, tiers, errors)
        row0 = first + summary.rows
        _count(
            summary, tiers, errors, [f"{part.source} row {row0 + i}" for i in range(len(values))]
        )
        if on_rows is not None:
            on_rows(len(values))


def _count(
    summary: ScoreSummary, tiers: list[str | None], errors: list[str | None], where: list[str]
) -> None:
    summary.rows += len(tiers)
    summary.tiers.update(t for t in tiers if t is not None)
    for err, loc in zip(errors, where, strict=True):
        if err is not None:
            summary.errors[err.split(" (")[0]] += 1
            if len(summary.examples) < MAX_EXAMPLES:
                summary.examples.append(f"{loc}: {err}")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
