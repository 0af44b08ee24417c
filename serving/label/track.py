"""A ``tierpick label`` run in MLflow: its settings (never a key), spend and success rates, the
outcomes and their sha256 as the tag ``outcomes_sha256``, by which ``tierpick adapt`` finds
the label run behind the outcomes it adapts on and links the two both ways."""

from __future__ import annotations

import os
from typing import Any

from tierpick.classifier.errors import ConfigError
from tierpick.classifier.runtime import tracking_uri
from tierpick.serving.label.run import LabelResult

OUTCOMES_TAG = "outcomes_sha256"


def log_label_run(uri: str, experiment: str, result: LabelResult) -> str:
    """Log ``result`` as one run in ``experiment``; returns the run id."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    s = result.summary
    cfg = s["config"]
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment)
    except Exception as exc:  # MlflowException, transport errors
        raise ConfigError(f"MLflow tracking store {uri} is unreachable: {exc}") from exc
    with mlflow.start_run(run_name=f"label {s['name']} {result.outcomes_sha256[:8]}") as run:
        mlflow.set_tags({OUTCOMES_TAG: result.outcomes_sha256, "tierpick_step": "label"})
        judge = cfg["judge"]
        mlflow.log_params(
            {
                "name": s["name"],
                **{f"tier.{t}.model": e["model"] for t, e in cfg["tiers"].items()},
                "judge": (judge["endpoint"] or {}).get("model") or " ".join(judge["command"]),
                "pass_grade": judge["pass_grade"],
                "max_tokens": cfg["request"]["max_tokens"],
                "budget_usd": s["budget_usd"],
            }
        )
        metrics: dict[str, Any] = {
            "spent_usd": s["spent_usd"],
            "prompts": s["prompts"],
            "prompts_graded_on_every_tier": s["prompts_graded_on_every_tier"],
            "outcomes": s["outcomes"],
            **{f"success_rate/{t}": v for t, v in s["success_rate"].items()},
        }
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for name in ("label.md", "label.json", "tiers.yaml", "outcomes.jsonl", "problems.jsonl"):
            path = result.out / name
            if path.exists():
                mlflow.log_artifact(str(path), artifact_path="label")
        return str(run.info.run_id)


__all__ = ["OUTCOMES_TAG", "log_label_run", "tracking_uri"]
