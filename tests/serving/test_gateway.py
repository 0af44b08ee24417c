"""The Envoy gateway end to end: a real Envoy process, the ext_proc processor on a real port,
three OpenAI-compatible upstreams (one per tier) on loopback; nothing else is touched."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("envoy.service.ext_proc.v3", reason="the gateway extra is not installed")
from tests.conftest import DATA, REPO
from tierpick import classifier
from tierpick.classifier.errors import ConfigError
from tierpick.cli import main
from tierpick.serving.gateway import (
    GatewayConfig,
    create_gateway,
    parse_gateway_config,
    render_envoy_config,
)
from tierpick.serving.gateway.demo import Upstream
from tierpick.serving.harness.envoy import Envoy, envoy_binary
from tierpick.serving.harness.processes import free_port
from tierpick.serving.lifecycle import GrpcApp

pytestmark = pytest.mark.slow  # a real Envoy process
TIERS = ("local", "mid", "frontier")
DEPLOY = REPO / "serving" / "deploy"


def _config(upstreams: dict[str, Upstream], processor_port: int, **over: Any) -> GatewayConfig:
    raw: dict[str, Any] = {
        "processor": {"port": processor_port},
        "tiers": {t: {"upstream": u.address, "model": f"{t}-model"} for t, u in upstreams.items()},
        "envoy": {"listen_port": free_port(), "admin_port": free_port()},
        # the policy-header tests need the grant (off by default: test_gateway_processor.py)
        "request_policy": {"enabled": True},
    }
    raw.update(over)
    return parse_gateway_config(raw)


@dataclass
class Stack:
    cfg: GatewayConfig
    upstreams: dict[str, Upstream]
    envoy: Envoy
    gateway: GrpcApp | None

    def post(
        self,
        body: bytes | str,
        headers: dict[str, str] | None = None,
        path: str = "/v1/chat/completions",
    ) -> tuple[int, dict[str, str], dict[str, Any] | bytes, float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.cfg.envoy.listen_port, timeout=30)
        t0 = time.perf_counter()
        conn.request(
            "POST", path, body=body, headers={"content-type": "application/json", **(headers or {})}
        )
        resp = conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter() - t0
        conn.close()
        try:
            parsed: dict[str, Any] | bytes = json.loads(data)
        except ValueError:
            parsed = data
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed, elapsed


def _chat(prompt: str, **extra: Any) -> str:
    return json.dumps({"model": "auto", "messages": [{"role": "user", "content": prompt}], **extra})


@pytest.fixture(scope="module")
def stack(upstreams: dict[str, Upstream]) -> Iterator[Stack]:
    cfg = _config(upstreams, free_port())
    gw = create_gateway(cfg)
    env = Envoy(render_envoy_config(cfg), cfg.envoy.admin_port)
    stack = Stack(cfg, upstreams, env, gw)
    yield stack
    env.close()
    if stack.gateway is not None:  # a test may have replaced it
        stack.gateway.shutdown(0)


POLICIES: list[tuple[dict[str, str], classifier.RoutingPolicy]] = [
    ({}, classifier.RoutingPolicy()),  # the model's default
    ({"x-tierpick-cost-weight": "1.0"}, classifier.RoutingPolicy(cost_weight=1.0)),  # thrifty
    ({"x-tierpick-cost-weight": "0"}, classifier.RoutingPolicy(cost_weight=0.0)),  # best p
]


def _cases(
    clf: classifier.TierClassifier, tiny_data: Path
) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """Real prompts (arena-hard, an MMLU-Pro sample) with a policy header, grouped by the tier
    the model picks for them directly under that policy, up to 8 per tier."""
    with (DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl").open() as fh:
        prompts = [json.loads(x)["prompt"] for x in fh]
    prompts += [json.loads(x)["prompt"] for x in tiny_data.read_text().splitlines()]
    out: dict[str, list[tuple[str, dict[str, str]]]] = {t: [] for t in TIERS}
    for headers, policy in POLICIES:
        for p, d in zip(prompts, clf.route(prompts, policy), strict=True):
            if len(out[d.tier]) < 8:
                out[d.tier].append((p, headers))
    return out


def test_requests_reach_the_tier_tierpick_chose(stack: Stack, tiny_data: Path) -> None:
    clf = stack.gateway.holder.current  # type: ignore[union-attr]
    cases = _cases(clf, tiny_data)
    assert all(len(cases[t]) == 8 for t in TIERS), {t: len(v) for t, v in cases.items()}
    sent = misrouted = 0
    for tier, items in cases.items():
        for p, policy_headers in items:
            status, headers, body, _ = stack.post(_chat(p, temperature=0.2), policy_headers)
            sent += 1
            assert status == 200 and isinstance(body, dict)
            if body["upstream"] != tier:
                misrouted += 1
            # the decision travels to the upstream and back to the client
            got = body["tierpick_headers"]
            assert got["x-tierpick-tier"] == headers["x-tierpick-tier"] == tier
            assert got["x-tierpick-status"] == "classified"
            assert got["x-tierpick-model-version"] == clf.version
            probs = dict(kv.split("=") for kv in got["x-tierpick-probabilities"].split(","))
            assert list(probs) == list(TIERS)
            # the body: model rewritten, everything else intact, content-length right
            assert body["model"] == f"{tier}-model"
            forwarded = json.loads(body["body"])
            assert forwarded["messages"][0]["content"] == p and forwarded["temperature"] == 0.2
            assert body["body_bytes"] == len(body["body"].encode("utf-8"))
    assert misrouted == 0 and sent == 3 * 8

    # completions-style bodies are classified too
    p, policy_headers = cases["local"][0]
    status, _, body, _ = stack.post(
        json.dumps({"model": "auto", "prompt": p}), policy_headers, path="/v1/completions"
    )
    assert status == 200 and body["upstream"] == "local"  # type: ignore[index]


def test_per_request_policy_headers(stack: Stack) -> None:
    hard = "Write a lock-free MPMC queue in C++20 and prove it linearizable."
    _, _, body, _ = stack.post(_chat(hard), {"x-tierpick-allowed-tiers": "local"})
    assert body["upstream"] == "local"  # type: ignore[index]
    # threshold rule: no tier reaches 0.999, so the dearest allowed tier
    _, _, body, _ = stack.post(
        _chat(hard), {"x-tierpick-min-success": "0.999", "x-tierpick-allowed-tiers": "local,mid"}
    )
    assert body["upstream"] == "mid"  # type: ignore[index]
    for header, value in [
        ("x-tierpick-min-success", "abc"),
        ("x-tierpick-min-success", "1.5"),
        ("x-tierpick-allowed-tiers", "premium"),
    ]:
        status, headers, err, _ = stack.post(_chat(hard), {header: value})
        assert status == 400 and headers["x-tierpick-status"] == "rejected"
        assert err["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_bad_bodies_pass_through_untouched_and_clients_cannot_pick_a_tier(stack: Stack) -> None:
    fallback_model = stack.cfg.tiers[stack.cfg.fallback_tier].model
    for raw, reason in [
        (b"not json at all", "body is not JSON"),
        (b'["a", "list"]', "body is not a JSON object"),
        (b'{"messages": [{"role": "system", "content": "x"}]}', "no user message"),
        (b'{"model": "auto"}', "no messages or prompt"),
    ]:
        status, _, body, _ = stack.post(raw)
        assert status == 200 and isinstance(body, dict)
        # untouched, but for a virtual model name: the fallback tier's upstream gets its model
        expected = raw.replace(b'"auto"', f'"{fallback_model}"'.encode())
        assert body["body"].encode() == expected
        assert body["tierpick_headers"]["x-tierpick-status"] == "not-classified"
        assert reason in body["tierpick_headers"]["x-tierpick-reason"]
        assert body["upstream"] == stack.cfg.fallback_tier
    # a model of the client's own that no tier serves: to the fallback route, body untouched
    raw_own = json.dumps({"model": "someone-elses-model", "prompt": "hi"}).encode()
    status, _, body, _ = stack.post(raw_own)
    assert status == 200 and isinstance(body, dict) and body["body"].encode() == raw_own
    assert body["tierpick_headers"]["x-tierpick-status"] == "passthrough"
    assert body["upstream"] == stack.cfg.fallback_tier
    # a client's own decision header is stripped before the processor and the routes see it
    clf = stack.gateway.holder.current  # type: ignore[union-attr]
    prompt = "What is 2 + 2?"
    chosen = clf.route([prompt])[0].tier
    forced = next(t for t in TIERS if t != chosen)
    _, _, body, _ = stack.post(_chat(prompt), {"x-tierpick-tier": forced, "x-tierpick-status": "x"})
    assert body["upstream"] == chosen  # type: ignore[index]
    assert body["tierpick_headers"]["x-tierpick-status"] == "classified"  # type: ignore[index]


def test_hostile_bodies_are_bounded_and_never_starve_small_requests(stack: Stack) -> None:
    """A deeply nested body is not-classified (it once raised RecursionError in the processor);
    a body over processor.max_body_bytes passes through unclassified; four ~900 KB bodies sent
    at once do not push small requests past the time budget into fallback."""
    from concurrent.futures import ThreadPoolExecutor

    gw = stack.gateway
    assert gw is not None
    deep = b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, _, body, _ = stack.post(deep)
    assert status == 200 and isinstance(body, dict)
    assert body["tierpick_headers"]["x-tierpick-status"] == "not-classified"
    assert "nested too deeply" in body["tierpick_headers"]["x-tierpick-reason"]
    junk = _chat("\u200b\u200c\x00 \ufeff")  # nothing left once normalized
    _, _, body, _ = stack.post(junk)
    assert body["tierpick_headers"]["x-tierpick-status"] == "not-classified"  # type: ignore[index]

    history = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "lorem ipsum dolor " * 60}
        for i in range(820)
    ]
    big = json.dumps({"model": "auto", "messages": [*history, {"role": "user", "content": "hi"}]})
    assert 850_000 < len(big) < 1_000_000  # under Envoy's 1 MiB buffer, over the processor's cap
    small = [_chat(f"What is {i} + {i}?") for i in range(98)]
    with ThreadPoolExecutor(8) as pool:
        bigs = [pool.submit(stack.post, big) for _ in range(4)]
        smalls = list(pool.map(stack.post, small))
        big_results = [f.result() for f in bigs]
    assert [r[1]["x-tierpick-status"] for r in smalls] == ["classified"] * 98
    for status, headers, body, _ in big_results:
        assert status == 200 and headers["x-tierpick-status"] == "not-classified"
        seen = body["tierpick_headers"]  # type: ignore[index]
        assert "over processor.max_body_bytes" in seen["x-tierpick-reason"]
        assert body["upstream"] == stack.cfg.fallback_tier  # type: ignore[index]
    from prometheus_client import generate_latest

    text = generate_latest(gw.metrics.registry).decode()
    assert 'tierpick_gateway_requests_total{outcome="not-classified"}' in text


def test_fallback_while_the_processor_is_stopped(stack: Stack) -> None:
    """Fail-open: with the processor gone, requests still flow, to the fallback tier, marked
    and counted by Envoy; once it is back, requests are classified again."""
    assert stack.gateway is not None
    stack.gateway.shutdown(0)
    before = stack.envoy.stat("http.tierpick_gateway.ext_proc.tierpick.failure_mode_allowed")
    fallback_model = stack.cfg.tiers[stack.cfg.fallback_tier].model
    for _ in range(5):
        status, headers, body, _ = stack.post(_chat("Explain quicksort."))
        assert status == 200 and body["upstream"] == stack.cfg.fallback_tier  # type: ignore[index]
        assert headers["x-tierpick-status"] == "fallback"
        # the upstream gets the fallback tier's model, not the virtual name (Envoy's Lua filter)
        assert body["model"] == fallback_model  # type: ignore[index]
        assert json.loads(body["body"])["model"] == fallback_model  # type: ignore[index]
    after = stack.envoy.stat("http.tierpick_gateway.ext_proc.tierpick.failure_mode_allowed")
    assert after - before == 5
    stack.gateway = create_gateway(stack.cfg)  # same port: Envoy reconnects
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, headers, _, _ = stack.post(_chat("Explain quicksort."))
        if headers["x-tierpick-status"] == "classified":
            break
        time.sleep(0.1)
    assert headers["x-tierpick-status"] == "classified"


def test_a_hung_classifier_falls_back_within_its_budget(upstreams: dict[str, Upstream]) -> None:
    """A processor that accepts connections and never answers: Envoy gives up after the time
    budget (message_timeout) and the request goes to the fallback tier."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        cfg = _config(
            upstreams,
            silent.getsockname()[1],
            failure={"mode": "open", "fallback_tier": "mid", "timeout_ms": 300},
        )
        env = Envoy(render_envoy_config(cfg), cfg.envoy.admin_port)
        try:
            stack = Stack(cfg, upstreams, env, None)
            status, headers, body, elapsed = stack.post(_chat("hello"))
            assert status == 200 and body["upstream"] == "mid"  # type: ignore[index]
            assert headers["x-tierpick-status"] == "fallback"
            # waited for the budget, then gave up (upper bound generous for a loaded machine)
            assert 0.25 <= elapsed < 0.3 + 5.0
            assert env.stat("http.tierpick_gateway.ext_proc.tierpick.message_timeouts") == 1
        finally:
            env.close()


def test_fail_closed_rejects_when_the_classifier_is_down(upstreams: dict[str, Upstream]) -> None:
    cfg = _config(upstreams, free_port(), failure={"mode": "closed"})  # nothing listens there
    env = Envoy(render_envoy_config(cfg), cfg.envoy.admin_port)
    try:
        before = {t: u.requests for t, u in upstreams.items()}
        status, _, _, _ = Stack(cfg, upstreams, env, None).post(_chat("hello"))
        assert status == 503
        assert {t: u.requests for t, u in upstreams.items()} == before  # no upstream reached
    finally:
        env.close()


def test_config_validation_names_the_key(upstreams: dict[str, Upstream]) -> None:
    base = {"tiers": {t: {"upstream": u.address} for t, u in upstreams.items()}}
    cases = [
        ({"tiers": {}}, "tiers"),
        ({"tiers": {"local": {"upstream": "nohost"}}}, "tiers.local.upstream"),
        ({**base, "failure": {"mode": "sometimes"}}, "failure.mode"),
        ({**base, "failure": {"fallback_tier": "premium"}}, "failure.fallback_tier"),
        ({**base, "policy": {"min_success": 2}}, "policy.min_success"),
        ({**base, "processor": {"port": 70000}}, "processor.port"),
        ({**base, "envoy": {"listen": 1}}, "envoy: unknown key"),
        ({**base, "extra": 1}, "unknown key"),
    ]
    for raw, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_gateway_config(raw)
    # the model's tiers must match the config's
    wrong = parse_gateway_config(
        {
            "tiers": {"cheap": {"upstream": "127.0.0.1:1"}, "dear": {"upstream": "127.0.0.1:2"}},
            "processor": {"port": free_port()},
        }
    )
    with pytest.raises(ConfigError, match="!= the model's tiers"):
        create_gateway(wrong)


def test_shipped_example_is_current_and_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "envoy-config", "--config", str(DEPLOY / "gateway.yaml")]) == 0
    rendered = capsys.readouterr().out
    assert rendered == (DEPLOY / "envoy.yaml").read_text(), (
        "serving/deploy/envoy.yaml is stale: regenerate it with `tierpick gateway envoy-config`"
    )
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(DEPLOY / "envoy.yaml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_gateway_stubs_and_mlflow_coexist() -> None:
    """xds-protos ships an older copy of opentelemetry's protos than MLflow needs; the install
    (Makefile) restores opentelemetry-proto's. Both must import in one environment."""
    code = (
        "from envoy.service.ext_proc.v3 import external_processor_pb2_grpc\n"
        "from opentelemetry.proto.trace.v1.trace_pb2 import TracesData\n"
        "import mlflow.tracing\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_bodies_larger_than_envoys_default_buffer_reach_an_upstream(
    stack: Stack, upstreams: dict[str, Upstream]
) -> None:
    """Bodies of 1 MiB and more got HTTP 413 from Envoy (its default buffer), with or without
    the processor: now one over max_body_bytes goes on unclassified to the fallback route, and
    one under it is classified, whatever Envoy's default."""
    prompt = "Summarize the following text. " + "lorem ipsum " * 200_000  # ~2.4 MB
    status, _, body, _ = stack.post(_chat(prompt))
    assert status == 200 and isinstance(body, dict), (status, str(body)[:200])
    assert body["upstream"] == stack.cfg.fallback_tier
    assert body["tierpick_headers"]["x-tierpick-status"] in ("not-classified", "fallback")
    # a gateway that reads bodies up to 2 MiB classifies a 1.5 MB one
    big = _config(upstreams, free_port(), processor={"max_body_bytes": 2 << 20})
    gw = create_gateway(big)
    env = Envoy(render_envoy_config(big), big.envoy.admin_port)
    try:
        s = Stack(big, upstreams, env, gw)
        status, _, body, _ = s.post(_chat("Summarize: " + "lorem ipsum " * 125_000))
        assert status == 200 and isinstance(body, dict)
        assert body["tierpick_headers"]["x-tierpick-status"] == "classified"
    finally:
        env.close()
        gw.shutdown(0)
