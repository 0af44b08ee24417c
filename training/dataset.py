"""Dataset builder: outcome rows -> one row per distinct prompt with per-tier targets and masks.

- Dedupe: prompts are keyed by :func:`classifier.prompt_key`; outcomes of the same prompt from
  any source merge. A model's repeated outcomes on one prompt are averaged first.
- Targets: ``target_<tier>`` = mean score of the tier's models that have an outcome for the
  prompt; ``mask_<tier>`` is False (and the target null) where none has, so sources with
  different model sets train one model.
- Decontamination: prompts that match a named eval set (normalized text, or a shared word
  n-gram) are dropped and counted.
- Split: ``train``/``val``/``test`` by a salted hash of the prompt key (stable across runs and
  machines), ``ood`` for whole held-out groups (a task or a source).

The result is written as Parquet with a content fingerprint beside a JSON build report.
"""

from __future__ import annotations

import collections
import difflib
import hashlib
import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tierpick.classifier.text import normalize_prompt, prompt_key
from tierpick.training.config import Decontamination, Source, SplitConfig, TierConfig
from tierpick.training.errors import DatasetError, IngestError
from tierpick.training.ingest import IngestReport, Outcome, read_source
from tierpick.training.ingest._sources import expand

SCHEMA_VERSION = 2  # 2: a `family` column
DATASET_FILE = "dataset.parquet"
OUTCOMES_FILE = "outcomes.parquet"
REPORT_FILE = "report.json"
_WORD = re.compile(r"\w+")


@dataclass
class BuiltDataset:
    """A built dataset: the per-prompt table, the outcome rows behind it, and the build report."""

    table: pa.Table
    outcomes: pa.Table
    tiers: tuple[str, ...]
    fingerprint: str
    report: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> pa.Table:
        """The rows of one split (``train``, ``val``, ``test`` or ``ood``)."""
        import pyarrow.compute as pc

        return self.table.filter(pc.equal(self.table["split"], name))


def build_dataset(config: TierConfig) -> BuiltDataset:
    """Ingest every source of ``config`` and build the per-prompt dataset.

    Raises:
        IngestError: a source cannot be read or yields no rows.
        DatasetError: a tier ends up with no outcome on any prompt, or a hold-out group or
            decontamination set matches nothing.
    """
    started = time.perf_counter()
    ingest = IngestReport()
    outcomes: list[Outcome] = []
    for source in config.sources:
        outcomes.extend(read_source(source, config, ingest))
    table, outcome_table, details = assemble(outcomes, config, ingest)
    fingerprint = fingerprint_table(table, config.tier_names)
    report = {
        "schema_version": SCHEMA_VERSION,
        "config": str(config.path) if config.path else config.name,
        "config_name": config.name,
        "tiers": [
            {
                "name": t.name,
                "price_input": t.price_input,
                "price_output": t.price_output,
                "models": list(t.models),
            }
            for t in config.tiers
        ],
        "fingerprint": fingerprint,
        "files": ingest.files,
        "skipped_files": ingest.skipped_files,
        "dropped_by_reason": ingest.dropped_by_reason(),
        "dropped_rows": [
            {"origin": p.origin, "reason": p.reason, "detail": p.detail} for p in ingest.problems
        ],
        "notes": dict(ingest.notes),
        "warnings": ingest.warnings,
        "build_seconds": round(time.perf_counter() - started, 2),
        **details,
    }
    return BuiltDataset(table, outcome_table, config.tier_names, fingerprint, report)


def assemble(
    outcomes: list[Outcome], config: TierConfig, ingest: IngestReport
) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Dedupe, target, decontaminate and split already-read outcomes (see module docstring)."""
    tiers = config.tier_names
    tier_of = config.tier_of_model()
    seen_models = collections.Counter(o.model for o in outcomes)
    _warn_unknown_models(config, seen_models, ingest)

    # key -> first prompt text / source / task, ids; (key, model) -> scores
    first: dict[str, Outcome] = {}
    sources: dict[str, set[str]] = collections.defaultdict(set)
    ids: dict[str, set[str]] = collections.defaultdict(set)
    scores: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    keys: list[str] = []
    unused = collections.Counter[str]()
    key_of: dict[str, str] = {}  # the same prompt text recurs once per model
    for o in outcomes:
        key = key_of.get(o.prompt)
        if key is None:
            key = key_of[o.prompt] = prompt_key(o.prompt)
        keys.append(key)
        if key not in first:
            first[key] = o
        sources[key].add(o.source)
        ids[key].add(o.prompt_id)
        if o.model in tier_of:
            scores[(key, o.model)].append(o.score)
        else:
            unused[o.model] += 1
    for model, count in sorted(unused.items()):
        ingest.warn(f"model {model!r} ({count} outcomes) is in no tier: its outcomes are not used")

    per_prompt: dict[str, dict[str, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    repeated = 0
    for (key, model), values in scores.items():
        repeated += len(values) - 1
        per_prompt[key][tier_of[model]].append(sum(values) / len(values))

    decon_keys, decon_counts = _decontaminate(
        [k for k in first if k in per_prompt], first, config, config.decontamination
    )
    holdout = config.split.holdout
    if holdout is not None:
        present = {_group(first[k], holdout.column) for k in per_prompt}
        missing = [v for v in holdout.values if v not in present]
        if missing:
            raise DatasetError(
                f"split.holdout: {holdout.column} value(s) {missing} match no prompt; "
                f"known: {sorted(present)[:30]}"
            )

    columns: dict[str, list[Any]] = collections.defaultdict(list)
    no_tier_prompts = 0
    for key, o in first.items():
        if key not in per_prompt:
            no_tier_prompts += 1
            continue
        if key in decon_keys:
            continue
        by_tier = per_prompt[key]
        columns["prompt_key"].append(key)
        columns["prompt"].append(o.prompt)
        columns["source"].append(o.source)
        columns["sources"].append(sorted(sources[key]))
        columns["family"].append(family_of(o))
        columns["task"].append(o.task)
        columns["prompt_ids"].append(sorted(ids[key]))
        columns["split"].append(assign_split(key, o, config.split))
        for tier in tiers:
            vals = by_tier.get(tier, [])
            columns[f"target_{tier}"].append(sum(vals) / len(vals) if vals else None)
            columns[f"mask_{tier}"].append(bool(vals))
            columns[f"n_{tier}"].append(len(vals))
    schema = dataset_schema(tiers)
    table = pa.Table.from_pydict(dict(columns), schema=schema) if columns else schema.empty_table()
    table = table.sort_by("prompt_key")

    for tier in tiers:
        if not any(table[f"mask_{tier}"].to_pylist()):
            models = config.tiers[tiers.index(tier)].models
            raise DatasetError(
                f"tier {tier!r} has no outcome on any prompt: none of its models "
                f"{list(models)[:8]} appears in the sources"
            )

    outcome_table = pa.table(
        {
            "prompt_key": keys,
            "prompt_id": [o.prompt_id for o in outcomes],
            "model": [o.model for o in outcomes],
            "tier": [tier_of.get(o.model) for o in outcomes],
            "score": [o.score for o in outcomes],
            "source": [o.source for o in outcomes],
            "task": [o.task for o in outcomes],
            "origin": [o.origin for o in outcomes],
        },
        schema=pa.schema(
            [
                ("prompt_key", pa.string()),
                ("prompt_id", pa.string()),
                ("model", pa.string()),
                ("tier", pa.string()),
                ("score", pa.float64()),
                ("source", pa.string()),
                ("task", pa.string()),
                ("origin", pa.string()),
            ]
        ),
    )
    details = {
        "outcome_rows": len(outcomes),
        "distinct_prompts": len(first),
        "duplicate_outcome_rows_merged": len(outcomes) - len(first),
        "repeated_model_outcomes_averaged": repeated,
        "prompts_without_tier_outcome": no_tier_prompts,
        "outcomes_of_models_in_no_tier": dict(unused),
        "decontamination": decon_counts,
        "rows": table.num_rows,
        "splits": dict(collections.Counter(table["split"].to_pylist())),
        "families": dict(collections.Counter(table["family"].to_pylist())),
    }
    return table, outcome_table, details


def dataset_schema(tiers: Iterable[str]) -> pa.Schema:
    fields = [
        ("prompt_key", pa.string()),
        ("prompt", pa.string()),
        ("source", pa.string()),
        ("sources", pa.list_(pa.string())),
        ("family", pa.string()),
        ("task", pa.string()),
        ("prompt_ids", pa.list_(pa.string())),
        ("split", pa.string()),
    ]
    for tier in tiers:
        fields += [
            (f"target_{tier}", pa.float64()),
            (f"mask_{tier}", pa.bool_()),
            (f"n_{tier}", pa.int32()),
        ]
    return pa.schema(fields)


def family_of(outcome: Outcome) -> str:
    """The source family a prompt's outcome counts in: the configured one, else its source."""
    return outcome.family or outcome.source


def _group(outcome: Outcome, column: str) -> str:
    return family_of(outcome) if column == "family" else str(getattr(outcome, column))


def assign_split(key: str, outcome: Outcome, split: SplitConfig) -> str:
    """The split of a prompt: ``ood`` for a held-out group, else by a salted hash of its key."""
    if split.holdout is not None and _group(outcome, split.holdout.column) in split.holdout.values:
        return "ood"
    digest = hashlib.sha256(f"{split.salt}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < split.test_fraction:
        return "test"
    if u < split.test_fraction + split.val_fraction:
        return "val"
    return "train"


# --------------------------------------------------------------------------- decontamination


def _word_ngrams(text: str, n: int) -> Iterator[tuple[str, ...]]:
    words = _WORD.findall(text.casefold())
    for i in range(len(words) - n + 1):
        yield tuple(words[i : i + n])


def _decontaminate(
    keys: list[str], first: dict[str, Outcome], config: TierConfig, decon: Decontamination
) -> tuple[set[str], list[dict[str, Any]]]:
    """Keys to drop, and per eval set how many prompts it held and how many it removed."""
    dropped: set[str] = set()
    counts: list[dict[str, Any]] = []
    for source in decon.paths:
        prompts = read_eval_prompts(source, config)
        exact = {prompt_key(p) for p in prompts}
        grams: set[tuple[str, ...]] = set()
        if decon.method == "ngram":
            for p in prompts:
                grams.update(_word_ngrams(p, decon.ngram))
        hits = set()
        for key in keys:
            if key in exact or (
                grams and any(g in grams for g in _word_ngrams(first[key].prompt, decon.ngram))
            ):
                hits.add(key)
        counts.append(
            {
                "eval_set": source.path,
                "eval_prompts": len(prompts),
                "method": decon.method,
                "matched": len(hits),
                "newly_dropped": len(hits - dropped),
            }
        )
        dropped |= hits
    return dropped, counts


def read_eval_prompts(source: Source, config: TierConfig) -> list[str]:
    """The normalized prompts of an eval set named for decontamination."""
    if source.format != "prompts":
        return sorted({o.prompt for o in read_source(source, config, IngestReport())})
    field_name = str(source.options.get("prompt_field", "prompt"))
    prompts: list[str] = []
    files, _ = expand(config.resolve(source.path))
    for path in files:
        name = path.name.lower()
        if name.endswith(".txt"):
            prompts += path.read_text(encoding="utf-8").splitlines()
        elif name.endswith(".parquet"):
            prompts += [
                str(v) for v in pq.read_table(path, columns=[field_name])[field_name].to_pylist()
            ]
        elif name.endswith(".csv"):
            import csv

            with path.open(encoding="utf-8", newline="") as fh:
                prompts += [row.get(field_name) or "" for row in csv.DictReader(fh)]
        else:
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        try:
                            prompts.append(str(json.loads(line).get(field_name) or ""))
                        except (json.JSONDecodeError, AttributeError):
                            continue
    normalized = sorted({normalize_prompt(p) for p in prompts} - {""})
    if not normalized:
        raise IngestError(f"decontamination set {source.path} holds no prompt")
    return normalized


def _warn_unknown_models(
    config: TierConfig, seen: collections.Counter[str], ingest: IngestReport
) -> None:
    names = list(seen)
    for tier in config.tiers:
        for model in tier.models:
            if model not in seen:
                close = difflib.get_close_matches(model, names, n=3, cutoff=0.6)
                hint = f"; close matches in the sources: {close}" if close else ""
                ingest.warn(
                    f"tier {tier.name!r} names model {model!r}, which no source contains{hint}"
                )


# --------------------------------------------------------------------------- fingerprint, I/O


def fingerprint_table(table: pa.Table, tiers: Iterable[str]) -> str:
    """A sha256 of the dataset's content (keys, splits, families, targets, masks) and tier
    order."""
    tiers = list(tiers)
    h = hashlib.sha256(json.dumps({"schema": SCHEMA_VERSION, "tiers": tiers}).encode())
    cols = ["prompt_key", "split", "family"]
    cols += [f"{p}_{t}" for t in tiers for p in ("target", "mask")]
    data = [table[c].to_pylist() for c in cols]
    for row in zip(*data, strict=True):
        h.update(json.dumps(row, separators=(",", ":")).encode())
    return h.hexdigest()


def write_dataset(built: BuiltDataset, out_dir: str | Path) -> Path:
    """Write ``dataset.parquet``, ``outcomes.parquet`` and ``report.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        b"tierpick.schema_version": str(SCHEMA_VERSION).encode(),
        b"tierpick.tiers": json.dumps(list(built.tiers)).encode(),
        b"tierpick.fingerprint": built.fingerprint.encode(),
    }
    table = built.table.replace_schema_metadata({**(built.table.schema.metadata or {}), **meta})
    pq.write_table(table, out / DATASET_FILE)
    pq.write_table(built.outcomes, out / OUTCOMES_FILE)
    (out / REPORT_FILE).write_text(json.dumps(built.report, indent=2) + "\n", encoding="utf-8")
    return out


def load_dataset(path: str | Path) -> BuiltDataset:
    """Load a dataset directory written by :func:`write_dataset`, verifying its fingerprint.

    Raises:
        DatasetError: a file is missing, or the content does not match the recorded fingerprint.
    """
    d = Path(path)
    missing = [f for f in (DATASET_FILE, OUTCOMES_FILE, REPORT_FILE) if not (d / f).is_file()]
    if missing:
        raise DatasetError(f"{d} is not a tierpick dataset directory: missing {missing}")
    table = pq.read_table(d / DATASET_FILE)
    meta = table.schema.metadata or {}
    try:
        tiers = tuple(json.loads(meta[b"tierpick.tiers"]))
        recorded = meta[b"tierpick.fingerprint"].decode()
    except (KeyError, ValueError) as exc:
        raise DatasetError(f"{d / DATASET_FILE} has no tierpick metadata") from exc
    actual = fingerprint_table(table, tiers)
    if actual != recorded:
        raise DatasetError(
            f"{d / DATASET_FILE}: content fingerprint {actual[:12]} != recorded {recorded[:12]}"
        )
    report = json.loads((d / REPORT_FILE).read_text(encoding="utf-8"))
    return BuiltDataset(table, pq.read_table(d / OUTCOMES_FILE), tiers, recorded, report)
