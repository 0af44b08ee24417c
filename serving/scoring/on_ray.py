"""``tierpick score --engine ray``: the same parts as the local path, scored by a Ray actor pool.

A Ray Data dataset holds one row per part (one block each, so parts spread over the actors);
``map_batches`` runs them through an actor pool (``ActorPoolStrategy``), each actor loading the
model once and scoring whole parts with :func:`.part.score_part`: the same reading,
bad-row handling, output files and resume records as the single-machine path. The model's files
travel through Ray's object store (and are verified by their manifest's hashes on every actor),
so worker nodes need no copy of the model; the inputs and the output directory must be reachable
at the same paths from every node (a shared filesystem) when Ray runs on a cluster.

Measured with Ray 2.60 on a 2-core machine: actors asking for a whole CPU each starve Ray's own
tasks and the job hangs, so actors ask for ``CPUS_PER_ACTOR``; ``from_items`` packs a small list
into one block (one actor) unless the block count is set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tierpick.classifier import TierClassifier
from tierpick.classifier.errors import MissingDependencyError
from tierpick.serving.scoring.options import Part, ScoreOptions, ScoreSummary
from tierpick.serving.scoring.part import PredictionCache, score_part

CPUS_PER_ACTOR = 0.5


class _PartScorer:
    """A Ray actor: one model, scoring whole parts."""

    def __init__(self, model_files: Any, work: str, opts: dict[str, Any]) -> None:
        import ray

        from tierpick import classifier

        files: dict[str, bytes] = ray.get(model_files)
        folder = Path(tempfile.mkdtemp(prefix="tierpick-model-"))
        try:
            for name, data in files.items():
                (folder / name).write_bytes(data)
            self.opts = ScoreOptions(**opts)
            self.clf = classifier.load(folder, threads=self.opts.threads)  # verifies hashes
        finally:  # the session and tokenizer hold everything in memory once loaded
            shutil.rmtree(folder)
        self.work = Path(work)
        self.cache = PredictionCache(self.opts.cache_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for text in batch["part"]:
            part = Part(**json.loads(str(text)))
            summary = score_part(self.clf, part, self.work, self.opts, self.cache)
            out.append(json.dumps({"index": part.index, **summary.to_json()}))
        return {"summary": np.array(out, dtype=object)}


def score_parts_on_ray(
    parts: Sequence[Part],
    work: Path,
    clf: TierClassifier,
    opts: ScoreOptions,
    workers: int,
    address: str | None,
    meter: Callable[[ScoreSummary], ScoreSummary],
) -> dict[int, ScoreSummary]:
    """Score ``parts`` on Ray: the running session if there is one, else ``address``, else
    ``RAY_ADDRESS``, else a local Ray started (and stopped) here. At most ``workers`` actors."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise MissingDependencyError(
            f"--engine ray needs Ray (pip install 'tierpick[ray]'): {exc}"
        ) from exc
    if not parts:
        return {}
    started = False
    if not ray.is_initialized():
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS"),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        names = ["manifest.json", *clf.manifest.files]
        model_files = ray.put({n: (clf.model_dir / n).read_bytes() for n in names})
        ds = ray.data.from_items(
            [{"part": json.dumps(asdict(p))} for p in parts], override_num_blocks=len(parts)
        )
        scored = ds.map_batches(
            _PartScorer,
            fn_constructor_kwargs={
                "model_files": model_files,
                "work": str(work),
                "opts": asdict(opts),
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, workers)),
            num_cpus=CPUS_PER_ACTOR,
        )
        out: dict[int, ScoreSummary] = {}
        for row in scored.iter_rows():
            record = json.loads(str(row["summary"]))
            index = record.pop("index")
            out[index] = meter(ScoreSummary.from_json(record))
        return out
    finally:
        if started:
            ray.shutdown()
