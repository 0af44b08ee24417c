"""Batch scoring of prompt logs: ``tierpick score INPUT OUTPUT``.

Reads JSONL, CSV or Parquet (by extension; ``.jsonl.gz`` too), streams in batches so memory stays
flat on a multi-GB log, and writes the same kinds. Every output row keeps all input fields and
adds ``tier``, one ``p_<tier>`` per tier and ``error``. A bad row (invalid JSON, a missing,
non-string or empty prompt) is kept with its ``error`` set and empty probabilities, and counted:
row count out == row count in.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from classifier import TierClassifier
from classifier._io import open_text
from classifier.errors import TierpickError

KINDS = (".jsonl", ".jsonl.gz", ".csv", ".parquet")


def kind_of(path: Path) -> str:
    name = path.name.lower()
    for kind in KINDS:
        if name.endswith(kind):
            return kind
    raise TierpickError(f"{path}: unsupported file type; use one of {list(KINDS)}")


@dataclass
class ScoreSummary:
    rows: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    tiers: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def render(self) -> str:
        ok = self.rows - sum(self.errors.values())
        lines = [
            f"rows: {self.rows}  scored: {ok}  errors: {sum(self.errors.values())}  "
            f"time: {self.seconds:.2f} s  rows/s: {self.rows_per_second:,.0f}"
        ]
        if ok:
            lines.append(
                "tier mix: "
                + ", ".join(f"{t} {n} ({n / ok:.1%})" for t, n in self.tiers.most_common())
            )
        if self.cache_hits:
            lines.append(
                f"repeated prompts served from the cache: {self.cache_hits} of "
                f"{self.cache_hits + self.cache_misses}"
            )
        for reason, n in self.errors.most_common():
            lines.append(f"error: {reason}: {n}")
        return "\n".join(lines)


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
        if self.size <= 0:
            self.misses += len(prompts)
            return clf.predict_proba(prompts)
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
            fresh = clf.predict_proba(list(todo))
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
    good = [i for i, e in enumerate(errors) if e is None]
    proba = np.full((len(values), len(clf.tiers)), np.nan, dtype=np.float32)
    tiers: list[str | None] = [None] * len(values)
    if good:
        prompts = [values[i] for i in good]
        p = (cache or PredictionCache(0)).predict(clf, prompts)  # type: ignore[arg-type]
        proba[good] = p
        chosen, _ = clf.choose(p)
        for i, c in zip(good, chosen, strict=True):
            tiers[i] = clf.tiers[int(c)]
    return proba, tiers, errors


def _json_batches(path: Path, size: int) -> Iterator[list[tuple[dict[str, Any], str | None]]]:
    batch: list[tuple[dict[str, Any], str | None]] = []
    with open_text(path, "r") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                row, err = (
                    (obj, None)
                    if isinstance(obj, dict)
                    else ({"line": lineno, "raw": line.rstrip("\n")}, "row is not a JSON object")
                )
            except json.JSONDecodeError as exc:
                row, err = {"line": lineno, "raw": line.rstrip("\n")}, f"invalid JSON ({exc.msg})"
            batch.append((row, err))
            if len(batch) >= size:
                yield batch
                batch = []
    if batch:
        yield batch


def _csv_batches(path: Path, size: int) -> Iterator[list[tuple[dict[str, Any], str | None]]]:
    batch: list[tuple[dict[str, Any], str | None]] = []
    with open_text(path, "r") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            extra = row.pop(None, None)  # a long row; a short one has None values (restval)
            short = any(v is None for v in row.values())
            batch.append((row, "wrong number of CSV fields" if extra or short else None))
            if len(batch) >= size:
                yield batch
                batch = []
    if batch:
        yield batch


def score_file(
    clf: TierClassifier,
    src: Path,
    dst: Path,
    prompt_field: str = "prompt",
    batch_size: int = 4096,
    progress: bool | None = None,
    cache_size: int = 100_000,
) -> ScoreSummary:
    """Score one file into another (see module docstring); returns the summary."""
    in_kind, out_kind = kind_of(src), kind_of(dst)
    if not src.is_file():
        raise TierpickError(f"input {src} does not exist")
    dst.parent.mkdir(parents=True, exist_ok=True)
    summary = ScoreSummary()
    show = sys.stderr.isatty() if progress is None else progress
    start = time.perf_counter()
    prob_cols = [f"p_{t}" for t in clf.tiers]
    cache = PredictionCache(cache_size)
    writer = _Writer(dst, out_kind, prob_cols)
    try:
        if in_kind == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(src)
            if prompt_field not in pf.schema_arrow.names:
                raise TierpickError(
                    f"{src}: no column {prompt_field!r}; columns: {pf.schema_arrow.names}"
                )
            for rb in pf.iter_batches(batch_size=batch_size):
                values = rb.column(prompt_field).to_pylist()
                proba, tiers, errors = score_prompts(clf, values, cache)
                writer.write_arrow(rb, proba, tiers, errors)
                _count(summary, tiers, errors)
                if show:
                    _progress(summary, start)
        else:
            batches = (_json_batches if in_kind.startswith(".jsonl") else _csv_batches)(
                src, batch_size
            )
            for batch in batches:
                values = [row.get(prompt_field) if err is None else None for row, err in batch]
                proba, tiers, errors = score_prompts(clf, values, cache)
                errors = [pre or err for (_, pre), err in zip(batch, errors, strict=True)]
                writer.write_rows([row for row, _ in batch], proba, tiers, errors)
                _count(summary, tiers, errors)
                if show:
                    _progress(summary, start)
    finally:
        writer.close()
    summary.seconds = time.perf_counter() - start
    summary.cache_hits, summary.cache_misses = cache.hits, cache.misses
    if show:
        sys.stderr.write("\n")
    return summary


def _count(summary: ScoreSummary, tiers: list[str | None], errors: list[str | None]) -> None:
    summary.rows += len(tiers)
    summary.tiers.update(t for t in tiers if t is not None)
    summary.errors.update(e.split(" (")[0] for e in errors if e is not None)


def _progress(summary: ScoreSummary, start: float) -> None:
    rate = summary.rows / max(time.perf_counter() - start, 1e-9)
    sys.stderr.write(f"\r{summary.rows:,} rows  {rate:,.0f} rows/s")
    sys.stderr.flush()


class _Writer:
    """Writes scored batches as JSONL, CSV or Parquet, keeping every input field.

    Batches arrive as Arrow tables (Parquet input) or lists of dicts (JSONL/CSV input); each
    is converted once to what the output kind needs.
    """

    def __init__(self, path: Path, kind: str, prob_cols: list[str]) -> None:
        self.path, self.kind, self.prob_cols = path, kind, prob_cols
        self._fh: IO[str] | None = None
        self._csv: csv.DictWriter[str] | None = None
        self._pq: Any = None

    def _added(
        self, proba: np.ndarray, tiers: list[str | None], errors: list[str | None]
    ) -> dict[str, list[Any]]:
        cols: dict[str, list[Any]] = {"tier": list(tiers)}
        for j, name in enumerate(self.prob_cols):
            cols[name] = [None if np.isnan(v) else float(v) for v in proba[:, j]]
        cols["error"] = list(errors)
        return cols

    def write_rows(
        self,
        rows: list[dict[str, Any]],
        proba: np.ndarray,
        tiers: list[str | None],
        errors: list[str | None],
    ) -> None:
        added = self._added(proba, tiers, errors)
        out = [{**row, **{k: v[i] for k, v in added.items()}} for i, row in enumerate(rows)]
        if self.kind == ".parquet":
            import pyarrow as pa

            nested = (dict, list)
            self._write_table(
                pa.Table.from_pylist(
                    [
                        {k: json.dumps(v) if isinstance(v, nested) else v for k, v in r.items()}
                        for r in out
                    ]
                )
            )
        else:
            self._write_dicts(out)

    def write_arrow(
        self, rb: Any, proba: np.ndarray, tiers: list[str | None], errors: list[str | None]
    ) -> None:
        import pyarrow as pa

        table = pa.Table.from_batches([rb])
        for name, values in self._added(proba, tiers, errors).items():
            typ = pa.float32() if name.startswith("p_") else pa.string()
            table = table.append_column(name, pa.array(values, type=typ))
        if self.kind == ".parquet":
            self._write_table(table)
        else:
            self._write_dicts(table.to_pylist())

    def _write_dicts(self, rows: list[dict[str, Any]]) -> None:
        if self._fh is None:
            self._fh = open_text(self.path, "w")
        if self.kind == ".csv":
            if self._csv is None:
                names = list(dict.fromkeys(k for r in rows for k in r))
                self._csv = csv.DictWriter(self._fh, fieldnames=names, extrasaction="ignore")
                self._csv.writeheader()
            self._csv.writerows(rows)
        else:
            self._fh.write(
                "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
            )

    def _write_table(self, table: Any) -> None:
        import pyarrow.parquet as pq

        if self._pq is None:
            self._pq = pq.ParquetWriter(self.path, table.schema)
        elif table.schema != self._pq.schema:
            try:
                table = table.select(self._pq.schema.names).cast(self._pq.schema)
            except (KeyError, ValueError) as exc:
                raise TierpickError(
                    f"{self.path}: rows of this batch have other fields or types than the "
                    f"first batch ({exc}); write JSONL instead for heterogeneous rows"
                ) from exc
        self._pq.write_table(table)

    def close(self) -> None:
        if self._pq is not None:
            self._pq.close()
        if self._fh is not None:
            self._fh.close()
        if self._pq is None and self._fh is None:
            self.path.touch()
