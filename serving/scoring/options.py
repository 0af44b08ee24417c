"""What a scoring run is made of: the options, the output columns, the parts the work is cut
into, and the summary each part reports (rows, errors with their file and line, tier mix)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tierpick.classifier.errors import ConfigError, TierpickError

KINDS = (".jsonl", ".jsonl.gz", ".csv", ".parquet")


BOOKKEEPING = "_tierpick"  # under a work directory: plan, records of finished parts, temp files


MAX_EXAMPLES = 5  # bad rows reported by location in the summary


MODEL_VERSION = "model_version"  # the version of the model that scored the row
EXTRA = "extra_fields"  # Parquet output of JSON rows: fields that do not fit the file's columns


def kind_of(path: Path) -> str:
    name = path.name.lower()
    for kind in KINDS:
        if name.endswith(kind):
            return kind
    raise TierpickError(f"{path}: unsupported file type; use one of {list(KINDS)}")


def supported(path: Path) -> bool:
    return path.name.lower().endswith(KINDS)


@dataclass(frozen=True)
class ScoreOptions:
    """What a part's scoring needs besides the model; the same on every engine.

    ``prompt_field``, ``out_kind`` and ``output_prefix`` change the output, so they are part
    of the resume check; the others only change speed.
    """

    prompt_field: str = "prompt"
    out_kind: str = ".parquet"
    output_prefix: str = ""  # put before the names of the columns scoring adds
    batch_size: int = 4096
    cache_size: int = 100_000
    part_bytes: int = 32 << 20  # a JSONL file is cut into parts of about this many bytes
    threads: int = 1  # ONNX Runtime intra-op threads per worker


def output_columns(opts: ScoreOptions, tiers: Sequence[str]) -> list[str]:
    """The columns scoring adds to every row: the tier, a probability per tier, the error, the
    version of the model that scored it (``tierpick report`` and ``tune`` check it), and
    ``extra_fields`` (Parquet output of JSON rows)."""
    p = opts.output_prefix
    return [
        f"{p}tier",
        *[f"{p}p_{t}" for t in tiers],
        f"{p}error",
        f"{p}{MODEL_VERSION}",
        f"{p}{EXTRA}",
    ]


def check_no_clash(fields: Iterable[str], added: Sequence[str], where: str) -> None:
    """Refuse input fields that the columns scoring adds would overwrite."""
    clash = sorted(set(fields) & set(added))
    if clash:
        raise ConfigError(
            f"{where}: input field(s) {clash} have the names of columns scoring adds and would "
            "be overwritten; give the added columns a prefix, e.g. --output-prefix tierpick_"
        )


@dataclass(frozen=True)
class Part:
    """A unit of work: rows of one input file, and the output file they go to.

    ``start``/``stop`` are byte offsets for JSONL (``stop`` -1: to the end) and a row-group range
    for Parquet; ``first_line`` is the line number of the range's first line (JSONL).
    """

    index: int
    source: str
    start: int
    stop: int
    first_line: int
    name: str


@dataclass
class ScoreSummary:
    rows: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    tiers: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # "file:line: error" of the first bad rows
    blank_lines: int = 0
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    parts: int = 0
    parts_resumed: int = 0
    workers: int = 1
    worker_peak_rss_mb: float = 0.0  # the largest peak RSS of one scoring process
    main_peak_rss_mb: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: ScoreSummary) -> None:
        """Fold a part's counts into this summary (times and process figures excepted)."""
        self.rows += other.rows
        self.errors.update(other.errors)
        self.tiers.update(other.tiers)
        self.examples.extend(other.examples[: MAX_EXAMPLES - len(self.examples)])
        self.blank_lines += other.blank_lines
        self.cache_hits += other.cache_hits
        self.cache_misses += other.cache_misses
        self.worker_peak_rss_mb = max(self.worker_peak_rss_mb, other.worker_peak_rss_mb)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["errors"], d["tiers"] = dict(self.errors), dict(self.tiers)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScoreSummary:
        return cls(**{**d, "errors": Counter(d["errors"]), "tiers": Counter(d["tiers"])})

    def render(self) -> str:
        bad = sum(self.errors.values())
        ok = self.rows - bad
        lines = [
            f"rows: {self.rows}  scored: {ok}  errors: {bad}  "
            f"time: {self.seconds:.2f} s  rows/s: {self.rows_per_second:,.0f}"
        ]
        if ok:
            lines.append(
                "tier mix: "
                + ", ".join(f"{t} {n} ({n / ok:.1%})" for t, n in self.tiers.most_common())
            )
        resumed = (
            f" ({self.parts_resumed} finished by an earlier run)" if self.parts_resumed else ""
        )
        lines.append(f"parts: {self.parts}{resumed}  scoring processes: {self.workers}")
        if self.worker_peak_rss_mb:
            lines.append(
                f"peak RSS: main {self.main_peak_rss_mb:.0f} MB, largest worker "
                f"{self.worker_peak_rss_mb:.0f} MB"
            )
        if self.cache_hits:
            lines.append(
                f"repeated prompts served from the cache: {self.cache_hits} of "
                f"{self.cache_hits + self.cache_misses}"
            )
        if self.blank_lines:
            lines.append(f"blank lines skipped (no row): {self.blank_lines}")
        for reason, n in self.errors.most_common():
            lines.append(f"error: {reason}: {n}")
        lines.extend(f"  e.g. {e}" for e in self.examples)
        return "\n".join(lines)
