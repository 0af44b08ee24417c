"""A real LiteLLM proxy process for the plug-in's end-to-end test and benchmark: a config with
a tierpick model group in front of one model group per tier, started with ``litellm --config``
on a loopback port."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tierpick.classifier.errors import MissingDependencyError, TierpickError
from tierpick.serving.harness.processes import log_tail, stop_process

PLUGIN = "tierpick.serving.litellm_plugin.plugin"
MASTER_KEY = "sk-tierpick-local"


def litellm_config(
    upstreams: Mapping[str, str],
    tierpick: Mapping[str, Any] | None,
    *,
    fallback_tier: str = "mid",
    virtual_model: str = "tierpick/auto",
    plugin_timeout_ms: int = 1000,
) -> dict[str, Any]:
    """A LiteLLM proxy config: model group ``<tier>-llm`` per tier (an OpenAI-compatible
    upstream at ``host:port``, asked for ``<tier>-model``) and, when ``tierpick`` settings are
    given, ``virtual_model`` routed by the plug-in (with them as the ``tierpick`` section)."""
    model_list: list[dict[str, Any]] = [
        {
            "model_name": f"{tier}-llm",
            "litellm_params": {
                "model": f"openai/{tier}-model",
                "api_base": f"http://{address}/v1",
                "api_key": "not-used",
            },
        }
        for tier, address in upstreams.items()
    ]
    cfg: dict[str, Any] = {
        "model_list": model_list,
        "general_settings": {"master_key": MASTER_KEY},
    }
    if tierpick is not None:
        model_list.insert(
            0,
            {
                "model_name": virtual_model,
                "litellm_params": {
                    "model": "auto_router/complexity_router",
                    "complexity_router_config": {
                        "classifier_type": "custom",
                        "classifier_plugin": PLUGIN,
                        "classifier_plugin_timeout_ms": plugin_timeout_ms,
                        "tiers": {tier: f"{tier}-llm" for tier in upstreams},
                        "fallback_tier": fallback_tier,
                    },
                },
            },
        )
        cfg["litellm_settings"] = {"callbacks": PLUGIN}
        cfg["tierpick"] = dict(tierpick)
    return cfg


def litellm_binary() -> str:
    path = shutil.which("litellm") or str(Path(sys.executable).with_name("litellm"))
    if not Path(path).exists():
        raise MissingDependencyError(
            "the LiteLLM proxy is not installed (pip install 'tierpick[litellm]')"
        )
    return path


class LiteLLMProxy:
    """``litellm --config`` on a loopback port, started from ``config`` and ready (its
    liveliness probe answers) when the constructor returns."""

    def __init__(self, config: Mapping[str, Any], port: int, timeout: float = 120.0) -> None:
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="tierpick-litellm-"))
        self.config_path = self.dir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
        self.log_path = self.dir / "proxy.log"
        env = {
            **os.environ,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download of the price map
            "LITELLM_LOG": "ERROR",
            "PYTHONUNBUFFERED": "1",
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    litellm_binary(),
                    "--config",
                    str(self.config_path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--num_workers",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise TierpickError(
                    f"the LiteLLM proxy exited ({self.proc.returncode}): {self.log_tail()}"
                )
            try:
                status, _, _ = self.request("GET", "/health/liveliness", None, timeout=2.0)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > end:
                self.close()
                raise TierpickError(f"the LiteLLM proxy did not start: {self.log_tail()}")
            time.sleep(0.25)

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        conn: http.client.HTTPConnection | None = None,
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        """One request: status, headers (lower-case names), the JSON answer."""
        own = conn is None
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            c.request(
                method,
                path,
                body=data,
                headers={
                    "content-type": "application/json",
                    "authorization": f"Bearer {MASTER_KEY}",
                    **(headers or {}),
                },
            )
            resp = c.getresponse()
            raw = resp.read()
            try:
                obj = json.loads(raw) if raw else {}
            except ValueError:
                obj = {"raw": raw.decode("utf-8", "replace")}
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, obj
        finally:
            if own:
                c.close()

    def chat(
        self, body: Mapping[str, Any], conn: http.client.HTTPConnection | None = None
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        return self.request("POST", "/v1/chat/completions", body, conn=conn)

    def log_tail(self, chars: int = 3000) -> str:
        return log_tail(self.log_path, chars)

    def close(self) -> None:
        stop_process(self.proc, 20)
        shutil.rmtree(self.dir, ignore_errors=True)
