"""``tierpick data ...`` commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from classifier.errors import ConfigError


def register(sub: Any) -> None:
    """Add the ``data`` command group to the ``tierpick`` parser."""
    data = sub.add_parser("data", help="build and inspect training datasets from eval outcomes")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    build = dsub.add_parser("build", help="ingest eval outcomes and write the per-prompt dataset")
    build.add_argument("--config", required=True, help="tier config YAML")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--data-root", help="override the config's data_root")
    build.set_defaults(func=_build)

    stats = dsub.add_parser("stats", help="print tables about a dataset or a config's sources")
    stats.add_argument("dataset", nargs="?", help="a directory written by `tierpick data build`")
    stats.add_argument("--config", help="build in memory from this config instead")
    stats.add_argument("--data-root", help="override the config's data_root")
    stats.add_argument("--json", dest="json_out", help="also write the stats as JSON here")
    stats.set_defaults(func=_stats)


def _build(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.dataset import build_dataset, write_dataset
    from training.stats import stats_report

    built = build_dataset(load_config(args.config, data_root=args.data_root))
    out = write_dataset(built, args.out)
    text, _ = stats_report(built)
    print(text)
    print(f"wrote {built.table.num_rows} prompts to {out} in {built.report['build_seconds']} s")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.dataset import build_dataset, load_dataset
    from training.stats import stats_report

    if bool(args.dataset) == bool(args.config):
        raise ConfigError("give either a dataset directory or --config, not both or neither")
    ds = (
        load_dataset(args.dataset)
        if args.dataset
        else build_dataset(load_config(args.config, data_root=args.data_root))
    )
    text, data = stats_report(ds)
    sys.stdout.write(text)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
    return 0
