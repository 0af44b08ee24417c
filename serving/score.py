"""Batch scoring of prompt logs: ``tierpick score INPUT... OUTPUT``.

Inputs are files, directories (searched recursively) or globs of JSONL (``.jsonl``,
``.jsonl.gz``), CSV or Parquet. The work is cut into *parts*: byte ranges of a JSONL file cut at
line ends, runs of Parquet row groups, and whole CSV or gzip files (neither can be cut without
reading it). Parts are scored by a pool of spawned worker processes with a model each (or by a
Ray actor pool, :mod:`serving.score_ray`); a part is scored by the same code on every path.

Output:

- one input file -> one output file of the kind its extension names; parts are written under
  ``.OUTPUT.parts/`` beside it and joined in input order at the end;
- a directory, a glob or several inputs -> a directory with one file per part (Parquet unless
  ``--format`` says otherwise) named after its input, plus ``_tierpick/`` bookkeeping, which
  dataset readers skip (a leading underscore).

Every output row keeps all input fields and adds ``tier``, one ``p_<tier>`` per tier and
``error``. A bad row (invalid JSON or UTF-8, a missing, non-string or empty prompt, a CSV row
with the wrong number of fields) is kept with its ``error`` set and empty probabilities, counted,
and the first few are reported with their file and line: row count out == row count in.

Resume: a finished part is committed atomically (written to a temporary name, renamed, then
recorded). Rerunning the same command on the same inputs (same sizes and modification times)
with the same model skips the finished parts; a work directory left by a different run is
refused unless ``--restart`` is given.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import fcntl
import glob
import gzip
import itertools
import json
import os
import resource
import shutil
import signal
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from tierpick.classifier import TierClassifier
from tierpick.classifier._io import first_bad_utf8_line, open_text
from tierpick.classifier.errors import ConfigError, TierpickError

KINDS = (".jsonl", ".jsonl.gz", ".csv", ".parquet")
BOOKKEEPING = "_tierpick"  # under a work directory: plan, records of finished parts, temp files
MAX_EXAMPLES = 5  # bad rows reported by location in the summary


def kind_of(path: Path) -> str:
    name = path.name.lower()
    for kind in KINDS:
        if name.endswith(kind):
            return kind
    raise TierpickError(f"{path}: unsupported file type; use one of {list(KINDS)}")


@dataclass(frozen=True)
class ScoreOptions:
    """What a part's scoring needs besides the model; the same on every engine.

    ``prompt_field``, ``out_kind`` and ``output_prefix`` change the output, so they are part
    of the resume check; the others only change speed.
    """

    prompt_field: str = "prompt"
    out_kind: str = ".parquet"
    output_prefix: str = ""  # put before the names of the columns scoring adds
    batch_size: int = 4096
    cache_size: int = 100_000
    part_bytes: int = 32 << 20  # a JSONL file is cut into parts of about this many bytes
    threads: int = 1  # ONNX Runtime intra-op threads per worker


def output_columns(opts: ScoreOptions, tiers: Sequence[str]) -> list[str]:
    """The columns scoring adds to every row (``extra_fields`` for Parquet output too)."""
    p = opts.output_prefix
    return [f"{p}tier", *[f"{p}p_{t}" for t in tiers], f"{p}error", f"{p}{EXTRA}"]


def check_no_clash(fields: Iterable[str], added: Sequence[str], where: str) -> None:
    """Refuse input fields that the columns scoring adds would overwrite."""
    clash = sorted(set(fields) & set(added))
    if clash:
        raise ConfigError(
            f"{where}: input field(s) {clash} have the names of columns scoring adds and would "
            "be overwritten; give the added columns a prefix, e.g. --output-prefix tierpick_"
        )


@dataclass(frozen=True)
class Part:
    """A unit of work: rows of one input file, and the output file they go to.

    ``start``/``stop`` are byte offsets for JSONL (``stop`` -1: to the end) and a row-group range
    for Parquet; ``first_line`` is the line number of the range's first line (JSONL).
    """

    index: int
    source: str
    start: int
    stop: int
    first_line: int
    name: str


@dataclass
class ScoreSummary:
    rows: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    tiers: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # "file:line: error" of the first bad rows
    blank_lines: int = 0
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    parts: int = 0
    parts_resumed: int = 0
    workers: int = 1
    worker_peak_rss_mb: float = 0.0  # the largest peak RSS of one scoring process
    main_peak_rss_mb: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: ScoreSummary) -> None:
        """Fold a part's counts into this summary (times and process figures excepted)."""
        self.rows += other.rows
        self.errors.update(other.errors)
        self.tiers.update(other.tiers)
        self.examples.extend(other.examples[: MAX_EXAMPLES - len(self.examples)])
        self.blank_lines += other.blank_lines
        self.cache_hits += other.cache_hits
        self.cache_misses += other.cache_misses
        self.worker_peak_rss_mb = max(self.worker_peak_rss_mb, other.worker_peak_rss_mb)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["errors"], d["tiers"] = dict(self.errors), dict(self.tiers)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScoreSummary:
        return cls(**{**d, "errors": Counter(d["errors"]), "tiers": Counter(d["tiers"])})

    def render(self) -> str:
        bad = sum(self.errors.values())
        ok = self.rows - bad
        lines = [
            f"rows: {self.rows}  scored: {ok}  errors: {bad}  "
            f"time: {self.seconds:.2f} s  rows/s: {self.rows_per_second:,.0f}"
        ]
        if ok:
            lines.append(
                "tier mix: "
                + ", ".join(f"{t} {n} ({n / ok:.1%})" for t, n in self.tiers.most_common())
            )
        resumed = (
            f" ({self.parts_resumed} finished by an earlier run)" if self.parts_resumed else ""
        )
        lines.append(f"parts: {self.parts}{resumed}  scoring processes: {self.workers}")
        if self.worker_peak_rss_mb:
            lines.append(
                f"peak RSS: main {self.main_peak_rss_mb:.0f} MB, largest worker "
                f"{self.worker_peak_rss_mb:.0f} MB"
            )
        if self.cache_hits:
            lines.append(
                f"repeated prompts served from the cache: {self.cache_hits} of "
                f"{self.cache_hits + self.cache_misses}"
            )
        if self.blank_lines:
            lines.append(f"blank lines skipped (no row): {self.blank_lines}")
        for reason, n in self.errors.most_common():
            lines.append(f"error: {reason}: {n}")
        lines.extend(f"  e.g. {e}" for e in self.examples)
        return "\n".join(lines)


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


# --------------------------------------------------------------------------- planning


def expand_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], Path | None]:
    """The input files, in a stable order, and the folder their output names are relative to.

    Each input is a file, a directory (every supported file under it, names starting with ``.``
    or ``_`` skipped) or a glob. The folder is None when the input is one plain file (file in,
    file out).
    """
    if not inputs:
        raise ConfigError("no input given")
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if any(c in text for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True))
            matched = [p for p in found if p.is_file() and _supported(p)]
            if not matched:
                raise ConfigError(f"{text}: the glob matches no {'/'.join(KINDS)} file")
            files += matched
        elif path.is_dir():
            matched = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and _supported(p)
                and not any(s.startswith((".", "_")) for s in p.relative_to(path).parts)
            )
            if not matched:
                raise ConfigError(f"{path}: the directory holds no {'/'.join(KINDS)} file")
            files += matched
        elif path.is_file():
            kind_of(path)
            files.append(path)
        else:
            raise ConfigError(f"input {path} does not exist")
    files = list(dict.fromkeys(p.resolve() for p in files))
    if len(inputs) == 1 and Path(str(inputs[0])).is_file():
        return files, None
    return files, Path(os.path.commonpath([p.parent for p in files]))


def _supported(path: Path) -> bool:
    return path.name.lower().endswith(KINDS)


def _jsonl_ranges(path: Path, part_bytes: int) -> list[tuple[int, int, int]]:
    """(start, stop, first line) byte ranges of a JSONL file, cut just after a newline."""
    size = path.stat().st_size
    if size <= part_bytes:
        return [(0, -1, 1)]
    cuts = [(0, 1)]
    pos, line, target = 0, 1, part_bytes
    with path.open("rb") as fh:
        while block := fh.read(1 << 23):
            while target < pos + len(block):
                nl = block.find(b"\n", max(target - pos, 0))
                if nl < 0:
                    break
                cuts.append((pos + nl + 1, line + block.count(b"\n", 0, nl + 1)))
                target = pos + nl + 1 + part_bytes
            line += block.count(b"\n")
            pos += len(block)
    cuts = [c for c in cuts if c[0] < size]
    return [
        (start, cuts[i + 1][0] if i + 1 < len(cuts) else -1, first)
        for i, (start, first) in enumerate(cuts)
    ]


def plan_parts(files: Sequence[Path], base: Path | None, opts: ScoreOptions) -> list[Part]:
    """Cut the input files into parts (see the module docstring), in input order."""
    parts: list[Part] = []
    for path in files:
        kind = kind_of(path)
        if kind == ".jsonl":
            ranges = _jsonl_ranges(path, opts.part_bytes)
        elif kind == ".parquet":
            ranges = _parquet_ranges(path, opts.part_bytes)
        else:  # gzip and CSV: read from the start (CSV fields may hold newlines)
            ranges = [(0, -1, 1)]
        for k, (start, stop, first) in enumerate(ranges):
            if base is None:  # one file in, one out: parts are temporary, named by position
                name = f"part-{len(parts):05d}{opts.out_kind}"
            else:  # named after the input, so each output file maps back to its input
                stem = _output_stem(path, base)
                name = f"{stem}-{k:05d}" if len(ranges) > 1 else stem
                name += opts.out_kind
            parts.append(Part(len(parts), str(path), start, stop, first, name))
    names = Counter(p.name for p in parts)
    if clash := [n for n, c in names.items() if c > 1]:
        raise ConfigError(
            f"inputs of different kinds share a name, so their outputs would too: {clash[:3]}; "
            "score them separately"
        )
    return parts


def _output_stem(path: Path, base: Path) -> str:
    rel = path.relative_to(base).as_posix()
    for kind in KINDS:
        if rel.lower().endswith(kind):
            return rel[: -len(kind)]
    return rel


def _parquet_ranges(path: Path, part_bytes: int) -> list[tuple[int, int, int]]:
    """Runs of row groups of about ``part_bytes`` (uncompressed) each."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError subclasses
        raise TierpickError(f"{path}: not a readable Parquet file: {exc}") from exc
    ranges: list[tuple[int, int, int]] = []
    start, size = 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= part_bytes:
            ranges.append((start, g + 1, 1))
            start, size = g + 1, 0
    if start < meta.num_row_groups or not ranges:
        ranges.append((start, meta.num_row_groups, 1))
    return ranges


# --------------------------------------------------------------------------- reading a part

Row = tuple[dict[str, Any], str | None, int]  # (fields, error found while reading, line)


def _jsonl_rows(part: Part, summary: ScoreSummary) -> Iterator[Row]:
    path = Path(part.source)
    with _unreadable_as_error(path):
        yield from _jsonl_lines(path, part, summary)


@contextlib.contextmanager
def _unreadable_as_error(path: Path) -> Iterator[None]:
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


def _csv_rows(part: Part, summary: ScoreSummary) -> Iterator[Row]:
    path = Path(part.source)
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with _unreadable_as_error(path), open_text(path, "r") as fh:
        reader = csv.DictReader(fh)
        try:
            while True:
                line = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:  # e.g. a field over the limit: the reader goes on
                    yield {"line": line}, f"malformed CSV row ({exc})", line
                    continue
                extra = row.pop(None, None)  # a long row; a short one has None values (restval)
                short = any(v is None for v in row.values())
                yield row, "wrong number of CSV fields" if extra or short else None, line
        except UnicodeDecodeError as exc:  # the csv module reads text: one bad byte stops it
            bad = first_bad_utf8_line(path)
            raise TierpickError(
                f"{path}: line {bad} is not UTF-8 ({exc.reason}); re-encode the file or convert "
                "it to JSONL, where bad lines are kept as errors"
            ) from exc


def _batched(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- scoring a part


def score_part(
    clf: TierClassifier,
    part: Part,
    work: Path,
    opts: ScoreOptions,
    cache: PredictionCache | None = None,
) -> ScoreSummary:
    """Score one part into ``work/part.name``, commit it and record its counts."""
    summary = ScoreSummary(parts=1)
    cache = cache or PredictionCache(opts.cache_size)
    hits, misses = cache.hits, cache.misses
    src = Path(part.source)
    tmp = work / BOOKKEEPING / "tmp" / f"{part.index:05d}{opts.out_kind}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    writer = _Writer(tmp, opts.out_kind, output_columns(opts, clf.tiers))
    try:
        if kind_of(src) == ".parquet":
            _score_parquet(clf, part, opts, cache, writer, summary)
        else:
            reader = _csv_rows if kind_of(src) == ".csv" else _jsonl_rows
            for batch in _batched(reader(part, summary), opts.batch_size):
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
    finally:
        writer.close()
    out = work / part.name
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    summary.cache_hits, summary.cache_misses = cache.hits - hits, cache.misses - misses
    summary.worker_peak_rss_mb = _peak_rss_mb()
    _atomic_write_json(_record_path(work, part), summary.to_json())
    return summary


def _score_parquet(
    clf: TierClassifier,
    part: Part,
    opts: ScoreOptions,
    cache: PredictionCache,
    writer: _Writer,
    summary: ScoreSummary,
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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _record_path(work: Path, part: Part) -> Path:
    return work / BOOKKEEPING / "done" / f"{part.index:05d}.json"


def _atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the whole run


def score(
    inputs: Sequence[str | Path],
    output: Path,
    clf: TierClassifier,
    opts: ScoreOptions | None = None,
    workers: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    restart: bool = False,
    progress: bool | None = None,
) -> ScoreSummary:
    """Score prompt logs (see the module docstring); returns the summary of the whole run.

    Args:
        inputs: files, directories or globs.
        output: an output file (one input file) or directory.
        clf: the loaded model; worker processes load the same directory.
        opts: scoring options; ``out_kind`` is taken from ``output`` when it names a file.
        workers: scoring processes (default: the CPUs this process may use); 1 scores in
            this process.
        engine: "local" (a process pool) or "ray" (a Ray Data actor pool).
        ray_address: the Ray cluster to join (default: ``RAY_ADDRESS``, else a local Ray).
        restart: discard a work directory left by another run instead of refusing it.
        progress: print progress to stderr (default: when stderr is a terminal).
    """
    start = time.perf_counter()
    if engine not in ("local", "ray"):
        raise ConfigError(f"engine {engine!r} is not one of ['local', 'ray']")
    opts = opts or ScoreOptions()
    files, base = expand_inputs(inputs)
    out_abs = output.resolve()
    if out_abs in files:
        raise ConfigError(f"{output} is also an input: it would be overwritten; write elsewhere")
    for item in inputs:
        folder = Path(str(item)).resolve()
        if folder.is_dir() and (out_abs == folder or folder in out_abs.parents):
            raise ConfigError(
                f"{output} is inside the input directory {item}: a rerun would read the output "
                "as input; write it elsewhere"
            )
    if base is None:
        opts = ScoreOptions(**{**asdict(opts), "out_kind": kind_of(output)})
        work = output.parent / f".{output.name}.parts"
    else:
        if _supported(output):
            raise ConfigError(
                f"{output}: several inputs, a directory or a glob write a directory of parts; "
                "give a directory as OUTPUT (use --format for the file kind)"
            )
        work = output
        if any(work.resolve() in p.parents for p in files):
            raise ConfigError(f"{output} is inside the input; write the output elsewhere")
    if opts.out_kind not in KINDS:
        raise ConfigError(f"output format {opts.out_kind!r} is not one of {list(KINDS)}")
    added = output_columns(opts, clf.tiers)
    for path in files:
        check_no_clash(_input_fields(path), added, str(path))
    parts = plan_parts(files, base, opts)
    plan = {
        "inputs": [_stat(p) for p in files],
        "model_version": clf.version,
        "tiers": list(clf.tiers),
        "prompt_field": opts.prompt_field,
        "out_kind": opts.out_kind,
        "output_prefix": opts.output_prefix,
        "parts": [asdict(p) for p in parts],
    }
    with _exclusive(work, output):
        return _score_parts(
            parts,
            plan,
            work,
            output,
            base,
            clf,
            opts,
            workers,
            engine,
            ray_address,
            restart,
            progress,
            start,
        )


def _input_fields(path: Path, lines: int = 1000) -> set[str]:
    """The field names an input file starts with: its CSV header or Parquet columns, or the keys
    of its first JSONL rows (checked again row by row while scoring)."""
    kind = kind_of(path)
    with _unreadable_as_error(path):
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


LOCK_FILE = "_tierpick.lock"


@contextlib.contextmanager
def _exclusive(work: Path, output: Path) -> Iterator[None]:
    """One run at a time per output: a second run on the same output is refused at once."""
    try:
        work.mkdir(parents=True, exist_ok=True)
        fh = (work / LOCK_FILE).open("a+")
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise ConfigError(
            f"another tierpick score ({holder}) is writing {output}; wait for it to finish or "
            "choose another output"
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        (work / LOCK_FILE).unlink(missing_ok=True)
        fh.close()


def _score_parts(
    parts: list[Part],
    plan: dict[str, Any],
    work: Path,
    output: Path,
    base: Path | None,
    clf: TierClassifier,
    opts: ScoreOptions,
    workers: int | None,
    engine: str,
    ray_address: str | None,
    restart: bool,
    progress: bool | None,
    start: float,
) -> ScoreSummary:
    _prepare_work_dir(work, plan, restart, output if base is None else None)
    done: dict[int, ScoreSummary] = {}
    for part in parts:
        record = _record_path(work, part)
        if record.is_file() and (work / part.name).is_file():
            done[part.index] = ScoreSummary.from_json(json.loads(record.read_text()))
    todo = [p for p in parts if p.index not in done]
    workers = workers or len(os.sched_getaffinity(0))
    n = max(1, min(workers, len(todo)))
    show = sys.stderr.isatty() if progress is None else progress
    meter = _Progress(sum(s.rows for s in done.values()), start, show)
    if engine == "ray":
        from tierpick.serving.score_ray import score_parts_on_ray

        fresh = score_parts_on_ray(todo, work, clf, opts, workers, ray_address, meter)
    elif n == 1:
        cache = PredictionCache(opts.cache_size)
        fresh = {}
        for part in todo:
            fresh[part.index] = meter(score_part(clf, part, work, opts, cache))
    else:
        fresh = _score_in_pool(todo, work, clf.model_dir, opts, n, meter)
    meter.close()
    summary = ScoreSummary(parts=len(parts), parts_resumed=len(done), workers=n)
    for part in parts:
        summary.add(done.get(part.index) or fresh[part.index])
    if base is None:
        if len(parts) == 1:
            os.replace(work / parts[0].name, output)
        else:
            _join_parts([work / p.name for p in parts], output, opts.out_kind)
        shutil.rmtree(work)
    else:
        _atomic_write_json(work / BOOKKEEPING / "summary.json", summary.to_json())
    summary.seconds = time.perf_counter() - start
    summary.main_peak_rss_mb = _peak_rss_mb()
    return summary


def _stat(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _prepare_work_dir(
    work: Path, plan: dict[str, Any], restart: bool, out_file: Path | None
) -> None:
    plan_file = work / BOOKKEEPING / "plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old == plan and not restart:
            return  # resume
        if not restart:
            raise ConfigError(
                f"{work} holds parts of a different run (other inputs, input sizes or times, "
                "model, prompt field or format); pass --restart to discard them"
            )
        for p in old.get("parts", []):
            (work / p["name"]).unlink(missing_ok=True)
        shutil.rmtree(work / BOOKKEEPING)
    elif work.is_dir() and any(p.name != LOCK_FILE for p in work.iterdir()):
        raise ConfigError(
            f"{work} is not empty and holds no tierpick run; choose an empty or new directory"
        )
    if out_file is not None and out_file.is_dir():
        raise ConfigError(f"{out_file} is a directory; one input file writes one output file")
    _atomic_write_json(plan_file, plan)


class _Progress:
    """Counts finished rows as parts complete; prints a progress line when asked to."""

    def __init__(self, rows: int, start: float, show: bool) -> None:
        self.rows, self.start, self.show = rows, start, show

    def __call__(self, summary: ScoreSummary) -> ScoreSummary:
        self.rows += summary.rows
        if self.show:
            rate = self.rows / max(time.perf_counter() - self.start, 1e-9)
            sys.stderr.write(f"\r{self.rows:,} rows  {rate:,.0f} rows/s")
            sys.stderr.flush()
        return summary

    def close(self) -> None:
        if self.show:
            sys.stderr.write("\n")


# A worker process holds one model, loaded once by the pool's initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(model_dir: str, opts: ScoreOptions) -> None:
    from tierpick import classifier

    _die_with_parent()
    _WORKER["clf"] = classifier.load(model_dir, threads=opts.threads)
    _WORKER["cache"] = PredictionCache(opts.cache_size)


def _die_with_parent() -> None:
    """End this worker when the process that started it is gone (even by SIGKILL): the kernel
    sends SIGKILL on Linux (PR_SET_PDEATHSIG), and a watchdog thread checks elsewhere. An
    orphaned worker would go on committing parts into a run nobody is running."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="tierpick-parent-watch").start()


def _score_in_worker(part: Part, work: str, opts: ScoreOptions) -> ScoreSummary:
    return score_part(_WORKER["clf"], part, Path(work), opts, _WORKER["cache"])


def _score_in_pool(
    parts: Sequence[Part],
    work: Path,
    model_dir: Path,
    opts: ScoreOptions,
    workers: int,
    meter: Callable[[ScoreSummary], ScoreSummary],
) -> dict[int, ScoreSummary]:
    """Parts scored by spawned processes (never forked: onnxruntime and tokenizers start
    threads, which a fork would copy in an undefined state)."""
    import multiprocessing

    out: dict[int, ScoreSummary] = {}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(str(model_dir), opts)
    ) as pool:
        futures = {pool.submit(_score_in_worker, p, str(work), opts): p for p in parts}
        try:
            for fut in as_completed(futures):
                out[futures[fut].index] = meter(fut.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return out


# --------------------------------------------------------------------------- joining parts


def _join_parts(paths: Sequence[Path], dst: Path, kind: str) -> None:
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
                writer.write_table(_conform(f.read_row_group(g), schema))


def _conform(table: Any, schema: Any) -> Any:
    """``table`` with ``schema``'s columns in its order (missing ones null), cast to its types."""
    import pyarrow as pa

    for name in schema.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(schema.names).cast(schema)


# --------------------------------------------------------------------------- writing


EXTRA = "extra_fields"  # Parquet output of JSON rows: fields that do not fit the file's columns


def _rows_to_table(
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


class _Writer:
    """Writes scored batches as JSONL, CSV or Parquet, keeping every input field.

    Batches arrive as Arrow record batches (Parquet input) or lists of dicts (JSONL/CSV input);
    each is converted once to what the output kind needs.
    """

    def __init__(self, path: Path, kind: str, added: list[str]) -> None:
        """``added``: the names of the columns scoring adds (:func:`output_columns`)."""
        self.path, self.kind, self.added = path, kind, added
        self.tier_col, *self.prob_cols, self.error_col, self.extra_col = added
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

            fixed = {self.tier_col: pa.string(), self.error_col: pa.string()}
            fixed.update((name, pa.float32()) for name in self.prob_cols)
            schema = self._pq.schema if self._pq is not None else None
            self._write_table(_rows_to_table(out, schema, fixed, self.extra_col))
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
                table = _conform(table, self._pq.schema)
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


def score_file(
    clf: TierClassifier,
    src: Path,
    dst: Path,
    prompt_field: str = "prompt",
    batch_size: int = 4096,
    progress: bool | None = None,
    cache_size: int = 100_000,
) -> ScoreSummary:
    """Score one file into another in this process (the library form of ``tierpick score``)."""
    opts = ScoreOptions(prompt_field=prompt_field, batch_size=batch_size, cache_size=cache_size)
    return score([src], dst, clf, opts, workers=1, progress=progress)


__all__ = ["ScoreOptions", "ScoreSummary", "score", "score_file", "score_part"]
