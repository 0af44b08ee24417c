"""The ``tierpick`` command, in process and as the installed console script."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_CONFIG, REPO
from tierpick.cli import main


def _tiny_config(tmp_path: Path, data_dir: Path) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"""
name: tiny
data_root: {data_dir}
tiers:
  - {{name: local, price_input: 0, price_output: 0,
     models: [LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct, upstage/SOLAR-10.7B-Instruct-v1.0]}}
  - {{name: frontier, price_input: 5, price_output: 15, models: [gpt-4o]}}
sources: [lm-eval-samples]
"""
    )
    return cfg


def test_data_build_then_stats(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _tiny_config(tmp_path, data_dir)
    assert main(["data", "build", "--config", str(cfg), "--out", str(tmp_path / "ds")]) == 0
    built_out = capsys.readouterr().out
    assert "wrote 326 prompts" in built_out
    assert main(["data", "stats", str(tmp_path / "ds"), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "gpt-4o" in out and "winogrande" in out
    assert (tmp_path / "s.json").is_file()


def test_stats_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "stats"]) == 2
    assert "give either a dataset directory or --config" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path)]) == 2
    assert "is not a tierpick dataset directory" in capsys.readouterr().err
    assert (
        main(["data", "build", "--config", str(tmp_path / "no.yaml"), "--out", str(tmp_path)]) == 2
    )
    assert "cannot read config" in capsys.readouterr().err


def test_console_script_runs_default_stats(data_dir: Path) -> None:
    exe = shutil.which("tierpick", path=str(Path(sys.executable).parent))
    assert exe, "the tierpick console script is not installed"
    proc = subprocess.run(
        [exe, "data", "stats", "--config", str(DEFAULT_CONFIG), "--data-root", str(data_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "12032" in proc.stdout and "Per-tier labels" in proc.stdout
