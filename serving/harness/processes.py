"""Helpers for the harnesses' real processes: a free port, a stop, a log's tail."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A free loopback TCP port (free when asked; bind it soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(path: Path, chars: int) -> str:
    """The last ``chars`` characters of a process's log file ("" when there is none)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""
