"""A real OpenAI-compatible HTTP server for ``tierpick label``'s tests, run as its own process:
``python -m tests.serving.fake_llm --port P --role tiers|judge --log FILE``.

- ``tiers``: answers every model as ``ANSWER by <model>: <prompt hash>``, with ``usage``. A
  prompt holding ``[[fail-429-twice]]`` gets HTTP 429 twice (per model) before its answer,
  ``[[fail-500]]`` always 500, ``[[bad-request]]`` a 400, ``[[slow]]`` waits past any
  client's time-out, ``[[no-usage]]`` an answer without ``usage``.
- ``judge``: grades such an answer deterministically (:func:`grade`) in MT-Bench's
  ``Rating: [[g]]`` format; a question holding ``[[judge-garbage]]`` gets prose without a grade.

With ``$FAKE_LLM_KEY`` set, a request without ``Authorization: Bearer $FAKE_LLM_KEY`` gets 401.
Every request is appended to ``--log`` (model, prompt hash, status), so a test can count what was
paid for; ``--delay`` seconds are spent on every answer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def grade(model: str, prompt_hash: str) -> int:
    """The judge's grade of ``model``'s answer to the prompt with this hash: the frontier model
    always 9, the mid model 9 on two prompts in three, the local model on one in three (else
    3-4): a pass at 8 follows the tiers' order."""
    h = int(prompt_hash, 16)
    if "frontier" in model:
        return 9
    if "mid" in model:
        return 9 if h % 3 != 0 else 4
    return 9 if h % 3 == 2 else 3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--role", choices=["tiers", "judge"], required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args()
    key = os.environ.get("FAKE_LLM_KEY")
    lock = threading.Lock()
    failures: Counter[tuple[str, str]] = Counter()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:
            pass

        def _send(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _record(self, model: str, h: str, status: int) -> None:
            with lock, open(args.log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"model": model, "prompt": h, "status": status}) + "\n")

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            if key and self.headers.get("authorization") != f"Bearer {key}":
                self._send(401, {"error": {"message": "invalid api key"}})
                return
            body = json.loads(raw)
            model = body["model"]
            text = body["messages"][-1]["content"]
            if args.role == "judge":
                self._judge(model, text)
            else:
                self._tier(model, text)

        def _tier(self, model: str, prompt: str) -> None:
            h = digest(prompt)
            if "[[fail-429-twice]]" in prompt:
                with lock:
                    failures[(model, h)] += 1
                    n = failures[(model, h)]
                if n <= 2:
                    self._record(model, h, 429)
                    self._send(429, {"error": {"message": "rate limited"}}, {"retry-after": "0"})
                    return
            if "[[fail-500]]" in prompt:
                self._record(model, h, 500)
                self._send(500, {"error": {"message": "upstream exploded"}})
                return
            if "[[bad-request]]" in prompt:
                self._record(model, h, 400)
                self._send(400, {"error": {"message": "context length exceeded"}})
                return
            if "[[slow]]" in prompt:
                time.sleep(30)
            time.sleep(args.delay)
            answer = f"ANSWER by {model}: {h}"
            out: dict[str, Any] = {
                "id": f"cmpl-{h}",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
            }
            if "[[no-usage]]" not in prompt:
                out["usage"] = {"prompt_tokens": len(prompt) // 4 + 1, "completion_tokens": 10}
            self._record(model, h, 200)
            self._send(200, out)

        def _judge(self, model: str, text: str) -> None:
            found = re.search(r"ANSWER by (\S+): ([0-9a-f]{8})", text)
            if "[[judge-garbage]]" in text or found is None:
                content = "The answer seems fine, but I will not give a number."
            else:
                g = grade(found.group(1), found.group(2))
                content = f"The assistant answered. Rating: [[{g}]]"
            self._record(model, digest(text), 200)
            self._send(
                200,
                {
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": len(text) // 4 + 1, "completion_tokens": 20},
                },
            )

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
