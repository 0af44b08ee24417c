"""Reading a part's rows: JSONL and CSV readers that keep a bad row as an error row with its
line, never dropping it; the field names an input starts with (for the clash check)."""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import itertools
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tierpick.classifier.errors import TierpickError
from tierpick.classifier.files import csv_records, first_bad_utf8_line, open_text
from tierpick.serving.scoring.options import Part, ScoreSummary, kind_of

Row = tuple[dict[str, Any], str | None, int]  # (fields, error found while reading, line)


def jsonl_rows(part: Part, summary: ScoreSummary) -> Iterator[Row]:
    path = Path(part.source)
    with unreadable_as_error(path):
        yield from _jsonl_lines(path, part, summary)


@contextlib.contextmanager
def unreadable_as_error(path: Path) -> Iterator[None]:
    """A truncated or fake gzip file, or a file that vanished, is one clear error."""
    try:
        yield
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise TierpickError(f"{path}: not a complete gzip file ({exc})") from exc
    except OSError as exc:
        raise TierpickError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def _jsonl_lines(path: Path, part: Part, summary: ScoreSummary) -> Iterator[Row]:
    gz = path.name.lower().endswith(".gz")
    with gzip.open(path, "rb") if gz else path.open("rb") as fh:
        if part.start:
            fh.seek(part.start)
        pos, lineno = part.start, part.first_line - 1
        for raw in fh:
            if 0 <= part.stop <= pos:
                break
            if pos == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]  # a byte-order mark, not part of the row
                pos += len(codecs.BOM_UTF8)
            pos += len(raw)
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                yield {"line": lineno, "raw": text}, "invalid UTF-8", lineno
                continue
            if not line.strip():
                summary.blank_lines += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield (
                    {"line": lineno, "raw": line.rstrip("\r\n")},
                    f"invalid JSON ({exc.msg})",
                    lineno,
                )
                continue
            except RecursionError:
                yield (
                    {"line": lineno, "raw": line.rstrip("\r\n")},
                    "invalid JSON (nested too deeply)",
                    lineno,
                )
                continue
            if isinstance(obj, dict):
                yield obj, None, lineno
            else:
                yield (
                    {"line": lineno, "raw": line.rstrip("\r\n")},
                    "row is not a JSON object",
                    lineno,
                )


# A CSV field may be this long (the csv module's default, 128 KiB, is shorter than long
# prompts); a longer one is an error row. A prompt is read up to 4 x max_chars characters.
CSV_FIELD_LIMIT = 64 << 20


def csv_rows(part: Part, summary: ScoreSummary) -> Iterator[Row]:
    path = Path(part.source)
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with unreadable_as_error(path), open_text(path, "r") as fh:
        try:
            for line, row, problem, detail in csv_records(csv.DictReader(fh)):
                error = f"{problem} ({detail})" if detail else problem
                yield row if row is not None else {"line": line}, error, line
        except UnicodeDecodeError as exc:  # the csv module reads text: one bad byte stops it
            bad = first_bad_utf8_line(path)
            raise TierpickError(
                f"{path}: line {bad} is not UTF-8 ({exc.reason}); re-encode the file or convert "
                "it to JSONL, where bad lines are kept as errors"
            ) from exc


def batched(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def input_fields(path: Path, lines: int = 1000) -> set[str]:
    """The field names an input file starts with: its CSV header or Parquet columns, or the keys
    of its first JSONL rows (checked again row by row while scoring)."""
    kind = kind_of(path)
    with unreadable_as_error(path):
        if kind == ".parquet":
            import pyarrow.parquet as pq

            try:
                return set(pq.ParquetFile(path).schema_arrow.names)
            except Exception as exc:  # pyarrow raises ArrowInvalid and OSError subclasses
                raise TierpickError(f"{path}: not a readable Parquet file: {exc}") from exc
        if kind == ".csv":
            csv.field_size_limit(CSV_FIELD_LIMIT)
            try:
                with open_text(path, "r") as fh:
                    return set(next(csv.reader(fh), []))
            except (UnicodeDecodeError, csv.Error):
                return set()  # reported with its line while scoring
        fields: set[str] = set()
        with open_text(path, "r") as fh:
            try:
                for line in itertools.islice(fh, lines):
                    with contextlib.suppress(ValueError, RecursionError):
                        obj = json.loads(line)
                        if isinstance(obj, dict):
                            fields.update(obj)
            except UnicodeDecodeError:
                pass  # a bad line is an error row while scoring
        return fields


def log_rows(inputs: Iterable[str | Path]) -> Iterator[tuple[dict[str, Any], str | None, str]]:
    """Every row of prompt logs (files, directories, globs, as ``tierpick score`` takes them):
    (fields, the error found reading it or None, ``file:line`` or ``file row N``). A bad row
    comes with its error, never dropped."""
    from tierpick.serving.scoring.plan import expand_inputs

    files, _ = expand_inputs(list(inputs))
    summary = ScoreSummary()
    for path in files:
        kind = kind_of(path)
        if kind == ".parquet":
            import pyarrow.parquet as pq

            with unreadable_as_error(path):
                try:
                    pf = pq.ParquetFile(path)
                except Exception as exc:  # pyarrow's own error types
                    raise TierpickError(f"{path}: not a readable Parquet file: {exc}") from exc
                n = 0
                for rb in pf.iter_batches(batch_size=4096):
                    for row in rb.to_pylist():
                        n += 1
                        yield row, None, f"{path} row {n}"
            continue
        part = Part(0, str(path), 0, -1, 1, path.name)
        reader = csv_rows if kind == ".csv" else jsonl_rows
        for row, error, line in reader(part, summary):
            yield row, error, f"{path}:{line}"
