"""``tierpick data|train|evaluate|promote`` commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from tierpick.classifier.errors import ConfigError


def register_data(sub: Any) -> None:
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


def _tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )


def register_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train teacher and student, evaluate, export, log to MLflow")
    p.add_argument("--config", required=True, help="tier config YAML (with its train: section)")
    p.add_argument("--out", required=True, help="model directory to write (e.g. models/default)")
    p.add_argument("--workdir", default="build/train", help="resumable intermediate state")
    p.add_argument("--dataset", help="a dataset directory from `tierpick data build`")
    p.add_argument("--data-root", help="override the config's data_root")
    p.add_argument("--experiment", default="tierpick", help="MLflow experiment name")
    p.add_argument("--register-name", help="registered model name (default: tierpick-<model>)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    _tracking_args(p)
    p.set_defaults(func=_train)


def register_adapt(sub: Any) -> None:
    from tierpick.training.adapt import METHODS, MIN_HEAD_OUTCOMES, MIN_OUTCOMES

    p = sub.add_parser(
        "adapt",
        help="recalibrate a model on your own eval outcomes (no retrain), cross-fitted check",
        description="Ingest your outcomes with a tier config that maps your models to the model's "
        "tiers (same names and order, your prices), refit each tier's calibration that has enough "
        "outcomes, compare parent and adapted (cross-fitted), and write a new model "
        "directory (refused when worse, unless --force). Logged to MLflow as @challenger.",
    )
    p.add_argument("--config", required=True, help="tier config YAML: your tiers and sources")
    p.add_argument("--model", help="the parent model directory or models:/ URI (default: shipped)")
    p.add_argument("--out", required=True, help="the adapted model directory (new or empty)")
    p.add_argument("--data-root", help="override the config's data_root")
    p.add_argument(
        "--folds",
        type=int,
        default=5,
        help="cross-fitting folds: each prompt is evaluated by a calibration fitted without it",
    )
    p.add_argument("--seed", type=int, default=0, help="the folds' seed")
    p.add_argument(
        "--min-outcomes",
        type=int,
        default=MIN_OUTCOMES,
        help="labelled prompts a tier needs in the fit part to be recalibrated",
    )
    p.add_argument(
        "--min-head-outcomes",
        type=int,
        default=MIN_HEAD_OUTCOMES,
        help="labelled prompts a tier needs before the student's head is refitted too (kept only "
        "when the cross-fitted figures beat the calibration alone)",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="ways to fit tried beside the calibration alone: memory (a model of your outcomes "
        "over the student's prompt embedding), head (the student's head refitted); comma list, "
        "or none",
    )
    p.add_argument("--force", action="store_true", help="write it even when worse than the parent")
    p.add_argument("--experiment", default="tierpick-adapt", help="MLflow experiment name")
    p.add_argument(
        "--register-name", help="registered model name (default: tierpick-<parent>-adapted)"
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    _tracking_args(p)
    p.set_defaults(func=_adapt)


def _adapt(args: argparse.Namespace) -> int:
    import tempfile

    from tierpick.training import tracking
    from tierpick.training.adapt import adapt, render
    from tierpick.training.config import load_config
    from tierpick.training.dataset import build_dataset

    config = load_config(args.config, data_root=args.data_root)
    ds = build_dataset(config)  # bad outcome files fail here, before any store is touched
    sys.stdout.write(dropped_rows(ds))  # every outcome row not used, and why, said first
    client = None if args.no_mlflow else tracking.connect(args.tracking_uri)  # before writing
    out = Path(args.out)
    result = adapt(
        config,
        ds,
        args.model,
        out,
        folds=args.folds,
        seed=args.seed,
        min_outcomes=args.min_outcomes,
        force=args.force,
        min_head=args.min_head_outcomes,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip() not in ("", "none")),
    )
    text = render(result, config.tier_names)
    sys.stdout.write(text)
    if client is not None:
        parent = result.parent_version
        name = args.register_name or f"tierpick-{config.name}-adapted"
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp)
            (report / "adapt.md").write_text(text, encoding="utf-8")
            (report / "adapt.json").write_text(
                json.dumps({"parent": result.parent, "adapted": result.adapted}, indent=1)
            )
            metrics = {
                # for `tierpick promote`: the cross-fitted N-tier APGR on the user's data
                "test/student/apgr": result.adapted["n_tier_apgr"],
                "parent/test/student/apgr": result.parent["n_tier_apgr"],
                **{
                    f"cross_fitted/ece/{t}": v
                    for t, v in result.adapted["ece"].items()
                    if v is not None
                },
                **{f"parent/ece/{t}": v for t, v in result.parent["ece"].items() if v is not None},
            }
            run_id, version = tracking.log_training_run(
                client,
                experiment=args.experiment,
                registered_name=name,
                params={
                    "config": Path(args.config).name,
                    "adapted_from": parent,
                    "model_version": result.version,
                    "data_fingerprint": ds.fingerprint,
                    "adapted_tiers": ",".join(result.adapted_tiers),
                    "folds": args.folds,
                    "seed": args.seed,
                    "min_outcomes": args.min_outcomes,
                    "method": result.method,
                    "methods_tried": ",".join(result.methods),
                },
                metrics={k: float(v) for k, v in metrics.items() if v is not None},
                compared={"test_student_apgr": float(result.adapted["n_tier_apgr"])},
                model_dir=out,
                report_dir=report,
                tags={"data_fingerprint": ds.fingerprint, "adapted_from": parent},
                run_name=f"adapt {parent} on {ds.fingerprint[:8]}",
            )
            labels = tracking.link_label_runs(
                client, tracking.outcome_files_sha256(config), run_id, version, name
            )
        print(f"\nMLflow run {run_id}: registered {name} version {version} as @challenger")
        if labels:
            print(f"linked to the label run(s) of its outcomes: {', '.join(labels)}")
    print(f"adapted model -> {out}")
    return 0


def dropped_rows(ds: Any, examples: int = 5) -> str:
    """The outcome rows ingest dropped (NaN, infinite or out-of-range scores, missing fields,
    ...), by reason, with the first few locations; empty when none was."""
    by_reason = ds.report.get("dropped_by_reason", {})
    if not by_reason:
        return ""
    lines = [
        f"{sum(by_reason.values())} outcome rows dropped: "
        + "; ".join(f"{n} x {reason}" for reason, n in sorted(by_reason.items()))
    ]
    lines += [f"  {p['origin']}: {p['reason']}" for p in ds.report["dropped_rows"][:examples]]
    return "\n".join(lines) + "\n"


def register_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a model on a dataset's test and ood splits, and/or leave one family out",
    )
    p.add_argument("--model", help="model directory or models:/name@alias URI")
    p.add_argument("--dataset", help="a dataset directory from `tierpick data build`")
    p.add_argument("--config", help="build the dataset from this config instead")
    p.add_argument("--data-root", help="override the config's data_root")
    p.add_argument("--out", required=True, help="report directory (Markdown + JSON + PNG)")
    p.add_argument(
        "--loso",
        action="store_true",
        help="leave one source family out: train the config's pipeline without each family "
        "and evaluate on it (needs --config; one student per family)",
    )
    p.add_argument(
        "--families", help="comma-separated families to hold out (default: every family)"
    )
    p.add_argument(
        "--workdir",
        default="build/train",
        help="where teacher embeddings are cached (shared with `tierpick train`)",
    )
    p.add_argument("--experiment", default="tierpick-eval", help="MLflow experiment name")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    _tracking_args(p)
    p.set_defaults(func=_evaluate)


def register_export(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="write an int8-quantized copy of a model directory, with measured drift"
    )
    p.add_argument("--model", required=True, help="a model directory (fp32)")
    p.add_argument("--out", required=True, help="the new model directory")
    p.add_argument(
        "--int8",
        action="store_true",
        required=True,
        help="dynamic int8 quantization (the only export besides `tierpick train`)",
    )
    p.add_argument(
        "--prompts",
        default="../shared/data/prompt-logs/arena-hard-v0.1-question.jsonl",
        help="JSONL of real prompts (field 'prompt') to measure the drift on",
    )
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from tierpick.classifier.files import read_prompts
    from tierpick.training.export import quantize_artifact

    prompts = read_prompts(Path(args.prompts))  # real prompts to measure the drift on
    drift = quantize_artifact(Path(args.model), Path(args.out), prompts)
    for key, value in drift.items():
        print(f"{key}: {value:.6g}")
    size = sum(f.stat().st_size for f in Path(args.out).iterdir()) / 1e6
    print(f"wrote {args.out} ({size:.1f} MB)")
    return 0


def register_promote(sub: Any) -> None:
    p = sub.add_parser("promote", help="move the champion alias to a registered model version")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--version", help="version to promote (default: the challenger)")
    p.add_argument("--force", action="store_true", help="promote even if it evaluates worse")
    _tracking_args(p)
    p.set_defaults(func=_promote)


def _build(args: argparse.Namespace) -> int:
    from tierpick.training.config import load_config
    from tierpick.training.dataset import build_dataset, write_dataset
    from tierpick.training.stats import stats_report

    built = build_dataset(load_config(args.config, data_root=args.data_root))
    out = write_dataset(built, args.out)
    text, _ = stats_report(built)
    print(text)
    print(f"wrote {built.table.num_rows} prompts to {out} in {built.report['build_seconds']} s")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from tierpick.training.config import load_config
    from tierpick.training.dataset import build_dataset, load_dataset
    from tierpick.training.stats import stats_report

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


def _train(args: argparse.Namespace) -> int:
    from tierpick.training import tracking
    from tierpick.training.config import load_config
    from tierpick.training.pipeline import flat_metrics, run_training

    config = load_config(args.config, data_root=args.data_root)
    client = None if args.no_mlflow else tracking.connect(args.tracking_uri)  # fail fast
    result = run_training(
        config,
        Path(args.out),
        Path(args.workdir),
        dataset_dir=Path(args.dataset) if args.dataset else None,
    )
    out = Path(args.out)
    shutil.copy(result.report_dir / "report.md", out / "REPORT.md")
    for png in result.report_dir.glob("*.png"):
        shutil.copy(png, out / png.name)
    sys.stdout.write((result.report_dir / "report.md").read_text(encoding="utf-8"))
    if client is not None:
        name = args.register_name or f"tierpick-{config.train.model_name}"
        params = {
            "config": Path(args.config).name,  # no local absolute paths in params
            "data_fingerprint": result.report["data_fingerprint"],
            "model_version": result.report["model_version"],
            **_flatten("train", dataclasses.asdict(config.train)),
            "tiers": ",".join(config.tier_names),
        }
        run_id, version = tracking.log_training_run(
            client,
            experiment=args.experiment,
            registered_name=name,
            params=params,
            metrics=flat_metrics(result.report, tuple(config.tier_names), sep="/"),
            compared=result.metrics,
            model_dir=out,
            report_dir=result.report_dir,
            tags={"data_fingerprint": result.report["data_fingerprint"]},
            run_name=f"train {result.report['data_fingerprint'][:8]}",
        )
        print(f"\nMLflow run {run_id}: registered {name} version {version} as @challenger")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from tierpick.classifier.runtime import resolve_model_dir
    from tierpick.training import tracking
    from tierpick.training.config import load_config
    from tierpick.training.dataset import build_dataset, load_dataset
    from tierpick.training.evaluate import write_report
    from tierpick.training.pipeline import evaluate_model, flat_metrics

    if bool(args.dataset) == bool(args.config) and not (args.loso and args.config):
        raise ConfigError("give either --dataset or --config, not both or neither")
    if not args.model and not args.loso:
        raise ConfigError("give --model (a model to evaluate), --loso, or both")
    if args.loso and not args.config:
        raise ConfigError("--loso trains the config's pipeline per family: give --config")
    client = None if args.no_mlflow else tracking.connect(args.tracking_uri)
    config = load_config(args.config, data_root=args.data_root) if args.config else None
    ds = load_dataset(args.dataset) if args.dataset else build_dataset(config)  # type: ignore[arg-type]
    report: dict[str, Any] = (
        evaluate_model(resolve_model_dir(args.model), ds)
        if args.model
        else {"data_fingerprint": ds.fingerprint, "splits": {}, "tiers": list(ds.tiers)}
    )
    if args.loso:
        assert config is not None
        report["loso"] = run_loso(config, ds, Path(args.workdir), args.families)
    out = Path(args.out)
    md = write_report(report, out, ds.tiers)
    sys.stdout.write(md.read_text(encoding="utf-8"))
    if client is not None:
        import mlflow

        mlflow.set_experiment(args.experiment)
        registered = tracking.registered_version(client, str(args.model)) if args.model else None
        what = report.get("model_version", "loso") if args.model else "loso"
        with mlflow.start_run(run_name=f"evaluate {what} on {ds.fingerprint[:8]}") as run:
            commit = tracking.git_commit()
            mlflow.set_tags(
                {
                    **({"git_commit": commit} if commit else {}),
                    **(
                        {"registered_model": registered[0], "registered_version": registered[1]}
                        if registered
                        else {}
                    ),
                }
            )
            mlflow.log_params(
                {
                    "model": str(args.model),
                    "model_version": report.get("model_version", "-"),
                    "data_fingerprint": report["data_fingerprint"],
                    "loso": bool(args.loso),
                }
            )
            mlflow.log_metrics(flat_metrics(report, ds.tiers, sep="/"))
            mlflow.log_artifacts(str(out), artifact_path="report")
        if registered:  # the version points back at its evaluations, one tag per dataset
            client.set_model_version_tag(
                registered[0], registered[1], f"evaluate_run_{ds.fingerprint[:8]}", run.info.run_id
            )
        print(f"\nMLflow run {run.info.run_id}")
    return 0


def run_loso(config: Any, ds: Any, workdir: Path, families: str | None) -> dict[str, Any]:
    """Leave-one-family-out with the config's training settings (see ``training.loso``)."""
    from tierpick.training.fit import Context, tier_cost_vector
    from tierpick.training.loso import leave_one_family_out, loso_families

    if ds.tiers != config.tier_names:
        raise ConfigError(f"dataset tiers {ds.tiers} differ from the config's {config.tier_names}")
    known = loso_families(ds, 1)
    wanted = [f.strip() for f in families.split(",") if f.strip()] if families else None
    unknown = sorted(set(wanted or []) - set(known))
    if unknown:
        raise ConfigError(f"--families: {unknown} not in the dataset; its families: {known}")
    ctx = Context(config, workdir)
    return leave_one_family_out(ds, ctx, tier_cost_vector(config.tiers), wanted)


def _promote(args: argparse.Namespace) -> int:
    from tierpick.training import tracking

    client = tracking.connect(args.tracking_uri, must_exist=True)
    promoted, table = tracking.promote(client, args.name, args.version, args.force)
    print(table)
    return 0 if promoted else 1


def _flatten(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(f"{prefix}.{k}", v))
        else:
            out[f"{prefix}.{k}"] = v
    return out
