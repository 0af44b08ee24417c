"""Which prompts of a log ``tierpick label`` grades: a sample stratified by the tier the model
routes each prompt to now and by a cluster of the prompts, so that rare traffic is represented
and the figures can be weighted back to the traffic.

1. The log is read once (any file ``tierpick score`` reads, or a decision log); duplicate
   prompts count once, a row without usable text is counted with its reason (the first few
   with their file and line). A reservoir keeps a uniform pool of at most ``pool`` distinct
   prompts, so the memory and the work do not grow with the log.
2. The pool is scored: the current tier is the log's own ``tier`` column when it has one (a
   decision or scored log: the tier actually chosen), else the model's choice under its default
   policy; the clusters are k-means over the model's embedding of each prompt.
3. Each stratum (tier x cluster) gets its share of ``size``: half spread evenly over the strata
   (so a small stratum is not left out), half in proportion to its size; every prompt carries
   the weight (stratum size / prompts drawn from it, scaled to a mean of 1) that makes
   weighted figures speak for the traffic.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierpick.classifier import TierClassifier
from tierpick.classifier.artifact import EMBEDDING_OUTPUT
from tierpick.classifier.cluster import assign, kmeans
from tierpick.classifier.errors import ConfigError, TierpickError
from tierpick.serving.scoring.read import log_rows

MAX_EXAMPLES = 5


@dataclass
class Candidate:
    id: str
    prompt: str
    reference: str | None
    task: str | None
    tier: str | None  # the log's own tier column (a decision or scored log)
    where: str


@dataclass
class Pool:
    """A uniform sample of a log's distinct prompts, and what reading the log found."""

    candidates: list[Candidate]
    rows: int = 0
    distinct: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]


def read_pool(
    inputs: Sequence[str | Path],
    prompt_field: str,
    reference_field: str | None,
    task_field: str | None,
    size: int,
    seed: int,
) -> Pool:
    """Read the log and keep a uniform reservoir of ``size`` distinct prompts (see module)."""
    rng = random.Random(seed)
    pool = Pool([])
    seen: set[str] = set()

    def skip(reason: str, where: str) -> None:
        pool.skipped[reason] += 1
        if len(pool.examples) < MAX_EXAMPLES:
            pool.examples.append(f"{where}: {reason}")

    for row, error, where in log_rows(inputs):
        pool.rows += 1
        if error is not None:
            skip(error, where)
            continue
        text = row.get(prompt_field)
        if not isinstance(text, str) or not text.strip():
            skip(
                f"no prompt text in field {prompt_field!r}"
                + (" (decision log written without prompts)" if "prompt_sha256" in row else ""),
                where,
            )
            continue
        if row.get("prompt_cut"):
            skip("the prompt was cut in the decision log (max_prompt_chars)", where)
            continue
        pid = prompt_id(text)
        if pid in seen:
            continue
        seen.add(pid)
        pool.distinct += 1
        reference = row.get(reference_field) if reference_field else None
        task = row.get(task_field) if task_field else None
        tier = row.get("tier")
        cand = Candidate(
            pid,
            text,
            str(reference) if reference not in (None, "") else None,
            str(task) if task not in (None, "") else None,
            tier if isinstance(tier, str) and tier else None,
            where,
        )
        if len(pool.candidates) < size:
            pool.candidates.append(cand)
        else:  # reservoir sampling (Algorithm R)
            j = rng.randrange(pool.distinct)
            if j < size:
                pool.candidates[j] = cand
    if not pool.candidates:
        worst = ", ".join(f"{r} ({n})" for r, n in pool.skipped.most_common(3))
        raise ConfigError(
            f"no prompt to label in {pool.rows} rows" + (f": {worst}" if worst else "")
        )
    return pool


def allocate(sizes: dict[Any, int], n: int) -> dict[Any, int]:
    """Prompts to draw per stratum: half of ``n`` spread evenly (capped at each stratum's
    size, the rest passed on), half in proportion to size; at most every prompt."""
    total = sum(sizes.values())
    n = min(n, total)
    take = dict.fromkeys(sizes, 0)

    def spread(budget: int, share: dict[Any, float]) -> int:
        while budget > 0:
            open_ = [s for s in sizes if take[s] < sizes[s] and share[s] > 0]
            if not open_:
                break
            weight = sum(share[s] for s in open_)
            given = 0
            for s in sorted(open_, key=lambda s: -share[s]):
                want = max(1, int(budget * share[s] / weight))
                room = min(want, sizes[s] - take[s], budget - given)
                take[s] += room
                given += room
                if given >= budget:
                    break
            if given == 0:
                break
            budget -= given
        return budget

    even = n // 2
    left = spread(even, dict.fromkeys(sizes, 1.0))
    spread(n - even + left, {s: float(v) for s, v in sizes.items()})
    return take


@dataclass
class Sampled:
    """A drawn prompt: its stratum (current tier, cluster) and weight."""

    candidate: Candidate
    tier: str
    cluster: int
    weight: float


def draw(
    pool: Pool,
    clf: TierClassifier,
    size: int,
    clusters: int,
    seed: int,
) -> tuple[list[Sampled], dict[str, Any]]:
    """The stratified sample of ``size`` prompts from ``pool`` (see module), and a summary of
    the strata."""
    cands = pool.candidates
    prompts = [c.prompt for c in cands]
    notes: list[str] = []
    texts = clf.prepare(prompts)
    keep = [i for i, t in enumerate(texts) if t]
    if len(keep) < len(cands):
        notes.append(f"{len(cands) - len(keep)} prompts have no text once normalized: not drawn")
        cands = [cands[i] for i in keep]
    if not cands:
        raise TierpickError("no prompt with text in the pool")
    ids = clf.token_ids([texts[i] for i in keep], prepared=True)  # once, for both uses below
    logged = [c.tier for c in cands]
    if all(t in clf.tiers for t in logged):
        tiers = [str(t) for t in logged]
        notes.append("current tier: the log's own tier column")
    else:
        decisions = clf.route_proba(clf.calibrate(clf.infer(ids)))
        tiers = [d.tier for d in decisions]
        notes.append("current tier: the model's choice under its default policy")
    if clf.has_embedding and clusters > 1 and len(cands) > clusters:
        emb = clf.infer(ids, output=EMBEDDING_OUTPUT)
        labels = assign(emb, kmeans(emb, clusters, seed))
        notes.append(f"clusters: k-means ({clusters}) over the model's prompt embedding")
    else:
        labels = np.zeros(len(cands), dtype=np.int64)
        notes.append(
            "clusters: none (the model's graph has no embedding output)"
            if not clf.has_embedding
            else "clusters: none"
        )
    strata: dict[tuple[str, int], list[int]] = {}
    for i, (t, c) in enumerate(zip(tiers, labels, strict=True)):
        strata.setdefault((t, int(c)), []).append(i)
    take = allocate({s: len(v) for s, v in strata.items()}, size)
    rng = random.Random(seed)
    chosen: list[Sampled] = []
    for s, rows in sorted(strata.items()):
        k = take[s]
        if k == 0:
            continue
        for i in rng.sample(rows, k):
            chosen.append(Sampled(cands[i], s[0], s[1], len(rows) / k))
    mean = float(np.mean([c.weight for c in chosen]))
    for c in chosen:
        c.weight = round(c.weight / mean, 6)
    rng.shuffle(chosen)
    summary = {
        "pool": len(pool.candidates),
        "strata": len(strata),
        "strata_drawn": sum(1 for v in take.values() if v),
        "by_tier": dict(Counter(c.tier for c in chosen)),
        "notes": notes,
    }
    return chosen, summary
