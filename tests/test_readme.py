"""The README's commands run as written on this checkout: ``make serve`` is started for real (it
sets up ``.venv-serve`` on first use) and every other shell and Python block of the page runs
against it. ``make test`` is the one command not run here: CI's ``.ci/run`` runs it (checked).
Every page the README points to exists. Slow: the first ``make serve`` installs the runtime."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(README.read_text()) if kind == lang]


def test_the_readme_points_at_pages_that_exist() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", README.read_text())
    assert len(links) >= 8
    missing = [link for link in links if not (REPO / link).exists()]
    assert not missing, missing


def test_the_two_commands_are_make_serve_and_make_test_which_ci_runs() -> None:
    first = [line.split("#")[0].strip() for line in blocks("sh")[0].splitlines()]
    assert [c for c in first if c] == ["make serve", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test\n" in ci


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_every_command_of_the_readme_runs_against_make_serve() -> None:
    if not _port_free(50051):
        pytest.skip("127.0.0.1:50051 is taken: make serve could not bind it")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "TIERPICK_MODEL")}
    server = subprocess.Popen(
        ["make", "serve"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert server.stdout is not None
        for line in server.stdout:
            seen.append(line)
            if "tierpick serving on 127.0.0.1:50051" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 900  # a first run installs the runtime venv
        while not ready.wait(1):
            assert server.poll() is None, "".join(seen[-30:])
            assert time.monotonic() < deadline, "".join(seen[-30:])
        shell = blocks("sh")[1:]
        assert shell, "the README has no command to try"
        for block in shell:
            run = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", block],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert run.returncode == 0, (block, run.stdout[-2000:], run.stderr[-2000:])
            assert run.stdout.strip(), block
        for block in blocks("python"):
            run = subprocess.run(
                [str(REPO / ".venv-serve" / "bin" / "python"), "-c", block],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert run.returncode == 0, (block, run.stderr[-2000:])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        assert server.stdout is not None
        server.stdout.close()


def test_docs_have_no_placeholders_that_do_not_run() -> None:
    """The placeholders a newcomer's walk-through tripped on: a folder that does not exist, a
    `<name>` a shell reads as a redirect, `[...]` in Python."""
    bad = re.compile(r"logs/last-week/|my-tiers\.yaml|= \[\.\.\.\]|^\S*tierpick .*<[a-z_-]+>", re.M)
    hits = [
        f"{page.name}: {m.group(0)}"
        for page in [README, *sorted((REPO / "docs").glob("*.md"))]
        for kind, body in FENCE.findall(page.read_text())
        for m in bad.finditer(body)
    ]
    assert not hits, hits
    assert Path(REPO / "docs").is_dir()
