"""``tierpick score|bench`` commands (runtime only: no torch, no training imports)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from tierpick.classifier.routing import CHARS_PER_TOKEN, OUTPUT_TOKENS


def register_classify(sub: Any) -> None:
    p = sub.add_parser(
        "classify",
        help="classify prompts and explain each decision (probabilities, utilities, policy)",
        description="Route prompts with a model in this process and show why: each tier's "
        "calibrated success probability, its normalized cost and its utility under the policy "
        "(probability - cost_weight x normalized cost), the rule and cost weight used, whether "
        "the prompt was cut before the model saw it, and the model version.",
    )
    p.add_argument(
        "prompts",
        nargs="+",
        metavar="PROMPT",
        help="prompt text(s); - reads one from standard input; an OpenAI chat (a JSON list of "
        "messages, or an object with messages) is read as served: its last user turn, then "
        "the user turns before it",
    )
    p.add_argument("--model", help="model directory or models:/ URI (default: shipped model)")
    p.add_argument("--policy", metavar="POLICY.yaml", help="a policy file (tierpick tune --out)")
    _policy_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument(
        "--explain",
        action="store_true",
        help="also how familiar the prompt is to the training data, and the training prompts "
        "nearest it with the success each tier's models had on them",
    )
    p.set_defaults(func=_classify)


def _cost_flags(p: argparse.ArgumentParser) -> None:
    """The assumptions a call's cost is estimated with (``classifier.routing.call_costs``)."""
    p.add_argument(
        "--output-tokens", type=int, default=OUTPUT_TOKENS, help="assumed output tokens per call"
    )
    p.add_argument(
        "--chars-per-token",
        type=float,
        default=CHARS_PER_TOKEN,
        help="assumed characters per input token",
    )


def _policy_flags(p: argparse.ArgumentParser) -> None:
    """One flag per policy field (:data:`~tierpick.classifier.routing.POLICY_FIELDS`)."""
    from tierpick.classifier.routing import POLICY_FIELDS

    for f in POLICY_FIELDS:
        metavar = "TIERS" if f.tiers else "true|false" if f.switch else "X"
        p.add_argument(f.flag, metavar=metavar, help=f.help)


def _flag_policy(args: argparse.Namespace, base: Any) -> Any:
    """``base`` with the policy flags given laid over it."""
    from tierpick.classifier.routing import POLICY_FIELDS, overlay

    return overlay(
        base,
        {
            f.name: f.from_text(getattr(args, f.name), f.flag)
            for f in POLICY_FIELDS
            if getattr(args, f.name) is not None
        },
    )


def explain(clf: Any, prompts: list[str], policy: Any, nearest: int = 0) -> list[dict[str, Any]]:
    """Each prompt's decision and why, as ``tierpick classify`` prints it; with ``nearest``,
    also its familiarity to the training data and that many training prompts nearest it, with
    the success each tier's models had on them (a model with a reference)."""
    router = clf.router(policy)
    reading = clf.read(prompts, familiarity=nearest > 0)
    near = (  # the embeddings of the same run of the graph
        clf.reference.nearest(reading.embedding, nearest)
        if nearest and clf.reference is not None and reading.embedding is not None
        else [[] for _ in prompts]
    )
    proba = reading.proba
    chosen, met = router.choose(proba)
    utility = router.utilities(proba)
    m = clf.manifest
    out = []
    for i, prompt in enumerate(prompts):
        ranges = router.knob_ranges(proba[i])
        out.append(
            {
                "tier": clf.tiers[int(chosen[i])],
                "rule": router.rule,
                "knob": router.knob,
                "min_success": router.min_success,
                "cost_weight": router.cost_weight,
                "met_threshold": bool(met[i]),
                "tiers": [
                    {
                        "tier": t,
                        "probability": round(float(proba[i, j]), 6),
                        "normalized_cost": round(float(router.costs[j]), 6),
                        "utility": None
                        if not router.allowed[j]
                        else round(float(utility[i, j]), 6),
                        "allowed": bool(router.allowed[j]),
                        # the knob's values that would choose this tier, all else equal
                        "chosen_when": None
                        if ranges[j] is None
                        else {
                            router.knob: [
                                round(r, 6) if math.isfinite(r) else None for r in ranges[j]
                            ]
                        },
                    }
                    for j, t in enumerate(clf.tiers)
                ],
                "prompt_chars": len(prompt),
                "model_chars": len(reading.texts[i]),
                "tokens": len(reading.ids[i]),
                "truncated": reading.cut[i],
                "model": {"name": m.model_name, "version": clf.version},
            }
        )
        if reading.familiarity is not None:
            out[-1]["familiarity"] = round(float(reading.familiarity[i]), 4)
        if near[i]:
            out[-1]["nearest_training_prompts"] = [
                {
                    "prompt": text,
                    "similarity": round(sim, 4),
                    "observed_success": {
                        t: None if math.isnan(v) else round(float(v), 3)
                        for t, v in zip(clf.tiers, success, strict=True)
                    },
                }
                for text, sim, success in near[i]
            ]
    return out


def _classify(args: argparse.Namespace) -> int:
    import json

    from tierpick import classifier
    from tierpick.classifier import RoutingPolicy, read_policy
    from tierpick.classifier.table import format_table

    clf = classifier.load(args.model)
    policy = _flag_policy(args, read_policy(args.policy) if args.policy else RoutingPolicy())
    prompts = [_prompt_argument(p, clf) for p in args.prompts]
    for d in explain(clf, prompts, policy, 3 if args.explain else 0):
        if args.json:
            print(json.dumps(d))
            continue
        rule = (
            f"threshold rule, min_success {d['min_success']:g}"
            + ("" if d["met_threshold"] else " (no allowed tier reached it: the dearest allowed)")
            if d["rule"] == "threshold"
            else f"utility rule, cost_weight {d['cost_weight']:g}"
        )
        print(f"tier: {d['tier']}   ({rule}; model {d['model']['name']} {d['model']['version']})")
        knob = d["knob"]
        rows = [
            [
                t["tier"] + (" <-" if t["tier"] == d["tier"] else ""),
                t["probability"],
                t["normalized_cost"],
                "not allowed" if t["utility"] is None else t["utility"],
                _knob_range(t, knob),
            ]
            for t in d["tiers"]
        ]
        print(
            format_table(
                ["tier", "p(success)", "normalized cost", "utility", f"chosen at {knob}"], rows
            )
        )
        cut = "cut before the model saw it" if d["truncated"] else "not cut"
        print(
            f"prompt: {d['prompt_chars']} characters, {d['model_chars']} as the model reads it, "
            f"{d['tokens']} tokens ({cut})"
        )
        if "familiarity" in d:
            plain = "unlike the training data" if d["familiarity"] < 0.05 else "like it"
            print(f"familiarity to the training data: {d['familiarity']:.2f} ({plain})")
        for n in d.get("nearest_training_prompts", []):
            seen = ", ".join(
                f"{t} {'-' if v is None else format(v, '.2f')}"
                for t, v in n["observed_success"].items()
            )
            text = " ".join(n["prompt"].split())[:100]
            print(f"  near ({n['similarity']:.2f}): {text!r}\n    observed success: {seen}")
        print()
    return 0


def _knob_range(tier: dict[str, Any], knob: str) -> str:
    """A tier's ``chosen_when`` as ``classify`` prints it: ``0.0673 to 1.01``, ``>= 1.01``."""
    if not tier["allowed"]:
        return "-"
    if tier["chosen_when"] is None:
        return "never" if knob == "cost_weight" else "never (a cheaper tier is as likely)"
    lo, hi = tier["chosen_when"][knob]
    if knob == "min_success":  # lo < min_success <= hi
        return f"above {lo:.3g} up to {hi:.3g}"
    if hi is None:
        return f">= {lo:.3g}"
    return f"below {hi:.3g}" if lo == 0 else f"{lo:.3g} to {hi:.3g}"


def _prompt_argument(text: str, clf: Any) -> str:
    """A ``classify`` argument as the text classified: ``-`` is standard input; a chat (JSON
    messages) as served: its last user turn with text, then the user turns before it as far as
    the model reads (:meth:`~tierpick.classifier.TierClassifier.chat_text`)."""
    import json

    from tierpick.classifier.errors import PromptError

    if text == "-":
        text = sys.stdin.read()
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            chat = json.loads(stripped)
        except (ValueError, RecursionError):
            return text  # a prompt that happens to start with a bracket
        messages = chat.get("messages") if isinstance(chat, dict) else chat
        if (
            isinstance(messages, list)
            and messages
            and all(isinstance(m, dict) and "role" in m for m in messages)
        ):
            try:
                return str(clf.chat_text(messages))
            except ValueError as exc:
                raise PromptError(f"chat: {exc}") from None
    return text


def register_score(sub: Any) -> None:
    from tierpick.serving.scoring import ScoreOptions

    d = ScoreOptions()  # the defaults live in one place
    p = sub.add_parser(
        "score",
        help="score prompt logs (JSONL, CSV or Parquet files, directories or globs) with a model",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="INPUT... OUTPUT",
        help="inputs (files: .jsonl, .jsonl.gz, .csv, .parquet; directories; globs), then the "
        "output: a file for one input file, else a directory of parts",
    )
    p.add_argument("--model", help="model directory or models:/ URI (default: shipped model)")
    p.add_argument("--prompt-field", default=d.prompt_field, help="field holding the prompt text")
    p.add_argument(
        "--output-prefix",
        default=d.output_prefix,
        help="prefix for the columns scoring adds (tier, p_<tier>, error, extra_fields), for "
        "inputs that already have fields of those names",
    )
    p.add_argument(
        "--format",
        choices=["parquet", "jsonl", "jsonl.gz", "csv"],
        default=d.out_kind.lstrip("."),
        help="file kind of a directory output (a file output takes its extension's kind)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="scoring processes, or Ray actors (default: the CPUs this process may use)",
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: a process pool on this machine; ray: a Ray actor pool",
    )
    p.add_argument(
        "--ray-address",
        help="with --engine ray: the cluster to join (default: $RAY_ADDRESS or a local Ray)",
    )
    p.add_argument(
        "--part-mb",
        type=float,
        default=d.part_bytes / (1 << 20),
        help="a JSONL or Parquet file is cut into parts of this size",
    )
    p.add_argument(
        "--restart", action="store_true", help="discard parts left by a different earlier run"
    )
    p.add_argument(
        "--max-error-rate",
        type=float,
        help="exit 2 when more than this share of rows are error rows (default: only when "
        "every row is; the output is written either way)",
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="rows read and scored at a time"
    )
    p.add_argument("--threads", type=int, default=d.threads, help="ONNX Runtime intra-op threads")
    p.add_argument(
        "--cache-size",
        type=int,
        default=d.cache_size,
        help="distinct prompts whose scores each process remembers for repeats (0: off)",
    )
    p.set_defaults(func=_score)


def _score(args: argparse.Namespace) -> int:
    from tierpick import classifier
    from tierpick.classifier.errors import ConfigError
    from tierpick.serving.scoring import ScoreOptions, score

    if len(args.paths) < 2:
        raise ConfigError("give at least one INPUT and an OUTPUT")
    for name in ("workers", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.part_mb > 0:
        raise ConfigError(f"--part-mb must be > 0, got {args.part_mb}")
    if args.max_error_rate is not None and not 0.0 <= args.max_error_rate <= 1.0:
        raise ConfigError(f"--max-error-rate must be in [0, 1], got {args.max_error_rate}")
    clf = classifier.load(args.model, threads=args.threads)
    opts = ScoreOptions(
        prompt_field=args.prompt_field,
        out_kind="." + args.format,
        batch_size=args.batch_size,
        cache_size=args.cache_size,
        part_bytes=max(1, int(args.part_mb * (1 << 20))),
        threads=args.threads,
        output_prefix=args.output_prefix,
    )
    *inputs, output = args.paths
    summary = score(
        inputs,
        Path(output),
        clf,
        opts,
        workers=args.workers,
        engine=args.engine,
        ray_address=args.ray_address,
        restart=args.restart,
    )
    print(summary.render())
    print(f"model {clf.manifest.model_name} {clf.version} -> {output}")
    bad = sum(summary.errors.values())
    limit = args.max_error_rate
    if summary.rows and (bad == summary.rows or (limit is not None and bad > limit * summary.rows)):
        worst = ", ".join(f"{reason} ({n})" for reason, n in summary.errors.most_common(3))
        raise ConfigError(
            f"{bad} of {summary.rows} rows are error rows ({worst})"
            + ("" if bad == summary.rows else f", over --max-error-rate {limit:g}")
            + f"; {output} holds every row with its error"
            + (
                f"; is --prompt-field {args.prompt_field!r} right?"
                if "missing prompt" in worst
                else ""
            )
        )
    return 0


def register_report(sub: Any) -> None:
    from tierpick.serving.scoring import ScoreOptions

    d = ScoreOptions()
    p = sub.add_parser(
        "report",
        help="projected cost of a scored log against always using one tier; or, with "
        "--outcomes, measured savings on graded outcomes with 95%% intervals (MD, JSON, PNG)",
    )
    p.add_argument(
        "scored",
        nargs="?",
        help="output of tierpick score, or a decision log: a file or a directory of parts",
    )
    p.add_argument(
        "--outcomes",
        metavar="OUTCOMES.jsonl",
        help="graded outcomes (tierpick label's outcomes.jsonl): the policy's measured cost and "
        "quality against always-frontier and always-mid, with bootstrap 95%% intervals",
    )
    p.add_argument("--policy", metavar="POLICY.yaml", help="with --outcomes: the policy to measure")
    p.add_argument("--model", help="the model that scored it, for tier prices (default: shipped)")
    p.add_argument("--out", help="report directory (default: SCORED-report beside it)")
    p.add_argument("--prompt-field", default=d.prompt_field, help="field holding the prompt text")
    p.add_argument(
        "--output-prefix", default="", help="the --output-prefix the log was scored with"
    )
    _cost_flags(p)
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from tierpick import classifier
    from tierpick.classifier.errors import ConfigError
    from tierpick.serving.report import write_report

    if bool(args.scored) == bool(args.outcomes):
        raise ConfigError("give a scored log, or --outcomes OUTCOMES.jsonl (not both)")
    clf = classifier.load(args.model)
    if args.outcomes:
        from tierpick.classifier import read_policy
        from tierpick.serving.savings import write_savings

        outcomes = Path(args.outcomes)
        out = Path(args.out) if args.out else outcomes.parent / f"{outcomes.name}-savings"
        policy = read_policy(args.policy) if args.policy else None
        md, note = write_savings(outcomes, out, clf, policy)
        sys.stdout.write(md)
        if note:
            print(f"tierpick: savings.png not written: {note}", file=sys.stderr)
        print(f"report -> {out}/savings.md, savings.json" + ("" if note else ", savings.png"))
        return 0
    scored = Path(args.scored)
    out = Path(args.out) if args.out else scored.parent / f"{scored.name}-report"
    _, md, note = write_report(
        scored,
        out,
        clf,
        args.prompt_field,
        args.output_tokens,
        args.chars_per_token,
        args.output_prefix,
    )
    sys.stdout.write(md)
    if note:
        print(f"tierpick: cost_curve.png not written: {note}", file=sys.stderr)
    print(f"report -> {out}/report.md, report.json" + ("" if note else ", cost_curve.png"))
    return 0


def register_tune(sub: Any) -> None:
    from tierpick.serving.scoring import ScoreOptions

    d = ScoreOptions()
    p = sub.add_parser(
        "tune",
        help="choose the routing policy that meets a tier-share or cost budget on a prompt log",
        description="Score a prompt log, sweep the policy (utility cost_weight, or min_success "
        "with --rule threshold) and keep the one with the highest predicted success that meets "
        "every constraint. The policy file (--out) is read by tierpick serve --policy, the "
        "gateway config (policy: FILE) and tierpick.read_policy().",
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="prompt logs, as tierpick score reads (none: the model's reference training "
        "prompts, a plain target translated into the knob before there is a log)",
    )
    p.add_argument("--model", help="model directory or models:/ URI (default: shipped model)")
    p.add_argument(
        "--max-share",
        action="append",
        default=[],
        metavar="TIER=SHARE",
        help="at most this share of calls on TIER (0.2 or 20%%); repeatable",
    )
    p.add_argument(
        "--budget-per-1k", type=float, metavar="USD", help="at most this cost per 1,000 requests"
    )
    p.add_argument(
        "--min-quality",
        type=float,
        metavar="FRACTION",
        help="predicted success at least this fraction of always-the-dearest-tier's (e.g. 0.95); "
        "alone, the cheapest policy that meets it is chosen",
    )
    p.add_argument(
        "--rule",
        choices=["utility", "threshold"],
        default="utility",
        help="the knob swept: utility (cost_weight) or threshold (min_success)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="choose on a random share of the log and measure the policy on the rest (e.g. 0.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="the holdout split's seed")
    p.add_argument("--out", metavar="POLICY.yaml", help="write the chosen policy here")
    p.add_argument("--report-dir", help="write tune.md and tune_curve.png here")
    p.add_argument("--scored", action="store_true", help="INPUT is already tierpick score's output")
    p.add_argument("--prompt-field", default=d.prompt_field, help="field holding the prompt text")
    p.add_argument(
        "--output-prefix", default=d.output_prefix, help="with --scored: the log's --output-prefix"
    )
    _cost_flags(p)
    p.add_argument("--workers", type=int, help="scoring processes (default: the CPUs available)")
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    from tierpick import classifier
    from tierpick.classifier.errors import ConfigError
    from tierpick.serving.scoring import ScoreOptions
    from tierpick.serving.tune import Constraint, parse_share, run_tune

    shares: dict[str, float] = {}
    for text in args.max_share:
        tier, share = parse_share(text)
        if tier in shares:
            raise ConfigError(f"--max-share names {tier!r} twice: give one share per tier")
        shares[tier] = share
    constraint = Constraint(shares, args.budget_per_1k, args.min_quality)
    clf = classifier.load(args.model)
    opts = ScoreOptions(prompt_field=args.prompt_field, output_prefix=args.output_prefix)
    _, md, note = run_tune(
        args.inputs,
        clf,
        constraint,
        scored=args.scored,
        rule=args.rule,
        holdout=args.holdout,
        seed=args.seed,
        opts=opts,
        workers=args.workers,
        output_tokens=args.output_tokens,
        chars_per_token=args.chars_per_token,
        out=Path(args.out) if args.out else None,
        report_dir=Path(args.report_dir) if args.report_dir else None,
    )
    sys.stdout.write(md)
    if note:
        print(f"tierpick: tune_curve.png not written: {note}", file=sys.stderr)
    if args.out:
        print(f"policy -> {args.out} (tierpick serve --policy {args.out})")
    return 0


def register_label(sub: Any) -> None:
    from tierpick.serving.label import LabelOptions

    d = LabelOptions()
    p = sub.add_parser(
        "label",
        help="grade a sample of your prompt log on every tier's model (outcomes for adapt)",
        description="Draw a sample of a prompt log or decision log (stratified by the tier the "
        "model routes each prompt to and by a cluster of the prompts), ask every tier's model "
        "(OpenAI-compatible endpoints) for each prompt's answer, grade each answer (an LLM judge "
        "1-10, or your grader command) and write long-format outcomes with a tier config for "
        "tierpick adapt. Resumable: rerun the same command after a kill; nothing paid for is "
        "paid again. Keys come from the environment variables the config names.",
    )
    p.add_argument("inputs", nargs="+", metavar="LOG", help="prompt logs, as tierpick score reads")
    p.add_argument("--config", required=True, help="label YAML: tiers' endpoints, judge, requests")
    p.add_argument("--out", required=True, help="output directory (a rerun resumes it)")
    p.add_argument("--model", help="model directory or models:/ URI (default: shipped model)")
    p.add_argument(
        "--size", type=int, help="prompts to draw (default: what --budget-usd allows, else 200)"
    )
    p.add_argument("--budget-usd", type=float, help="stop before spending more than this (USD)")
    p.add_argument("--prompt-field", default=d.prompt_field, help="field holding the prompt text")
    p.add_argument("--reference-field", help="field holding a reference answer for the judge")
    p.add_argument("--task-field", help="field naming the prompt's task (default: its cluster)")
    p.add_argument(
        "--clusters", type=int, default=d.clusters, help="prompt clusters to stratify by"
    )
    p.add_argument(
        "--pool",
        type=int,
        default=d.pool,
        help="distinct prompts the sample is drawn from (a uniform reservoir of the log)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="the sample's seed")
    p.add_argument("--restart", action="store_true", help="discard what --out holds and start over")
    p.add_argument(
        "--retry-problems",
        action="store_true",
        help="call again for prompts whose answer or grade failed in an earlier run",
    )
    p.add_argument("--experiment", default="tierpick-label", help="MLflow experiment name")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    p.set_defaults(func=_label)


def _label(args: argparse.Namespace) -> int:
    from tierpick import classifier
    from tierpick.classifier.errors import ConfigError
    from tierpick.serving.label import LabelOptions, load_label_config, run_label

    cfg = load_label_config(args.config)
    clf = classifier.load(args.model)
    for name in ("clusters", "pool"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    opts = LabelOptions(
        size=args.size,
        budget_usd=args.budget_usd,
        prompt_field=args.prompt_field,
        reference_field=args.reference_field,
        task_field=args.task_field,
        clusters=args.clusters,
        pool=args.pool,
        seed=args.seed,
        restart=args.restart,
        retry_problems=args.retry_problems,
    )
    tracker = None if args.no_mlflow else _label_tracker(args)
    result = run_label(args.inputs, Path(args.out), cfg, clf, opts)
    sys.stdout.write(result.markdown)
    if tracker is not None:
        run_id = tracker(result)
        if run_id:
            print(f"MLflow run {run_id} (outcomes {result.outcomes_sha256[:12]})")
    print(f"outcomes -> {result.out}/outcomes.jsonl; tier config -> {result.out}/tiers.yaml")
    return 0


def _label_tracker(args: argparse.Namespace) -> Any:
    """A function that logs a label run to MLflow, or None (with a note) without mlflow."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        print(
            "tierpick: MLflow is not installed (pip install 'tierpick[train]'): this label run "
            "is not tracked",
            file=sys.stderr,
        )
        return None
    from tierpick.serving.label.track import log_label_run, tracking_uri

    uri = tracking_uri(args.tracking_uri)
    return lambda result: log_label_run(uri, args.experiment, result)


def register_serve(sub: Any) -> None:
    from tierpick.classifier.settings import add_flags
    from tierpick.serving.lifecycle import ServerConfig

    p = sub.add_parser("serve", help="serve a model over gRPC (TierRouter, health, reflection)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=50051, help="port to bind (0: any free port)")
    p.add_argument("--model", help="model directory or models:/ URI (default: shipped model)")
    add_flags(p, ServerConfig)  # the server's limits: flags, defaults and checks from one place
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument(
        "--hold",
        metavar="TARGET",
        help="live budget guard, a policy in plain terms held on the traffic the server's "
        "policy routes by adjusting its cost weight: frontier=0.2 (at most 20%% to frontier "
        "and dearer), spend=2 (at most $2 per 1k requests), quality=0.95 (predicted success "
        "at least 95%% of always-the-dearest-tier's)",
    )
    p.add_argument(
        "--guard-window",
        type=int,
        default=1000,
        help="decisions the guard solves its cost weight on (default 1000)",
    )
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument(
        "--tls-client-ca",
        help="PEM CA: require client certificates signed by it (mutual TLS)",
    )
    p.add_argument(
        "--policy",
        metavar="POLICY.yaml",
        help="routing policy of calls that set none (tierpick tune --out writes one); the "
        "fields a call sets override it (default: the model's utility rule)",
    )
    p.add_argument(
        "--decision-log",
        metavar="FILE.jsonl",
        help="append every decision to this JSONL file (prompt hash and length, tier, "
        "probabilities, policy, model version, request id), for tierpick report and label",
    )
    p.add_argument(
        "--decision-log-prompts",
        action="store_true",
        help="also write each prompt's text to the decision log (tierpick label needs it)",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from tierpick.classifier import read_policy
    from tierpick.classifier.errors import ConfigError
    from tierpick.classifier.settings import from_flags
    from tierpick.serving.decisions import DecisionLogConfig
    from tierpick.serving.guard import Target
    from tierpick.serving.lifecycle import TLS, ServerConfig
    from tierpick.serving.service import serve

    config = from_flags(ServerConfig, args, "tierpick serve:")
    tls = TLS.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
    policy = read_policy(args.policy) if args.policy else None
    if args.decision_log_prompts and not args.decision_log:
        raise ConfigError("--decision-log-prompts needs --decision-log FILE")
    decisions = (
        DecisionLogConfig(path=Path(args.decision_log), prompts=args.decision_log_prompts)
        if args.decision_log
        else None
    )
    hold = Target.parse(args.hold, args.guard_window) if args.hold else None
    return serve(
        args.host, args.port, args.model, config, args.metrics_port, tls, policy, decisions, hold
    )


def register_health(sub: Any) -> None:
    p = sub.add_parser(
        "health",
        help="ask a tierpick server (service or gateway processor) whether it serves: exit 0 "
        "when SERVING (a container's health probe)",
    )
    p.add_argument("address", nargs="?", default="127.0.0.1:50051", help="host:port")
    p.add_argument("--service", default="", help="the service asked about ('' = the server)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds")
    p.set_defaults(func=_health)


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.address) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
                .status
            )
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}")
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{args.address}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def register_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="print latency tables measured on real prompts")
    p.add_argument("--model", help="model directory (default: shipped model)")
    p.add_argument(
        "--prompts",
        default="../shared/data/prompt-logs/arena-hard-v0.1-question.jsonl",
        help="JSONL with a prompt field",
    )
    p.add_argument("--repeat", type=int, default=3, help="passes over the prompts")
    p.add_argument("--teacher", help="a teacher ONNX file to time beside the student")
    p.add_argument(
        "--adapted",
        help="an adapted model directory (tierpick adapt --out) to time against --model, "
        "prompt by prompt in alternation",
    )
    p.add_argument(
        "--grpc",
        action="store_true",
        help="benchmark a real gRPC server (started in its own process) instead",
    )
    p.add_argument("--target", help="with --grpc: an already running server host:port")
    p.add_argument("--calls", type=int, default=2000, help="with --grpc: interleaved call pairs")
    p.add_argument(
        "--score",
        action="store_true",
        help="benchmark tierpick score (process pool, prompt cache, Ray) on a log of --rows "
        "prompts cycled from --prompts instead",
    )
    p.add_argument("--rows", type=int, default=1_000_000, help="with --score: log size")
    p.add_argument("--no-ray", action="store_true", help="with --score: skip the Ray engine")
    p.add_argument(
        "--gateway",
        action="store_true",
        help="benchmark the latency Envoy + the tierpick ext_proc filter adds over Envoy alone "
        "(--calls per path)",
    )
    p.add_argument(
        "--litellm",
        action="store_true",
        help="benchmark the latency the tierpick plug-in adds to a LiteLLM proxy over the same "
        "proxy without it (--calls per path; 500 take a few minutes)",
    )
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from tierpick.classifier.errors import ConfigError

    try:
        from tierpick.serving.harness.bench import run_grpc_bench, run_inprocess_bench
    except ModuleNotFoundError as exc:
        if exc.name != "tierpick.serving.harness":
            raise
        raise ConfigError(
            "tierpick bench runs from a checkout of tierpick (its harnesses are not in the "
            "wheel): clone it, then `make venv` and `.venv/bin/tierpick bench`"
        ) from None

    if args.teacher and not Path(args.teacher).is_file():
        raise ConfigError(f"--teacher {args.teacher}: no such ONNX file")

    if args.litellm:
        from tierpick.serving.harness.bench import run_litellm_bench

        sys.stdout.write(run_litellm_bench(args.model, Path(args.prompts), args.calls))
    elif args.gateway:
        from tierpick.serving.harness.bench import run_gateway_bench

        sys.stdout.write(run_gateway_bench(args.model, Path(args.prompts), args.calls))
    elif args.score:
        from tierpick.serving.harness.bench import run_score_bench

        sys.stdout.write(
            run_score_bench(args.model, Path(args.prompts), args.rows, ray=not args.no_ray)
        )
    elif args.grpc:
        sys.stdout.write(run_grpc_bench(args.model, Path(args.prompts), args.calls, args.target))
    else:
        sys.stdout.write(
            run_inprocess_bench(
                args.model, Path(args.prompts), args.repeat, args.teacher, args.adapted
            )
        )
    return 0


def register_gateway(sub: Any) -> None:
    p = sub.add_parser(
        "gateway", help="Envoy integration: run the ext_proc processor, or render Envoy's config"
    )
    gsub = p.add_subparsers(dest="gateway_command", metavar="ACTION")
    gsub.required = True
    run = gsub.add_parser("run", help="run the Envoy external processor (ext_proc) over gRPC")
    run.add_argument("--config", required=True, help="gateway YAML (see serving/deploy/)")
    run.add_argument("--model", help="override the config's model directory or models:/ URI")
    run.add_argument("--port", type=int, help="override processor.port")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    run.set_defaults(func=_gateway_run)
    env = gsub.add_parser(
        "envoy-config", help="print the Envoy bootstrap YAML for a gateway config"
    )
    env.add_argument("--config", required=True, help="gateway YAML")
    env.add_argument(
        "--without-processor",
        action="store_true",
        help="the same Envoy without the ext_proc filter (everything to the fallback tier)",
    )
    env.set_defaults(func=_gateway_envoy_config)
    demo = gsub.add_parser(
        "demo-upstreams",
        help="serve a fake OpenAI-compatible upstream on each tier's address of a gateway config "
        "(answers as the tier, echoing the model and x-tierpick-* headers): for trying the "
        "gateway without real models",
    )
    demo.add_argument("--config", required=True, help="gateway YAML")
    demo.set_defaults(func=_gateway_demo_upstreams)


def _gateway_demo_upstreams(args: argparse.Namespace) -> int:
    from tierpick.serving.gateway import load_gateway_config
    from tierpick.serving.gateway.demo import Upstream
    from tierpick.serving.lifecycle import run_until_signalled

    cfg = load_gateway_config(args.config)
    started = []
    try:
        for tier, up in cfg.tiers.items():
            started.append(Upstream(tier, up.host, up.port))
        lines = [f"demo upstream {u.name} on {u.address}" for u in started]
        run_until_signalled(lambda: None, ready=lambda: print("\n".join(lines), flush=True))
    finally:
        for u in started:
            u.close()
    return 0


def _gateway_config(args: argparse.Namespace) -> Any:
    from tierpick.serving.gateway import load_gateway_config

    cfg = load_gateway_config(args.config)
    if getattr(args, "model", None):
        cfg = cfg.model_copy(update={"model": args.model})
    if getattr(args, "port", None) is not None:
        processor = cfg.processor.model_copy(update={"port": args.port})
        cfg = cfg.model_copy(update={"processor": processor})
    return cfg


def _gateway_run(args: argparse.Namespace) -> int:
    from tierpick.serving.gateway import run_gateway

    return run_gateway(_gateway_config(args), args.metrics_port)


def _gateway_envoy_config(args: argparse.Namespace) -> int:
    from tierpick.serving.gateway import render_envoy_config

    sys.stdout.write(
        render_envoy_config(_gateway_config(args), with_processor=not args.without_processor)
    )
    return 0
