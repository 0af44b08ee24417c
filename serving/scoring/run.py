"""A whole run: check inputs and output, plan, skip finished parts, score the rest on an
engine (this process, the process pool or Ray), join or keep the parts, and sum the counts."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tierpick.classifier import TierClassifier
from tierpick.classifier.errors import ConfigError
from tierpick.serving.scoring.options import (
    BOOKKEEPING,
    KINDS,
    Part,
    ScoreOptions,
    ScoreSummary,
    check_no_clash,
    kind_of,
    output_columns,
    supported,
)
from tierpick.serving.scoring.part import PredictionCache, peak_rss_mb, score_part
from tierpick.serving.scoring.plan import expand_inputs, plan_parts
from tierpick.serving.scoring.pool import score_in_pool
from tierpick.serving.scoring.read import input_fields
from tierpick.serving.scoring.resume import (
    atomic_write_json,
    exclusive,
    finished_parts,
    prepare_work_dir,
    stat_of,
)
from tierpick.serving.scoring.write import join_parts


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
        if supported(output):
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
        check_no_clash(input_fields(path), added, str(path))
    parts = plan_parts(files, base, opts)
    plan = {
        "inputs": [stat_of(p) for p in files],
        "model_version": clf.version,
        "tiers": list(clf.tiers),
        "prompt_field": opts.prompt_field,
        "out_kind": opts.out_kind,
        "output_prefix": opts.output_prefix,
        "parts": [asdict(p) for p in parts],
    }
    with exclusive(work, output):
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
    prepare_work_dir(work, plan, restart, output if base is None else None)
    done = finished_parts(work, parts)
    todo = [p for p in parts if p.index not in done]
    workers = workers or len(os.sched_getaffinity(0))
    n = max(1, min(workers, len(todo)))
    show = sys.stderr.isatty() if progress is None else progress
    meter = _Progress(
        sum(s.rows for s in done.values()), start, show, estimate_rows(todo), PROGRESS_EVERY
    )
    if engine == "ray":
        from tierpick.serving.scoring.on_ray import score_parts_on_ray

        fresh = score_parts_on_ray(todo, work, clf, opts, workers, ray_address, meter)
    elif n == 1:
        cache = PredictionCache(opts.cache_size)
        fresh = {}
        for part in todo:
            fresh[part.index] = meter(score_part(clf, part, work, opts, cache, meter.add))
    else:
        import multiprocessing

        counter = multiprocessing.get_context("spawn").Value("q", 0)
        meter.watch(counter)
        fresh = score_in_pool(todo, work, clf.model_dir, opts, n, meter, counter)
    meter.close()
    summary = ScoreSummary(parts=len(parts), parts_resumed=len(done), workers=n)
    for part in parts:
        summary.add(done.get(part.index) or fresh[part.index])
    if base is None:
        if len(parts) == 1:
            os.replace(work / parts[0].name, output)
        else:
            join_parts([work / p.name for p in parts], output, opts.out_kind)
        shutil.rmtree(work)
    else:
        atomic_write_json(work / BOOKKEEPING / "summary.json", summary.to_json())
    summary.seconds = time.perf_counter() - start
    summary.main_peak_rss_mb = peak_rss_mb()
    return summary


PROGRESS_EVERY = 1.0  # seconds between progress lines


class _Progress:
    """The run's progress on stderr, when asked to: rows scored (within parts too: a batch at a
    time), the rate, and the time left against an estimate of the rows to score
    (:func:`estimate_rows`), at most once per ``every`` seconds."""

    def __init__(
        self, rows: int, start: float, show: bool, expected: int | None, every: float = 1.0
    ) -> None:
        self.base, self.start, self.show = rows, start, show
        self.expected, self.every = expected, every
        self.live = 0  # rows scored by this run so far (batches, in this process)
        self.parted = 0  # rows of this run's finished parts
        self.counter: Any = None  # the workers' shared count, with a pool
        self._last = 0.0
        self._lock = threading.Lock()  # the poller and the main thread both print
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, summary: ScoreSummary) -> ScoreSummary:
        """A part finished."""
        self.parted += summary.rows
        self._print(force=True)
        return summary

    def add(self, rows: int) -> None:
        """A batch of ``rows`` was scored in this process."""
        self.live += rows
        self._print()

    def watch(self, counter: Any) -> None:
        """Read the workers' shared count every ``every`` seconds."""
        self.counter = counter
        if self.show:
            self._thread = threading.Thread(target=self._poll, daemon=True, name="progress")
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            self._print()

    def rows(self) -> int:
        """Rows scored so far: before this run (resumed parts) and by it."""
        counted = self.counter.value if self.counter is not None else self.live
        return self.base + max(counted, self.parted)

    def line(self) -> str:
        done = self.rows()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = (done - self.base) / elapsed
        text = f"{done:,} rows  {rate:,.0f} rows/s"
        if self.expected:
            total = max(self.expected + self.base, done)
            left = (total - done) / rate if rate > 0 else float("inf")
            eta = "?" if left == float("inf") else _duration(left)
            text = (
                f"{done:,} of ~{total:,} rows ({done / total:.0%})  {rate:,.0f} rows/s  ETA {eta}"
            )
        return text

    def _print(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.show or (not force and now - self._last < self.every):
            return
        with self._lock:
            self._last = now
            sys.stderr.write("\r" + self.line() + "  ")
            sys.stderr.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.show:
            self._print(force=True)
            sys.stderr.write("\n")


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def estimate_rows(parts: Sequence[Part], sample_bytes: int = 1 << 20) -> int | None:
    """About how many rows ``parts`` hold: exact for Parquet (row-group metadata); for JSONL and
    CSV, each part's bytes times the lines per byte of the first MiB of its file (gzip: lines of
    the first MiB decompressed per compressed byte read); None if a file cannot be read."""
    import pyarrow.parquet as pq

    total = 0.0
    per_byte: dict[str, float] = {}
    metadata: dict[str, Any] = {}  # a Parquet file's footer, read once for all its parts
    for part in parts:
        path = Path(part.source)
        try:
            if kind_of(path) == ".parquet":
                if part.source not in metadata:
                    metadata[part.source] = pq.ParquetFile(path).metadata
                meta = metadata[part.source]
                total += sum(meta.row_group(g).num_rows for g in range(part.start, part.stop))
                continue
            if part.source not in per_byte:
                per_byte[part.source] = _lines_per_byte(path, sample_bytes)
            stop = part.stop if part.stop >= 0 else path.stat().st_size
            total += max(stop - part.start, 0) * per_byte[part.source]
        except (OSError, EOFError):
            return None
    return round(total)


def _lines_per_byte(path: Path, sample_bytes: int) -> float:
    import gzip

    with path.open("rb") as raw:
        if path.name.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as fh:
                head = fh.read(sample_bytes)
            used = raw.tell()
        else:
            head = raw.read(sample_bytes)
            used = len(head)
    if not head:
        return 0.0
    lines = head.count(b"\n") + (0 if head.endswith(b"\n") else 1)
    return lines / max(used, 1)


def score_file(
    clf: TierClassifier,
    src: Path,
    dst: Path,
    prompt_field: str = ScoreOptions.prompt_field,
    batch_size: int = ScoreOptions.batch_size,
    progress: bool | None = None,
    cache_size: int = ScoreOptions.cache_size,
) -> ScoreSummary:
    """Score one file into another in this process (the library form of ``tierpick score``)."""
    opts = ScoreOptions(prompt_field=prompt_field, batch_size=batch_size, cache_size=cache_size)
    return score([src], dst, clf, opts, workers=1, progress=progress)
