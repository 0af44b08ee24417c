"""Ingestion: eval-outcome files in their published formats -> :class:`Outcome` rows."""

from tierpick.training.ingest._readers import (
    METRIC_KEYS,
    READERS,
    format_multiple_choice,
    lm_eval_prompt,
    parse_score,
    unwrap_chat_template,
)
from tierpick.training.ingest._report import IngestReport, Outcome, Problem
from tierpick.training.ingest._sources import (
    detect_format,
    expand,
    read_file,
    read_source,
    read_sources,
)

__all__ = [
    "METRIC_KEYS",
    "READERS",
    "IngestReport",
    "Outcome",
    "Problem",
    "detect_format",
    "expand",
    "format_multiple_choice",
    "lm_eval_prompt",
    "parse_score",
    "read_file",
    "read_source",
    "read_sources",
    "unwrap_chat_template",
]
