"""The gateway's ext_proc processor on real ext_proc messages and the shipped model, without
Envoy (the end-to-end path through a real Envoy is tests/serving/test_gateway.py): who may set
a per-request policy, and which requests are routed at all."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("envoy.service.ext_proc.v3", reason="the gateway extra is not installed")
from tests.serving.conftest import FOLLOW_UP_CHAT
from tierpick.classifier.errors import ConfigError
from tierpick.serving.gateway import parse_gateway_config
from tierpick.serving.gateway.processor import (
    OUTCOMES,
    POLICY_HEADERS,
    GatewayMetrics,
    TierpickProcessor,
)
from tierpick.serving.lifecycle import ModelHolder

TIERS = ("local", "mid", "frontier")
HARD = "Write a lock-free MPMC queue in C++20 and prove it linearizable."


def _processor(**over: Any) -> TierpickProcessor:
    raw = {
        "tiers": {
            t: {"upstream": f"127.0.0.1:{9000 + i}", "model": f"{t}-model"}
            for i, t in enumerate(TIERS)
        },
        **over,
    }
    cfg = parse_gateway_config(raw)
    metrics = GatewayMetrics()
    return TierpickProcessor(cfg, ModelHolder(None, metrics), metrics)


def _send(
    proc: TierpickProcessor, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes | None]:
    """(HTTP status if rejected else 200, the x-tierpick-* headers set, the new body if any)."""
    ep, base = proc.ep, proc.base
    seen: dict[str, str] = {}
    values = [base.HeaderValue(key=k, raw_value=v.encode()) for k, v in (headers or {}).items()]
    proc.respond(
        ep.ProcessingRequest(
            request_headers=ep.HttpHeaders(headers=base.HeaderMap(headers=values))
        ),
        seen,
    )
    resp = proc.respond(
        ep.ProcessingRequest(
            request_body=ep.HttpBody(body=json.dumps(body).encode(), end_of_stream=True)
        ),
        seen,
    )
    if resp.HasField("immediate_response"):
        imm = resp.immediate_response
        got = {h.header.key: h.header.raw_value.decode() for h in imm.headers.set_headers}
        return int(imm.status.code), got, imm.body
    common = resp.request_body.response
    got = {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
    new = common.body_mutation.body if common.HasField("body_mutation") else None
    return 200, got, new


def _chat(prompt: str, model: str | None = "tierpick/auto") -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    if model is not None:
        body["model"] = model
    return body


def _count(proc: TierpickProcessor, name: str, **labels: str) -> float:
    value = proc.metrics.registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def test_policy_headers_are_ignored_unless_granted_and_counted() -> None:
    proc = _processor()  # request_policy not granted: the default
    clf = proc.holder.current
    chosen = clf.route([HARD])[0].tier
    assert chosen != "local"
    status, got, _ = _send(proc, _chat(HARD), {"x-tierpick-allowed-tiers": "local"})
    assert status == 200 and got["x-tierpick-tier"] == chosen  # the client cannot pick a tier
    assert "x-tierpick-allowed-tiers ignored: not granted" in got["x-tierpick-reason"]
    labels = {"header": "allowed-tiers", "outcome": "ignored"}
    assert _count(proc, "tierpick_gateway_policy_headers_total", **labels) == 1
    # every series exists from the start, at 0
    for outcome in OUTCOMES:
        assert _count(proc, "tierpick_gateway_requests_total", outcome=outcome) >= 0
    for header in POLICY_HEADERS:
        assert (
            _count(proc, "tierpick_gateway_policy_headers_total", header=header, outcome="applied")
            == 0
        )


def test_a_grant_limits_which_headers_and_which_tiers() -> None:
    proc = _processor(
        request_policy={
            "enabled": True,
            "headers": ["allowed-tiers", "min-success"],
            "tiers": ["local", "mid"],
        }
    )
    # granted and within the granted tiers: applied
    status, got, _ = _send(proc, _chat(HARD), {"x-tierpick-allowed-tiers": "local"})
    assert status == 200 and got["x-tierpick-tier"] == "local"
    # a threshold no tier reaches goes to the dearest tier the grant allows, never frontier
    status, got, _ = _send(proc, _chat(HARD), {"x-tierpick-min-success": "0.999"})
    assert got["x-tierpick-tier"] == "mid"
    # asking for a tier outside the grant: 400 naming it, counted
    status, got, body = _send(proc, _chat(HARD), {"x-tierpick-allowed-tiers": "frontier"})
    assert (
        status == 400
        and "['frontier'] not granted" in json.loads(body or b"{}")["error"]["message"]
    )
    assert (
        _count(
            proc,
            "tierpick_gateway_policy_headers_total",
            header="allowed-tiers",
            outcome="rejected",
        )
        == 1
    )
    # a header the grant does not list is ignored
    status, got, _ = _send(proc, _chat(HARD), {"x-tierpick-cost-weight": "0"})
    assert "x-tierpick-cost-weight ignored" in got["x-tierpick-reason"]
    assert (
        _count(
            proc, "tierpick_gateway_policy_headers_total", header="min-success", outcome="applied"
        )
        == 1
    )


def test_explicit_models_pass_through_untouched() -> None:
    # a tier's model goes to that tier when the request is granted the tier (the contract:
    # no client reaches a tier by naming its model unless granted, tested below)
    proc = _processor(request_policy={"enabled": True})
    # a virtual model (or none): classified, and the model rewritten to the tier's
    for model in ("tierpick/auto", "auto", None):
        status, got, new = _send(proc, _chat("What is 2+2?", model))
        assert got["x-tierpick-status"] == "classified"
        assert json.loads(new or b"{}")["model"] == f"{got['x-tierpick-tier']}-model"
    # a tier's own model: sent to that tier, body untouched
    status, got, new = _send(proc, _chat(HARD, "local-model"))
    assert (got["x-tierpick-status"], got["x-tierpick-tier"], new) == (
        "explicit-model",
        "local",
        None,
    )
    # any other model: untouched, to the fallback route, said so
    status, got, new = _send(proc, _chat(HARD, "gemini-1.5-pro"))
    assert status == 200
    assert (
        got["x-tierpick-status"] == "passthrough" and "x-tierpick-tier" not in got and new is None
    )
    assert "'gemini-1.5-pro' is not a tierpick virtual model" in got["x-tierpick-reason"]
    assert _count(proc, "tierpick_gateway_requests_total", outcome="passthrough") == 1
    assert _count(proc, "tierpick_gateway_requests_total", outcome="explicit-model") == 1
    # the virtual names are configurable
    proc = _processor(virtual_models=["router"])
    _, got, _ = _send(proc, _chat("What is 2+2?", "auto"))
    assert got["x-tierpick-status"] == "passthrough"


def test_grant_and_virtual_model_config_errors_name_the_key() -> None:
    for over, key in [
        ({"request_policy": {"enabled": "yes"}}, "request_policy.enabled"),
        ({"request_policy": {"headers": ["x-forwarded-for"]}}, "request_policy.headers"),
        ({"request_policy": {"tiers": ["premium"]}}, "request_policy.tiers"),
        ({"request_policy": {"keys": []}}, "request_policy: unknown key"),
        ({"request_policy": {"api_keys": [{"sha256": "abc"}]}}, "api_keys[0].sha256"),
        (
            {"request_policy": {"api_keys": [{"sha256": "0" * 64, "tiers": ["gold"]}]}},
            "request_policy.api_keys[0].tiers",
        ),
        ({"virtual_models": "auto"}, "virtual_models"),
    ]:
        with pytest.raises(ConfigError) as err:
            _processor(**over)
        assert key in str(err.value), over


def test_every_dashboard_query_names_a_metric_the_servers_export() -> None:
    import re

    from prometheus_client import generate_latest

    from tests.conftest import REPO
    from tierpick.serving.lifecycle import Metrics

    exported: set[str] = set()
    from tierpick.serving.service import SERVICE_NAME

    service = Metrics()
    service.track((SERVICE_NAME,))  # as the service's start does: every method's series
    ModelHolder(None, service)  # publishes the model info and the tiers' series
    for registry in (service.registry, _processor().metrics.registry):
        for line in generate_latest(registry).decode().splitlines():
            if line and not line.startswith("#"):
                exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    dashboard = json.loads((REPO / "serving" / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 9
    import yaml

    alerts = yaml.safe_load((REPO / "serving" / "deploy" / "alerts.yaml").read_text())
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    assert {"TierpickPromptDrift", "TierpickTierMixShift"} <= {r["alert"] for r in rules}
    exprs += [r["expr"].replace(" offset 1d", "") for r in rules]
    # metric names, with label matchers and `by (...)` lists taken out first
    bare = [re.sub(r"by \([^)]*\)", "", re.sub(r"\{[^}]*\}", "", e)) for e in exprs]
    named = {m for e in bare for m in re.findall(r"\b((?:tierpick|grpc|process)_[a-z_]+)\b", e)}
    assert named and not named - exported, sorted(named - exported)


def test_demo_upstreams_answer_on_each_tiers_address(tmp_path: Any) -> None:
    import http.client
    import signal
    import subprocess
    import sys

    from tierpick.serving.harness.processes import free_port

    ports = {t: free_port() for t in TIERS}
    config = tmp_path / "gateway.yaml"
    tiers = "".join(f"  {t}: {{upstream: '127.0.0.1:{p}'}}\n" for t, p in ports.items())
    config.write_text("tiers:\n" + tiers)
    cmd = [sys.executable, "-m", "tierpick.cli", "gateway", "demo-upstreams"]
    with subprocess.Popen(
        [*cmd, "--config", str(config)], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            lines = "".join(proc.stdout.readline() for _ in TIERS)
            assert all(f"demo upstream {t} on 127.0.0.1:{ports[t]}" in lines for t in TIERS)
            for tier, port in ports.items():
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "m"}))
                answer = json.loads(conn.getresponse().read())
                assert answer["upstream"] == tier and answer["model"] == "m"
                conn.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            proc.kill()


def test_a_grant_per_api_key() -> None:
    """An API key listed under request_policy.api_keys (by its sha256) gets its own grant; other
    keys, and requests without one, get the gateway's (here: none)."""
    import hashlib

    team = "sk-team-a-0123456789"
    proc = _processor(
        request_policy={
            "api_keys": [
                {
                    "sha256": hashlib.sha256(team.encode()).hexdigest(),
                    "headers": ["allowed-tiers"],
                    "tiers": ["local", "mid"],
                }
            ]
        }
    )
    chosen = proc.holder.current.route([HARD])[0].tier
    assert chosen != "local"
    ask = {"x-tierpick-allowed-tiers": "local"}
    _, got, _ = _send(proc, _chat(HARD), {**ask, "authorization": f"Bearer {team}"})
    assert got["x-tierpick-tier"] == "local" and "x-tierpick-reason" not in got
    for other in ({"authorization": "Bearer sk-someone-else"}, {}):
        _, got, _ = _send(proc, _chat(HARD), {**ask, **other})
        assert got["x-tierpick-tier"] == chosen and "not granted" in got["x-tierpick-reason"]
    # the key's grant holds it to its tiers, and to its headers
    status, _, body = _send(
        proc,
        _chat(HARD),
        {"x-tierpick-allowed-tiers": "frontier", "authorization": f"Bearer {team}"},
    )
    assert status == 400 and "not granted" in json.loads(body or b"{}")["error"]["message"]
    _, got, _ = _send(
        proc, _chat(HARD), {"x-tierpick-cost-weight": "0", "authorization": f"Bearer {team}"}
    )
    assert "x-tierpick-cost-weight ignored" in got["x-tierpick-reason"]


def test_no_client_reaches_a_tier_it_is_not_granted_by_naming_its_model() -> None:
    proc = _processor()  # nothing granted: the shipped settings
    assert proc.cfg.fallback_tier == "mid"  # the default: below the dearest tier
    chosen = proc.holder.current.route(["What is 2+2?"])[0].tier
    _, got, new = _send(proc, _chat("What is 2+2?", "frontier-model"))
    assert got["x-tierpick-status"] == "classified" and got["x-tierpick-tier"] == chosen
    assert json.loads(new or b"{}")["model"] == f"{chosen}-model"
    assert "is a tier's: routed by tierpick, not granted" in got["x-tierpick-reason"]
    # granted the cheaper tiers only: naming the frontier model is still tierpick's call
    proc = _processor(request_policy={"enabled": True, "tiers": ["local", "mid"]})
    _, got, _ = _send(proc, _chat("What is 2+2?", "frontier-model"))
    assert got["x-tierpick-status"] == "classified"
    _, got, _ = _send(proc, _chat(HARD, "local-model"))
    assert (got["x-tierpick-status"], got["x-tierpick-tier"]) == ("explicit-model", "local")


def test_virtual_model_names_match_without_case_or_spaces() -> None:
    proc = _processor()
    for model in ("AUTO", " auto", "Tierpick/Auto "):
        _, got, _ = _send(proc, _chat("What is 2+2?", model))
        assert got["x-tierpick-status"] == "classified", model


def test_the_decision_headers_say_why() -> None:
    proc = _processor()
    _, got, _ = _send(proc, _chat("What is 2+2?"))
    assert got["x-tierpick-basis"].startswith("utility; cost_weight=0.135")
    assert got["x-tierpick-basis"].endswith("prompt_cut=no")
    assert [u.split("=")[0] for u in got["x-tierpick-utilities"].split(",")] == list(TIERS)


def test_the_gateway_server_limits_counts_and_reflects_like_the_service() -> None:
    """The lifecycle's call guard and metrics serve every gRPC app: the ext_proc streams are
    counted under grpc_server_*, held to max_concurrency, and listed by reflection v1."""
    import threading
    from collections.abc import Iterator

    import grpc
    from grpc_reflection.v1alpha import reflection_pb2 as r

    from tierpick.serving.gateway import create_gateway
    from tierpick.serving.lifecycle import ServerConfig

    proc = _processor()
    app = create_gateway(proc.cfg, "127.0.0.1:0", ServerConfig(max_concurrency=1, watch_seconds=0))
    # the gateway says which policy is active, as the service does (metric and start-up log)
    info = next(m for m in app.metrics.registry.collect() if m.name == "tierpick_policy")
    assert info.samples[0].labels["policy"].startswith("utility rule, cost_weight ")
    ep, base = proc.ep, proc.base
    service = "envoy.service.ext_proc.v3.ExternalProcessor"
    key = {"grpc_type": "bidi_stream", "grpc_service": service, "grpc_method": "Process"}
    body = json.dumps(_chat(HARD)).encode()
    headers = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=base.HeaderMap(headers=[]))
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            process = channel.stream_stream(
                f"/{service}/Process",
                request_serializer=ep.ProcessingRequest.SerializeToString,
                response_deserializer=ep.ProcessingResponse.FromString,
            )
            answers = list(
                process(
                    iter(
                        [
                            headers,
                            ep.ProcessingRequest(
                                request_body=ep.HttpBody(body=body, end_of_stream=True)
                            ),
                        ]
                    ),
                    timeout=10,
                )
            )
            assert answers[1].request_body.response.body_mutation.body  # routed: model rewritten
            # one stream held open (its headers sent, no body yet) takes the only slot
            release = threading.Event()

            def headers_then_wait() -> Iterator[Any]:
                yield headers
                release.wait(10)

            held = process(headers_then_wait(), timeout=10)
            assert next(held).HasField("request_headers")
            with pytest.raises(grpc.RpcError) as refused:
                list(process(iter([headers]), timeout=10))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            held.cancel()
            info = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=r.ServerReflectionRequest.SerializeToString,
                response_deserializer=r.ServerReflectionResponse.FromString,
            )
            (listed,) = info(iter([r.ServerReflectionRequest(list_services="")]), timeout=5)
            assert service in {s.name for s in listed.list_services_response.service}
        registry = app.metrics.registry
        assert registry.get_sample_value("grpc_server_handled_total", {**key, "grpc_code": "OK"})
        assert registry.get_sample_value(
            "grpc_server_handled_total", {**key, "grpc_code": "RESOURCE_EXHAUSTED"}
        )
        assert registry.get_sample_value("grpc_server_started_total", key) >= 3
    finally:
        app.shutdown(0)


def test_a_follow_up_through_the_gateway_goes_where_its_conversation_goes() -> None:
    proc = _processor()
    chat = FOLLOW_UP_CHAT
    _, alone, _ = _send(proc, {"model": "tierpick/auto", "messages": chat[-1:]})
    _, follow_up, _ = _send(proc, {"model": "tierpick/auto", "messages": chat})
    assert (alone["x-tierpick-tier"], follow_up["x-tierpick-tier"]) == ("local", "frontier")
