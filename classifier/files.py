"""Small I/O helpers shared by ingestion (training) and batch scoring (serving)."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def open_text(path: Path, mode: str = "r") -> IO[str]:
    """Open a UTF-8 text file for reading or writing, gzip-compressed when it ends in ``.gz``.

    Newlines are not translated, as the csv module wants. Reading skips a UTF-8 byte-order
    mark (spreadsheet exports start with one).
    """
    encoding = "utf-8-sig" if mode == "r" else "utf-8"
    if path.name.lower().endswith(".gz"):
        fh: IO[str] = gzip.open(path, mode + "t", encoding=encoding, newline="")  # type: ignore[assignment]  # noqa: SIM115
        return fh
    return path.open(mode, encoding=encoding, newline="")


def first_bad_utf8_line(path: Path) -> int | None:
    """The number of the first line of a (gzip) file that is not valid UTF-8, or None."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return None


def read_prompts(path: Path, field: str = "prompt") -> list[str]:
    """The non-empty string values of ``field`` in a JSONL file (benchmarks, drift checks)."""
    from tierpick.classifier.errors import ConfigError

    if not path.is_file():
        raise ConfigError(
            f"{path}: no such prompt file; give a JSONL file of prompts with --prompts (the "
            "default is the shared eval data beside a checkout)"
        )
    prompts = []
    with open_text(path, "r") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                value = json.loads(line).get(field) if line.strip() else None
            except (json.JSONDecodeError, AttributeError) as exc:
                raise ConfigError(f"{path}:{lineno}: not a JSON object ({exc})") from exc
            if isinstance(value, str) and value.strip():
                prompts.append(value)
    if not prompts:
        raise ConfigError(f"{path}: no prompts in field {field!r}")
    return prompts


def csv_records(reader: Any) -> Iterator[tuple[int, Any, str | None, str]]:
    """(line, row, problem, detail) for each row of a ``csv.reader`` or ``csv.DictReader``,
    ``line`` being where the row starts and ``problem`` None for a good row. A row the csv module
    cannot parse (a field over the size limit, ...) comes as (line, None, "malformed CSV row",
    the csv module's reason) and reading goes on; a DictReader's row of the wrong width (a long
    row has a ``None`` key, a short one ``None`` values) as "wrong number of CSV fields"."""
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield line, None, "malformed CSV row", str(exc)
            continue
        if isinstance(row, dict):
            extra = row.pop(None, None)
            if extra or any(v is None for v in row.values()):
                yield line, row, "wrong number of CSV fields", ""
                continue
        yield line, row, None, ""


MAX_YAML_BYTES = 4 << 20  # a config or policy file larger than this is refused unread
MAX_YAML_DEPTH = 64  # nesting deeper than this is refused (no real config comes close)


def load_yaml(path: Path, what: str) -> Any:
    """A YAML config or policy file, parsed safely and boundedly: at most ``MAX_YAML_BYTES``,
    no aliases (``*ref``: what a few hundred bytes turn into gigabytes with), nesting at most
    ``MAX_YAML_DEPTH`` deep. Every refusal is one :class:`ConfigError` line naming ``what``.

    Raises:
        ConfigError: unreadable, too large, not YAML, an alias, or too deep.
    """
    import yaml

    from tierpick.classifier.errors import ConfigError

    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{what} {path}: {size} bytes, over the {MAX_YAML_BYTES} allowed")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text ({exc.reason})") from exc

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise ConfigError(
                    f"{what} {path}:{mark.line + 1}: YAML aliases (*name) are not accepted "
                    "in tierpick's files: write the value out"
                )
            self.depth += 1
            if self.depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise ConfigError(
                    f"{what} {path}:{mark.line + 1}: nested more than {MAX_YAML_DEPTH} deep"
                )
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: not valid YAML: {str(exc)[:300]}") from exc
    except RecursionError as exc:  # flow collections nest in the scanner, before compose
        raise ConfigError(f"{what} {path}: nested too deeply") from exc
