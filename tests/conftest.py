"""Shared fixtures. Tests read the real files in ../shared/data; nothing is copied into the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("TIERPICK_DATA_ROOT", REPO.parent / "shared" / "data")).resolve()
DEFAULT_CONFIG = REPO / "training" / "configs" / "default.yaml"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"shared eval data not found at {DATA} (set TIERPICK_DATA_ROOT)")
    return DATA


@pytest.fixture(scope="session")
def default_built(data_dir: Path):  # type: ignore[no-untyped-def]
    """The default config's dataset, built once per session (about 10 s)."""
    from tierpick.training.config import load_config
    from tierpick.training.dataset import build_dataset

    return build_dataset(load_config(DEFAULT_CONFIG, data_root=str(data_dir)))


# --------------------------------------------------------------------------- tiny training fixture

SCIENCE = {"biology", "chemistry", "physics", "math", "computer science", "engineering"}
TINY_MODELS = {
    "Meta-Llama-3_1-8B-Instruct": "local",
    "Mixtral-8x7B-Instruct-v0.1": "mid",
    "gemini-1.5-pro-002": "frontier",
}


def write_tiny_config(folder: Path, data_file: Path, seed: int = 0, holdout: bool = True) -> Path:
    """A config over a small derived sample of real MMLU-Pro outcomes, sized for seconds."""
    cfg = folder / f"tiny-{seed}.yaml"
    hold = ", holdout: {column: task, values: [law]}" if holdout else ""
    cfg.write_text(
        f"""
name: tiny
data_root: {data_file.parent}
tiers:
  - {{name: local, price_input: 0, price_output: 0, models: [Meta-Llama-3_1-8B-Instruct]}}
  - {{name: mid, price_input: 0.5, price_output: 1.5, models: [Mixtral-8x7B-Instruct-v0.1]}}
  - {{name: frontier, price_input: 5, price_output: 15, models: [gemini-1.5-pro-002]}}
sources: [{data_file.name}]
split: {{val_fraction: 0.2, test_fraction: 0.2{hold}}}
train:
  seed: {seed}
  model_name: tiny
  teacher: {{max_tokens: 32}}
  student: {{dim: 32, epochs: 3, vocab: seen, max_tokens: 64}}
  head: {{hidden: 16, epochs: 20, patience: 3}}
"""
    )
    return cfg


@pytest.fixture(scope="session")
def tiny_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every 30th MMLU-Pro question for three models, as a long-format JSONL (derived, not copied
    into the repo): ~400 prompts with real outcomes, in two sources (so two families: the
    science subjects and the rest)."""
    import json
    import zipfile

    out = tmp_path_factory.mktemp("tiny-data") / "tiny.jsonl"
    with out.open("w") as fh:
        for model in TINY_MODELS:
            path = data_dir / "mmlu-pro" / f"model_outputs_{model}_5shots.zip"
            with zipfile.ZipFile(path) as zf:
                rows = json.loads(zf.read(zf.namelist()[0]))
            for r in rows:
                if isinstance(r, dict) and int(r["question_id"]) % 30 == 0:
                    prompt = (
                        r["question"]
                        + "\n\n"
                        + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(r["options"]))
                    )
                    fh.write(
                        json.dumps(
                            {
                                "prompt": prompt,
                                "model": model,
                                "task": r["category"],
                                "source": "tiny-science"
                                if r["category"] in SCIENCE
                                else "tiny-other",
                                "score": float(r["pred"] is not None and r["pred"] == r["answer"]),
                            }
                        )
                        + "\n"
                    )
    return out


@pytest.fixture(scope="session")
def tiny_config(tiny_data: Path) -> Path:
    return write_tiny_config(tiny_data.parent, tiny_data)


@pytest.fixture(scope="session")
def tiny_trained(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One real (tiny) training run, without MLflow: the model directory and the result."""
    from tierpick.training.config import load_config
    from tierpick.training.pipeline import run_training

    root = tmp_path_factory.mktemp("tiny-train")
    return run_training(load_config(tiny_config), root / "model", root / "work")
