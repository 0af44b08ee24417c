"""The Dockerfile and the demo stack (compose.yaml): checked as files here, and built and run
when a container engine answers (none runs on this project's CI machines: those tests skip)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "compose.yaml"
CONFIGS = REPO / "serving" / "deploy" / "compose"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_every_service_of_the_stack_has_a_health_probe_and_the_image() -> None:
    services = _compose()["services"]
    assert set(services) == {"tierpick", "upstreams", "processor", "envoy", "litellm"}
    for name, svc in services.items():
        assert svc.get("build") == "." and svc.get("healthcheck", {}).get("test"), name
    for name, svc in services.items():  # a service waited for is one with a probe
        for dep, how in svc.get("depends_on", {}).items():
            assert dep in services and how == {"condition": "service_healthy"}, (name, dep)


def test_the_stacks_configs_parse_and_name_the_stacks_services() -> None:
    pytest.importorskip("envoy.service.ext_proc.v3", reason="the gateway extra is not installed")
    from tierpick.serving.gateway import load_gateway_config
    from tierpick.serving.gateway.envoy import render_envoy_config
    from tierpick.serving.litellm_plugin import parse_plugin_config

    services = set(_compose()["services"])
    gateway = load_gateway_config(CONFIGS / "gateway.yaml")
    assert gateway.processor.host == "processor"
    assert {up.host for up in gateway.tiers.values()} == {"upstreams"}
    assert "upstreams" in render_envoy_config(gateway)
    litellm = yaml.safe_load((CONFIGS / "litellm.yaml").read_text())
    plugin = parse_plugin_config(litellm["tierpick"])
    assert plugin.service is not None and plugin.service.split(":")[0] in services
    bases = {m["litellm_params"].get("api_base") for m in litellm["model_list"][1:]}
    assert {re.sub(r"https?://([^:/]+).*", r"\1", b) for b in bases} == {"upstreams"}
    # the probes ask for the ports the configs give
    text = COMPOSE.read_text()
    assert f"processor:{gateway.processor.port}" in text
    assert f"('upstreams', {max(up.port for up in gateway.tiers.values())})" in text


def test_the_image_copies_every_folder_the_wheel_is_built_from() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \1$", dockerfile, re.M))
    needed = {"tierpick", "classifier", "serving", "training", "models", "proto"}
    assert needed <= copied, needed - copied


def _engine() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    probe = subprocess.run([docker, "info"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
def test_the_demo_stack_routes_through_envoy_and_litellm() -> None:
    if not _engine():
        pytest.skip("no container engine answers here (docker info failed)")
    up = ["docker", "compose", "-f", str(COMPOSE), "up", "--build", "--wait", "--wait-timeout"]
    subprocess.run([*up, "600"], cwd=REPO, check=True, timeout=1800)
    try:
        for port, extra in ((8080, {}), (4000, {"authorization": "Bearer sk-change-me"})):
            body = json.dumps(
                {"model": "tierpick/auto", "messages": [{"role": "user", "content": "hi"}]}
            ).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=body,
                headers={"content-type": "application/json", **extra},
            )
            for attempt in range(10):
                try:
                    with urllib.request.urlopen(request, timeout=30) as resp:
                        assert resp.status == 200
                        answer = json.loads(resp.read())  # a demo upstream answers as its tier
                        assert answer["choices"][0]["message"]["content"], answer
                        break
                except OSError:
                    if attempt == 9:
                        raise
                    time.sleep(3)
    finally:
        subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE), "down", "-v"], cwd=REPO, timeout=300
        )
