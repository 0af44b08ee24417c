"""Batch scoring of prompt logs: ``tierpick score INPUT... OUTPUT``.

Inputs are files, directories (searched recursively) or globs of JSONL (``.jsonl``,
``.jsonl.gz``), CSV or Parquet. The work is cut into *parts*: byte ranges of a JSONL file cut at
line ends, runs of Parquet row groups, and whole CSV or gzip files (neither can be cut without
reading it). Parts are scored by a pool of spawned worker processes with a model each (or by a
Ray actor pool, :mod:`.on_ray`); a part is scored by the same code on every path.

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

The modules, in the order data flows: :mod:`.options` (options, parts, summary), :mod:`.plan`
(inputs -> parts), :mod:`.read` (a part's rows), :mod:`.part` (scoring a batch and a part),
:mod:`.write` (output files, joining parts), :mod:`.resume` (plan, records, lock), :mod:`.pool`
and :mod:`.on_ray` (engines), :mod:`.run` (the whole run).
"""

from __future__ import annotations

from tierpick.serving.scoring.options import (
    KINDS,
    Part,
    ScoreOptions,
    ScoreSummary,
    kind_of,
    output_columns,
)
from tierpick.serving.scoring.part import PredictionCache, score_part, score_prompts
from tierpick.serving.scoring.plan import expand_inputs, plan_parts
from tierpick.serving.scoring.run import score, score_file

__all__ = [
    "KINDS",
    "Part",
    "PredictionCache",
    "ScoreOptions",
    "ScoreSummary",
    "expand_inputs",
    "kind_of",
    "output_columns",
    "plan_parts",
    "score",
    "score_file",
    "score_part",
    "score_prompts",
]
