"""The ``tierpick`` command: one entry point whose command groups live in their own packages.

The dispatcher imports a group's module only when that group is asked for, so ``tierpick
serve`` works on a runtime-only install and ``classifier`` never imports ``training`` at
import time. Each group module exposes ``register(subparsers)``, which adds its commands and
sets ``func`` on each parser; the table below names it as ``module:function``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterator, Sequence

from tierpick.classifier.errors import TierpickError

# command group -> (module that implements it, pip extra it needs, one-line help)
_GROUPS: dict[str, tuple[str, str | None]] = {
    "data": ("tierpick.training.cli:register_data", None),
    "train": ("tierpick.training.cli:register_train", "train"),
    "evaluate": ("tierpick.training.cli:register_evaluate", "train"),
    "promote": ("tierpick.training.cli:register_promote", "train"),
    "export": ("tierpick.training.cli:register_export", "train"),
    "adapt": ("tierpick.training.cli:register_adapt", "train"),
    "classify": ("tierpick.serving.cli:register_classify", None),
    "score": ("tierpick.serving.cli:register_score", None),
    "report": ("tierpick.serving.cli:register_report", None),
    "tune": ("tierpick.serving.cli:register_tune", None),
    "label": ("tierpick.serving.cli:register_label", "label"),
    "serve": ("tierpick.serving.cli:register_serve", None),
    "health": ("tierpick.serving.cli:register_health", None),
    "bench": ("tierpick.serving.cli:register_bench", None),
    "gateway": ("tierpick.serving.cli:register_gateway", "gateway"),
}


DESCRIPTION = """\
tierpick routes each prompt to the cheapest LLM price tier likely to answer it: a learned
classifier gives every tier a calibrated probability of success, and a policy turns them into a
tier. Start with `tierpick classify "some prompt"` (the shipped model, in this process), then
`tierpick serve` (gRPC), `tierpick score` and `tierpick tune` on your prompt logs, and
`tierpick adapt` on your own eval outcomes. `tierpick COMMAND --help` explains each command."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless it has none or says it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            action.option_strings
            and action.default not in (None, False, argparse.SUPPRESS)
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def _every_parser(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _every_parser(child)


def build_parser(groups: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Build the argument parser, loading only the named command groups (all when None)."""
    from tierpick import __version__

    parser = argparse.ArgumentParser(prog="tierpick", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"tierpick {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log messages at this level and above, to stderr",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line (time, level, logger, message, exception)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in groups if groups is not None else _GROUPS:
        module_name, function = _GROUPS[name][0].split(":")
        getattr(importlib.import_module(module_name), function)(sub)
    for p in _every_parser(parser):  # the group modules build their parsers with add_parser
        p.formatter_class = _HelpFormatter
    return parser


class JsonFormatter(logging.Formatter):
    """One JSON object per log record, for log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        import datetime as dt
        import json

        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is logged (a test harness may swap
    it, and a stream captured once would be closed by then)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level: str, fmt: str) -> None:
    handler = _StderrHandler()
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _group(args: Sequence[str]) -> str | None:
    """The command group named by the first argument that is not a top-level option."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--log-level", "--log-format"):
            skip = True
        elif not arg.startswith("-"):
            return arg if arg in _GROUPS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tierpick`` command line; returns the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    group = _group(args_list)
    try:
        parser = build_parser([group] if group else None)
    except ImportError as exc:  # an optional extra is missing for this group
        extra = _GROUPS[group][1] if group else None
        hint = f" (pip install 'tierpick[{extra}]')" if extra else ""
        print(f"tierpick: cannot load this command: {exc}{hint}", file=sys.stderr)
        return 2
    args = parser.parse_args(args_list)
    configure_logging(args.log_level, args.log_format)
    try:
        code: int = args.func(args)
    except TierpickError as exc:
        print(f"tierpick: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`tierpick classify ... | head`)
        return 0
    except ImportError as exc:  # a command's extra is not installed (a runtime-only install)
        extra = _GROUPS[group][1] if group else None
        needs = f"pip install 'tierpick[{extra}]'" if extra else "a fuller install"
        print(f"tierpick: {args.command} needs {needs}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or directory that cannot be read or written: one line
        where = f": {exc.filename}" if exc.filename else ""
        print(f"tierpick: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
