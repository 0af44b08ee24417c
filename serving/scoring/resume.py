"""Resume bookkeeping under the work directory: the run's plan, a record per finished part
(written atomically), and a lock so that one run at a time writes an output."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tierpick.classifier.errors import ConfigError
from tierpick.serving.scoring.options import BOOKKEEPING, Part, ScoreSummary

LOCK_FILE = "_tierpick.lock"


@contextlib.contextmanager
def exclusive(work: Path, output: Path) -> Iterator[None]:
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


def record_path(work: Path, part: Part) -> Path:
    return work / BOOKKEEPING / "done" / f"{part.index:05d}.json"


def atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def stat_of(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare_work_dir(
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
    atomic_write_json(plan_file, plan)


def finished_parts(work: Path, parts: Sequence[Part]) -> dict[int, ScoreSummary]:
    """The counts of the parts an earlier run of the same plan committed (file and record)."""
    done: dict[int, ScoreSummary] = {}
    for part in parts:
        record = record_path(work, part)
        if record.is_file() and (work / part.name).is_file():
            done[part.index] = ScoreSummary.from_json(json.loads(record.read_text()))
    return done
