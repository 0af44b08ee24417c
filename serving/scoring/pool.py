"""The local engine: parts scored by spawned worker processes, one model each, which die with
the run that started them."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tierpick.serving.scoring.options import Part, ScoreOptions, ScoreSummary
from tierpick.serving.scoring.part import PredictionCache, score_part

# A worker process holds one model, loaded once by the pool's initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(model_dir: str, opts: ScoreOptions, rows: Any = None) -> None:
    from tierpick import classifier

    _die_with_parent()
    _WORKER["clf"] = classifier.load(model_dir, threads=opts.threads)
    _WORKER["cache"] = PredictionCache(opts.cache_size)
    _WORKER["rows"] = rows  # a shared counter of rows scored, for the run's progress


def _add_rows(n: int) -> None:
    counter = _WORKER["rows"]
    with counter.get_lock():
        counter.value += n


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
    on_rows = _add_rows if _WORKER.get("rows") is not None else None
    return score_part(_WORKER["clf"], part, Path(work), opts, _WORKER["cache"], on_rows)


def score_in_pool(
    parts: Sequence[Part],
    work: Path,
    model_dir: Path,
    opts: ScoreOptions,
    workers: int,
    meter: Callable[[ScoreSummary], ScoreSummary],
    rows: Any = None,
) -> dict[int, ScoreSummary]:
    """Parts scored by spawned processes (never forked: onnxruntime and tokenizers start
    threads, which a fork would copy in an undefined state). ``rows``: a
    ``multiprocessing.Value`` (spawn context) the workers add each batch's rows to."""
    import multiprocessing

    out: dict[int, ScoreSummary] = {}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(str(model_dir), opts, rows)
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
