"""The wheel, installed into a fresh virtual environment outside the checkout, on Python 3.11
and 3.13: the shipped model loads, `tierpick score` scores, `tierpick serve` answers a real
Classify call. Slow: it builds the wheel and installs the runtime's dependencies from PyPI."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DATA, REPO

pytestmark = pytest.mark.slow


def _python(version: str) -> str | None:
    """A working interpreter of ``version``: pyenv's own builds first, then PATH.

    A pyenv shim on PATH exists for every installed version but fails (exit 127) when that
    version is not the active one, so each candidate is run once and must report ``version``.
    """
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = sorted(glob.glob(str(pyenv / f"{version}.*" / "bin" / "python")), reverse=True)
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(on_path)
    for candidate in candidates:
        probe = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(REPO)],
        check=True,
        timeout=600,
    )
    (built,) = dist.glob("tierpick-*.whl")
    return built


@pytest.mark.parametrize("version", ["3.11", "3.13"])
def test_wheel_serves_without_the_checkout(wheel: Path, tmp_path: Path, version: str) -> None:
    python = _python(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_ = venv / "bin"
    subprocess.run(
        [str(bin_ / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        timeout=900,
    )
    work = tmp_path / "elsewhere"  # no checkout here, and none on the path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TIERPICK_MODEL")}
    code = (
        "import sys, tierpick\n"
        "clf = tierpick.load()\n"
        "print(clf.route(['What is 2 + 2?'])[0].tier)\n"
        "print(tierpick.__file__)\n"
        "assert 'torch' not in sys.modules\n"
    )
    out = subprocess.run(
        [str(bin_ / "python"), "-c", code],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    tier, where = out.stdout.split()
    assert tier in ("local", "mid", "frontier") and str(venv) in where and str(REPO) not in where

    log = work / "log.jsonl"
    rows = (DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl").read_text().splitlines()[:20]
    log.write_text("\n".join(rows) + "\n")
    scored = subprocess.run(
        [str(bin_ / "tierpick"), "score", "log.jsonl", "scored.jsonl", "--workers", "1"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert scored.returncode == 0, scored.stderr
    assert len((work / "scored.jsonl").read_text().splitlines()) == 20

    # what the wheel leaves out says so in one line: the harnesses (a checkout's), the extras
    for command, says in (
        (["bench"], "from a checkout"),
        (["promote", "--name", "x"], "tierpick[train]"),
    ):
        left_out = subprocess.run(
            [str(bin_ / "tierpick"), *command],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert left_out.returncode != 0 and says in left_out.stderr, left_out.stderr
        assert "Traceback" not in left_out.stderr and len(left_out.stderr.splitlines()) <= 2

    server = subprocess.Popen(
        [str(bin_ / "tierpick"), "serve", "--port", "0", "--watch", "0"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # "tierpick serving on 127.0.0.1:PORT (pid N)"
        assert "tierpick serving on" in line, line + server.stderr.read()
        port = int(line.split("127.0.0.1:")[1].split()[0])
        from tierpick.serving.client import TierpickClient

        with TierpickClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_ready()
            resp = client.classify("Prove that there are infinitely many primes.")
            assert resp.tier in ("local", "mid", "frontier")
            assert json.dumps([s.tier for s in resp.scores]) == '["local", "mid", "frontier"]'
    finally:
        server.terminate()
        deadline = time.monotonic() + 60
        while server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if server.poll() is None:
            server.kill()
        server.communicate()
