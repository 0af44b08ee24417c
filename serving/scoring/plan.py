"""Planning a run: the input files (files, directories, globs) and the parts they are cut into
(byte ranges of JSONL at line ends, runs of Parquet row groups, whole CSV and gzip files)."""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tierpick.classifier.errors import ConfigError, TierpickError
from tierpick.serving.scoring.options import KINDS, Part, ScoreOptions, kind_of, supported


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
            matched = [p for p in found if p.is_file() and supported(p)]
            if not matched:
                raise ConfigError(f"{text}: the glob matches no {'/'.join(KINDS)} file")
            files += matched
        elif path.is_dir():
            matched = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and supported(p)
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
