"""Writing scored rows as JSONL, CSV or Parquet, keeping every input field, and joining part
files into one output file in input order."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from tierpick.classifier.errors import TierpickError
from tierpick.serving.scoring.options import EXTRA


def rows_to_table(
    rows: list[dict[str, Any]], schema: Any, fixed: dict[str, Any], extra_name: str = EXTRA
) -> Any:
    """An Arrow table of JSON rows that fits one Parquet file's columns, losing nothing.

    The first batch (``schema`` None) sets the columns: nested values become JSON text, a column
    of mixed types (a number among strings, as junk rows have) becomes text, an all-null column
    text, and ``fixed`` names the types of the columns scoring adds. Later batches are fitted to
    that schema: a missing field is null, and a field the schema lacks, or a value that does not
    fit its column's type, goes into the ``extra_fields`` column as a JSON object.
    """
    import pyarrow as pa

    bad = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError)
    first = schema is None
    keys = dict.fromkeys(k for r in rows for k in r) if rows else dict.fromkeys(fixed)
    names = [n for n in (keys if first else schema.names) if n != extra_name]
    extra: list[dict[str, Any]] = [{} for _ in rows]
    if not first:
        known = set(names)
        for row, e in zip(rows, extra, strict=True):
            e.update((k, v) for k, v in row.items() if k not in known)
    arrays = []
    for name in names:
        values = [r.get(name) for r in rows]
        values = [json.dumps(v) if isinstance(v, dict | list) else v for v in values]
        typ = fixed.get(name) if first else schema.field(name).type
        try:
            arr = pa.array(values, type=typ)
            if first and pa.types.is_null(arr.type):
                arr = pa.array(values, type=pa.string())
        except bad:
            if first:
                text = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
                arr = pa.array(text, type=pa.string())
            else:
                fitted: list[Any] = []
                for row, v, e in zip(rows, values, extra, strict=True):
                    try:
                        pa.array([v], type=typ)
                        fitted.append(v)
                    except bad:
                        e[name] = row.get(name)
                        fitted.append(None)
                arr = pa.array(fitted, type=typ)
        arrays.append(arr)
    arrays.append(
        pa.array(
            [json.dumps(e, ensure_ascii=False, default=str) if e else None for e in extra],
            type=pa.string(),
        )
    )
    return pa.table(arrays, names=[*names, extra_name])


class Writer:
    """Writes scored batches as JSONL, CSV or Parquet, keeping every input field.

    Batches arrive as Arrow record batches (Parquet input) or lists of dicts (JSONL/CSV input);
    each is converted once to what the output kind needs.
    """

    def __init__(self, path: Path, kind: str, added: list[str], model_version: str) -> None:
        """``added``: the names of the columns scoring adds (:func:`output_columns`)."""
        self.path, self.kind, self.added = path, kind, added
        self.tier_col, *self.prob_cols, self.error_col, self.version_col, self.extra_col = added
        self.model_version = model_version
        self._fh: IO[str] | None = None
        self._csv: csv.DictWriter[str] | None = None
        self._pq: Any = None

    @property
    def written(self) -> bool:
        return self._fh is not None or self._pq is not None

    def _added(
        self, proba: np.ndarray, tiers: list[str | None], errors: list[str | None]
    ) -> dict[str, list[Any]]:
        cols: dict[str, list[Any]] = {self.tier_col: list(tiers)}
        for j, name in enumerate(self.prob_cols):
            cols[name] = [None if np.isnan(v) else float(v) for v in proba[:, j]]
        cols[self.error_col] = list(errors)
        cols[self.version_col] = [self.model_version] * len(tiers)
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

            fixed = {
                self.tier_col: pa.string(),
                self.error_col: pa.string(),
                self.version_col: pa.string(),
            }
            fixed.update((name, pa.float32()) for name in self.prob_cols)
            schema = self._pq.schema if self._pq is not None else None
            self._write_table(rows_to_table(out, schema, fixed, self.extra_col))
        else:
            self._write_dicts(out)

    def write_arrow(
        self, rb: Any, proba: np.ndarray, tiers: list[str | None], errors: list[str | None]
    ) -> None:
        import pyarrow as pa

        table = pa.Table.from_batches([rb])
        for name, values in self._added(proba, tiers, errors).items():
            typ = pa.float32() if name in self.prob_cols else pa.string()
            table = table.append_column(name, pa.array(values, type=typ))
        if self.kind == ".parquet":
            self._write_table(table)
        else:
            self._write_dicts(table.to_pylist())

    def _write_dicts(self, rows: list[dict[str, Any]]) -> None:
        if self._fh is None:
            self._fh = (
                gzip.open(self.path, "wt", encoding="utf-8", newline="")  # noqa: SIM115
                if self.kind == ".jsonl.gz"
                else self.path.open("w", encoding="utf-8", newline="")
            )
        if self.kind == ".csv":
            if self._csv is None:
                names = list(dict.fromkeys(k for r in rows for k in r)) or [
                    n for n in self.added if n != self.extra_col
                ]
                self._csv = csv.DictWriter(self._fh, fieldnames=names)
                self._csv.writeheader()
            try:
                self._csv.writerows(rows)
            except ValueError as exc:  # a row with a field the header lacks
                raise TierpickError(
                    f"{self.path}: {exc}; write JSONL or Parquet for rows with varying fields"
                ) from exc
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
                table = conform(table, self._pq.schema)
            except (KeyError, ValueError) as exc:
                raise TierpickError(
                    f"{self.path}: rows of this batch have other fields or types than the "
                    f"first batch ({exc}); write JSONL instead for heterogeneous rows"
                ) from exc
        self._pq.write_table(table)

    def close(self) -> None:
        if not self.written:  # no row: still a valid file, with the columns scoring adds
            empty = np.zeros((0, len(self.prob_cols)), dtype=np.float32)
            self.write_rows([], empty, [], [])
        if self._pq is not None:
            self._pq.close()
        if self._fh is not None:
            self._fh.close()


def join_parts(paths: Sequence[Path], dst: Path, kind: str) -> None:
    """Join part files, in order, into one file of ``kind`` (written to a temporary name first)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if kind == ".parquet":
        _join_parquet(paths, tmp)
    else:
        header: bytes | None = None
        with tmp.open("wb") as out:
            for path in paths:
                if path.stat().st_size == 0:
                    continue
                with path.open("rb") as fh:
                    if kind == ".csv":  # every part starts with its header: keep the first
                        first = fh.readline()
                        if header is not None and first != header:
                            raise TierpickError(
                                f"{path}: its CSV columns differ from the first part's; "
                                "write JSONL or Parquet for rows with varying fields"
                            )
                        if header is None:
                            header = first
                            out.write(first)
                    shutil.copyfileobj(fh, out, 1 << 20)  # gzip members concatenate too
    os.replace(tmp, dst)


def _join_parquet(paths: Sequence[Path], dst: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [pq.ParquetFile(p) for p in paths if p.stat().st_size > 0]
    if not files:
        dst.touch()
        return
    try:
        schema = pa.unify_schemas([f.schema_arrow for f in files], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise TierpickError(f"parts have incompatible columns ({exc}); write JSONL") from exc
    with pq.ParquetWriter(dst, schema) as writer:
        for f in files:
            for g in range(f.num_row_groups):
                writer.write_table(conform(f.read_row_group(g), schema))


def conform(table: Any, schema: Any) -> Any:
    """``table`` with ``schema``'s columns in its order (missing ones null), cast to its types."""
    import pyarrow as pa

    for name in schema.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(schema.names).cast(schema)
