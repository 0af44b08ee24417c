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
    from training.config import load_config
    from training.dataset import build_dataset

    return build_dataset(load_config(DEFAULT_CONFIG, data_root=str(data_dir)))
