"""Expand a configured source (file, directory or glob) into files, detect each file's format,
and read it. A file that cannot be read at all, or yields no rows, is an :class:`IngestError`."""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import json
import zipfile
from collections.abc import Iterable
from pathlib import Path

from tierpick.training.config import IDENTITY, Source, Success, TierConfig
from tierpick.training.errors import IngestError
from tierpick.training.ingest._readers import READERS, is_questions_file
from tierpick.training.ingest._report import IngestReport, Outcome

_PEEK = 65536
_DATA_SUFFIXES = (".zip", ".json", ".jsonl", ".jsonl.gz", ".csv", ".csv.gz", ".parquet")


def detect_format(path: Path) -> str | None:
    """Guess a file's eval-outcome format from its name and first bytes; None when it is not one."""
    name = path.name.lower()
    if _is_companion(path):
        return None  # read beside the outcome files it describes
    if name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.endswith(".json")]
            if members:
                with zf.open(members[0]) as fh:
                    head = fh.read(_PEEK).decode("utf-8", "replace")
                return "mmlu-pro" if '"question_id"' in head and '"options"' in head else None
        return None
    if name.endswith(".json"):
        head = _head(path)
        if '"generator_2"' in head and '"preference"' in head:
            return "alpaca-eval"
        if '"question"' in head and '"options"' in head and '"answer"' in head:
            return "mmlu-pro"
        return None
    if name.endswith((".jsonl", ".jsonl.gz")):
        first = _first_json_object(path)
        if first is None:
            return None
        if "arguments" in first and ("doc_id" in first or "doc" in first):
            return "lm-eval"
        if {"question_id", "model", "score"} <= set(first):
            return "llm-judge"
        if {"prompt", "model", "score"} <= set(first):
            return "long"
        return None
    if name.endswith((".csv", ".csv.gz")):
        header = _csv_header(path)
        if {"prompt", "model", "score"} <= set(header):
            return "long"
        if "prompt" in header and len(header) >= 2:
            return "wide-csv"
        return None
    if name.endswith(".parquet"):
        return "long"
    return None


def _is_companion(path: Path) -> bool:
    """lm-eval's ``results_<ts>.json`` and FastChat's ``question.jsonl``: not outcome files,
    read beside the files that are."""
    name = path.name.lower()
    return (name.startswith("results_") and name.endswith(".json")) or is_questions_file(path)


def _head(path: Path) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        return bytes(fh.read(_PEEK)).decode("utf-8", "replace")


def _first_json_object(path: Path) -> dict[str, object] | None:
    for line in _head(path).splitlines()[:50]:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _csv_header(path: Path) -> list[str]:
    lines = _head(path).splitlines()
    return next(csv.reader(lines[:1]), []) if lines else []


def expand(path: Path) -> tuple[list[Path], bool]:
    """Files named by a path: itself, every file below a directory, or a glob's matches.

    Returns the files and whether they were named one by one (an explicit file must be readable).
    """
    if path.is_file():
        return [path], True
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file()), False
    matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
    files = [p for p in matches if p.is_file()]
    if not files:
        raise IngestError(f"source {path} matches no file")
    return files, False


def read_source(source: Source, config: TierConfig | None, report: IngestReport) -> list[Outcome]:
    """Read every file of one configured source.

    Args:
        source: the source entry (path relative to the config's data root).
        config: resolves relative paths; None takes ``source.path`` as it is.
        report: receives dropped rows, notes and warnings.

    Returns:
        The outcome rows, in file order, each carrying the source's family.

    Raises:
        IngestError: a path that matches nothing, a named file whose format cannot be detected,
            a file that cannot be parsed at all, or a file that yields zero rows; for an
            ``optional`` source these are reported as a warning and it yields nothing.
    """
    root = config.resolve(source.path) if config is not None else Path(source.path)
    local = IngestReport()
    try:
        outcomes = _read_source_files(source, root, local)
    except IngestError as exc:
        if not source.optional:
            raise
        report.warn(f"optional source {source.path} skipped: {exc}")
        report.skipped_files.append(str(root))
        return []
    report.merge(local)
    if source.family:
        outcomes = [dataclasses.replace(o, family=source.family) for o in outcomes]
    return outcomes


def _read_source_files(source: Source, root: Path, report: IngestReport) -> list[Outcome]:
    files, explicit = expand(root)
    outcomes: list[Outcome] = []
    for path in files:
        fmt = source.format if source.format != "auto" else _detect(path)
        if fmt is None:
            if explicit:
                raise IngestError(
                    f"{path}: cannot tell its format; name it with 'format:' "
                    f"(one of {sorted(READERS)})"
                )
            if path.name.lower().endswith(_DATA_SUFFIXES) and not _is_companion(path):
                report.warn(f"{path}: skipped, not a recognized eval-outcome file")
            report.skipped_files.append(str(path))
            continue
        outcomes.extend(read_file(path, fmt, report, source.name, source.options, source.success))
    if not outcomes:
        raise IngestError(f"source {root} yielded no outcome rows")
    return outcomes


def _detect(path: Path) -> str | None:
    try:
        return detect_format(path)
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise IngestError(f"{path}: cannot be read: {exc}") from exc


def read_file(
    path: Path,
    fmt: str,
    report: IngestReport,
    source: str | None = None,
    options: dict[str, object] | None = None,
    success: Success = IDENTITY,
) -> list[Outcome]:
    """Read one file in a named format, its scores turned into success by ``success``;
    raises :class:`IngestError` if it yields nothing."""
    reader = READERS.get(fmt)
    if reader is None:
        raise IngestError(f"{path}: unknown format {fmt!r}; known: {sorted(READERS)}")
    local = IngestReport()
    try:
        rows = list(reader(path, local, source, options or {}, success))
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise IngestError(f"{path}: cannot be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise IngestError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except ValueError as exc:
        raise IngestError(f"{path}: {exc}") from exc
    if not rows:
        why = local.dropped_by_reason()
        raise IngestError(
            f"{path}: yielded zero outcome rows as format {fmt!r}"
            + (f" (dropped: {why})" if why else "")
        )
    local.files[str(path)] = len(rows)
    report.merge(local)
    return rows


def read_sources(
    sources: Iterable[Source], config: TierConfig | None
) -> tuple[list[Outcome], IngestReport]:
    """Read several sources into one list of outcomes and one report."""
    report = IngestReport()
    outcomes: list[Outcome] = []
    for source in sources:
        outcomes.extend(read_source(source, config, report))
    return outcomes, report
