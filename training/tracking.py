"""MLflow tracking: every training run logs its config, data fingerprint, metrics, report and
model; models are registered with the alias ``challenger``; ``promote`` moves ``champion``.

The tracking store is ``MLFLOW_TRACKING_URI`` when set, else a sqlite file (``mlflow.db`` in the
working directory): no server is needed, and any server works.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from tierpick.classifier.errors import ConfigError, TierpickError
from tierpick.classifier.runtime import tracking_uri

PRIMARY_METRIC = "test_student_apgr"  # N-tier APGR of the student on the in-distribution test split
COMPARED = (PRIMARY_METRIC, "test_student_mean_auc", "ood_student_apgr", "ood_student_mean_auc")


def connect(uri: str | None = None, must_exist: bool = False) -> Any:
    """Point MLflow at the tracking store and check it answers; a clear error when it does not.
    ``must_exist``: a local store (sqlite file) that does not exist yet is an error instead of
    being created (commands that only read, like ``tierpick promote``)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow
    from mlflow.tracking import MlflowClient

    resolved = tracking_uri(uri)
    if must_exist and resolved.startswith("sqlite:///"):
        db = Path(resolved.removeprefix("sqlite:///"))
        if not db.is_file():
            raise ConfigError(
                f"no MLflow store at {db} (nothing was logged there): give --tracking-uri or "
                "$MLFLOW_TRACKING_URI of the store the model was registered in"
            )
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    client = MlflowClient(resolved, resolved)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:  # MlflowException, requests and sqlalchemy errors alike
        raise ConfigError(f"MLflow tracking store {resolved} is unreachable: {exc}") from exc
    return client


def git_commit() -> str | None:
    """The commit of the checkout this package runs from (None when installed, or not git)."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# what tierpick.classifier imports at run time (pyproject's base dependencies it uses), and
# pandas for the pyfunc's DataFrame
RUNTIME_REQUIREMENTS = [
    "numpy>=1.26",
    "onnxruntime>=1.20",
    "tokenizers>=0.20",
    "pyyaml>=6",
    "pandas",
]


def runtime_code(folder: Path) -> Path:
    """``folder/tierpick``: the runtime (``tierpick.classifier``) under a package shim whose
    ``__path__`` extends to an installed tierpick, if any (so ``tierpick.serving`` still imports
    in a process that loaded the model first)."""
    import shutil

    import tierpick.classifier

    pkg = folder / "tierpick"
    shutil.copytree(
        Path(tierpick.classifier.__file__).parent,
        pkg / "classifier",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (pkg / "__init__.py").write_text(
        '"""The tierpick runtime, shipped with an MLflow model (see training/tracking.py)."""\n'
        "from pkgutil import extend_path\n\n"
        "__path__ = extend_path(__path__, __name__)\n",
        encoding="utf-8",
    )
    return pkg


def registered_version(client: Any, uri: str) -> tuple[str, str] | None:
    """``(name, version)`` of a ``models:/name@alias`` or ``models:/name/N`` URI, else None."""
    if not uri.startswith("models:/"):
        return None
    ref = uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, number = ref.rpartition("/")
    return (name, number) if name and number.isdigit() else None


def log_training_run(
    client: Any,
    *,
    experiment: str,
    registered_name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    model_dir: Path,
    report_dir: Path,
    tags: dict[str, str],
    run_name: str | None = None,
    compared: dict[str, float] | None = None,
) -> tuple[str, str]:
    """Log one run and register its model as a new version with alias ``challenger``. The run
    is tagged with the git commit of the code that made it, when run from a checkout.

    ``metrics`` are logged as named (grouped: ``test/student/apgr``); the version is tagged with
    the :data:`COMPARED` ones of ``compared`` (flat names, as ``promote`` reads them), or of
    ``metrics`` when not given.

    Returns:
        (run id, registered model version).
    """
    import mlflow

    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        commit = git_commit()
        mlflow.set_tags({**tags, **({"git_commit": commit} if commit else {})})
        mlflow.log_params(params)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(str(report_dir), artifact_path="report")
        with tempfile.TemporaryDirectory() as tmp:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("mlflow_model.py")),  # models from code
                artifacts={"model": str(model_dir)},
                # the runtime's own code goes with the model, so `mlflow models serve` runs in
                # a fresh environment that has only these requirements (tierpick is not on PyPI)
                code_paths=[str(runtime_code(Path(tmp)))],
                pip_requirements=RUNTIME_REQUIREMENTS,
                registered_model_name=registered_name,
            )
        version = str(info.registered_model_version)
        for key, value in (compared if compared is not None else metrics).items():
            if key in COMPARED:
                client.set_model_version_tag(registered_name, version, key, str(value))
        client.set_model_version_tag(registered_name, version, "run_id", run.info.run_id)
        client.set_registered_model_alias(registered_name, "challenger", version)
        return run.info.run_id, version


def promote(
    client: Any, name: str, version: str | None = None, force: bool = False
) -> tuple[bool, str]:
    """Move ``champion`` to ``version`` (default: the ``challenger``) when its evaluation is not
    worse than the current champion's on the primary metric, or when forced.

    Returns:
        (the version asked for is the champion now, a comparison table as text).
    """
    from tierpick.classifier.table import format_table

    try:
        cand = (
            client.get_model_version(name, version)
            if version
            else client.get_model_version_by_alias(name, "challenger")
        )
    except Exception as exc:
        raise TierpickError(
            f"model {name!r}: no version {version or '@challenger'}: {exc}"
        ) from exc
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except Exception:
        champ = None
    rows = []
    for key in COMPARED:
        new = _tag_float(cand.tags, key)
        old = _tag_float(champ.tags, key) if champ else None
        rows.append([key, old, new, None if new is None or old is None else new - old])
    table = format_table(
        [
            "metric",
            f"champion v{champ.version}" if champ else "champion (none)",
            f"candidate v{cand.version}",
            "change",
        ],
        rows,
    )
    new_p = _tag_float(cand.tags, PRIMARY_METRIC)
    old_p = _tag_float(champ.tags, PRIMARY_METRIC) if champ else None
    ok = champ is None or (new_p is not None and (old_p is None or new_p >= old_p - 1e-12))
    if champ is not None and champ.version == cand.version:
        # what was asked holds already: not a failure (a deploy script reruns promote)
        return True, table + f"\nversion {cand.version} is already the champion: nothing to do"
    if ok or force:
        client.set_registered_model_alias(name, "champion", cand.version)
        why = "forced" if force and not ok else "not worse on " + PRIMARY_METRIC
        return True, table + f"\npromoted version {cand.version} to champion ({why})"
    return False, table + (
        f"\nrefused: candidate {PRIMARY_METRIC} {new_p} is worse than the champion's {old_p} "
        "(use --force to promote anyway)"
    )


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None


OUTCOMES_TAG = "outcomes_sha256"  # a label run's outcomes (tierpick.serving.label.track)


def outcome_files_sha256(config: Any) -> list[str]:
    """The sha256 of every outcome file a tier config reads (how an adapt run finds the label
    runs that produced its outcomes)."""
    from tierpick.classifier.artifact import sha256_file
    from tierpick.training.ingest import expand

    digests = []
    for source in config.sources:
        path = config.resolve(source.path)
        try:
            files, _ = expand(path)
        except (OSError, TierpickError):  # reported by the ingest that read (or skipped) it
            continue
        digests += [sha256_file(f) for f in files if f.is_file()]
    return digests


def link_label_runs(
    client: Any, digests: list[str], run_id: str, version: str, name: str
) -> list[str]:
    """Tag each label run whose outcomes (``outcomes_sha256``) this adapt run read with the
    adapt run and the model version it produced, and the adapt run with those label runs;
    returns the label runs' ids."""
    if not digests:
        return []
    experiments = [e.experiment_id for e in client.search_experiments()]
    found: list[str] = []
    for digest in digests:
        runs = client.search_runs(experiments, filter_string=f"tags.{OUTCOMES_TAG} = '{digest}'")
        for r in runs:
            if r.info.run_id == run_id or r.info.run_id in found:
                continue
            found.append(r.info.run_id)
            client.set_tag(r.info.run_id, "adapt_run_id", run_id)
            client.set_tag(r.info.run_id, "adapted_model", f"{name}/{version}")
    if found:
        client.set_tag(run_id, "label_run_ids", ",".join(found))
    return found
