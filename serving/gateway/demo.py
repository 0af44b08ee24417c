"""Fake OpenAI-compatible upstreams that answer as their tier (``tierpick gateway
demo-upstreams``, the demo stack, the end-to-end tests): for trying a gateway without models."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tierpick.classifier.errors import TierpickError


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
