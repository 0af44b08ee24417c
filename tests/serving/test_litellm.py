"""The LiteLLM plug-in: its settings and checks, the Python ``Router`` with real upstreams, and
(slow) a real ``litellm --config`` proxy in front of three upstreams with the tierpick service
in its own process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the price map
pytest.importorskip("litellm", reason="the litellm extra is not installed")

from tests.conftest import DATA, REPO
from tests.serving.conftest import FOLLOW_UP_CHAT, both_plugins, routed_tier
from tierpick import classifier
from tierpick.classifier.errors import ConfigError
from tierpick.serving.gateway.demo import Upstream
from tierpick.serving.harness.litellm import LiteLLMProxy, litellm_config
from tierpick.serving.harness.processes import free_port
from tierpick.serving.litellm_plugin import (
    DECISION_KEY,
    Plugin,
    PluginConfig,
    PluginFailure,
    PluginGrant,
    check_model_list,
    from_litellm_config,
    parse_plugin_config,
)

TIERS = ("local", "mid", "frontier")

# An agent loop as a coding harness sends it: a long system prompt, the user's task wrapped in
# harness reminders, a tool call and its result, then a user turn that is only a reminder.
TASK = "Why does my Python script raise RecursionError when I parse a deeply nested JSON file?"
AGENT_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are an interactive CLI coding agent. " * 40},
    {
        "role": "user",
        "content": [
            {
                "type": "text",
                "text": "<system-reminder>\nAs you answer, use the TodoWrite tool. Today's date "
                "is 2026-11-30. The working directory is /repo.\n</system-reminder>",
            },
            {"type": "text", "text": TASK},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "read_file", "arguments": '{"path": "parse.py"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "import json\n" * 50},
    {
        "role": "user",
        "content": "<system-reminder>The file parse.py was modified by the user.</system-reminder>",
    },
]


def _real_prompts() -> list[str]:
    with (DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl").open() as fh:
        prompts = [json.loads(x)["prompt"] for x in fh][:150]
    return [*prompts, "hi, how are you?", "What is 2+2?", "Say hello in French."]


def _by_tier(clf: classifier.TierClassifier, policy: classifier.RoutingPolicy) -> dict[str, str]:
    """A real prompt the model routes to each tier under ``policy`` (the tiers it reaches)."""
    prompts = _real_prompts()
    out: dict[str, str] = {}
    for p, d in zip(prompts, clf.route(prompts, policy), strict=True):
        out.setdefault(d.tier, p)
    return out


def _router_model_list(upstreams: dict[str, Upstream], plugin: Plugin) -> list[dict[str, Any]]:
    cfg = litellm_config({t: u.address for t, u in upstreams.items()}, {})
    entry = cfg["model_list"][0]["litellm_params"]["complexity_router_config"]
    entry["classifier_plugin"] = plugin  # the Python Router takes the instance itself
    return list(cfg["model_list"])


# ------------------------------------------------------------------------------- settings


def test_settings_errors_name_the_key() -> None:
    bad: list[tuple[object, str]] = [
        ({"servce": "x"}, "unknown key(s) ['servce']"),
        ({"service": "a:1", "model": "m"}, "not both"),
        ({"timeout_ms": 0}, "tierpick.timeout_ms"),
        ({"failure": {"mode": "maybe"}}, "tierpick.failure.mode"),
        ({"policy": {"cost_weight": -1}}, "tierpick.policy.cost_weight"),
        ({"request_policy": {"fields": ["price"]}}, "tierpick.request_policy.fields"),
    ]
    for raw, key in bad:
        with pytest.raises(ConfigError) as err:
            parse_plugin_config(raw)
        assert key in str(err.value), raw
    cfg = parse_plugin_config({"model": "default", "failure": {"mode": "closed"}})
    assert cfg.service is None and cfg.failure.mode == "closed"
    assert parse_plugin_config(None).service == "127.0.0.1:50051"


def test_model_list_check_refuses_a_tier_without_a_model_group() -> None:
    ups = {t: f"127.0.0.1:{9000 + i}" for i, t in enumerate(TIERS)}
    good = litellm_config(ups, {})["model_list"]
    assert [g.name for g in check_model_list(good, TIERS)] == ["tierpick/auto"]
    routed = good[0]["litellm_params"]["complexity_router_config"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tiers": {**routed["tiers"], "frontier": "gpt-9"}}, "tiers.frontier: model group(s)"),
        ({"tiers": {"local": "local-llm", "mid": "mid-llm"}}, "must be the tierpick model's"),
        ({"fallback_tier": "nowhere"}, "fallback_tier"),
        ({"classifier_type": "llm"}, "classifier_type"),
    ]
    for change, message in cases:
        changed = [
            {
                **good[0],
                "litellm_params": {
                    **good[0]["litellm_params"],
                    "complexity_router_config": {**routed, **change},
                },
            },
            *good[1:],
        ]
        with pytest.raises(ConfigError) as err:
            check_model_list(changed, TIERS)
        assert message in str(err.value) and "tierpick/auto" in str(err.value)


# ------------------------------------------------------------------------------- the Router


def test_python_router_routes_real_prompts_to_their_tier(upstreams: dict[str, Upstream]) -> None:
    """The plug-in in LiteLLM's Python ``Router``, classifying in process: each real prompt
    lands on the upstream of the tier the model picks, asked for that tier's model; the
    request's metadata policy is honoured; an agent loop is classified on its user's task."""
    from litellm import Router

    plugin = Plugin(
        PluginConfig(
            service=None, model="default", timeout_ms=1000, request_policy=PluginGrant(enabled=True)
        )
    )
    model_list = _router_model_list(upstreams, plugin)
    plugin.check(model_list)
    router = Router(model_list=model_list)
    clf = classifier.load()
    cases = [(p, tier, None) for tier, p in _by_tier(clf, classifier.RoutingPolicy()).items()] + [
        (p, tier, {"cost_weight": 1.0})
        for tier, p in _by_tier(clf, classifier.RoutingPolicy(cost_weight=1.0)).items()
    ]
    assert {tier for _, tier, _ in cases} >= {"mid", "frontier"}  # the test can fail

    async def run() -> list[tuple[str, str, str | None]]:
        out = []
        for prompt, _, policy in cases:
            resp = await router.acompletion(
                model="tierpick/auto",
                messages=[{"role": "user", "content": prompt}],
                metadata={"tierpick": policy} if policy else {},
            )
            text = resp.choices[0].message.content
            out.append(
                (
                    text,
                    resp._hidden_params["additional_headers"].get(
                        "x-litellm-complexity-router-tier"
                    ),
                    None,
                )
            )
        agent = await router.acompletion(model="tierpick/auto", messages=AGENT_MESSAGES)
        out.append((agent.choices[0].message.content, "", None))
        only_system = await router.acompletion(
            model="tierpick/auto", messages=[{"role": "system", "content": "be brief"}]
        )
        out.append((only_system.choices[0].message.content, "", None))
        return out

    before = dict(plugin.counts)
    results = asyncio.run(run())
    for (prompt, tier, _), (text, header_tier, _) in zip(cases, results, strict=False):
        assert text == f"answered by {tier}", prompt[:60]
        assert header_tier == tier
    agent_tier = clf.route([TASK])[0].tier
    assert results[len(cases)][0] == f"answered by {agent_tier}"
    assert results[len(cases) + 1][0] == "answered by mid"  # no user text: the fallback tier
    counts = {k: plugin.counts[k] - before[k] for k in plugin.counts}
    # the chat without user text never reaches the classifier: LiteLLM sends it to the
    # fallback tier itself
    assert counts["classified"] == len(cases) + 1


def test_pre_call_hook_fail_closed_rejects_and_open_falls_back() -> None:
    """The proxy hook with the service down: closed answers 503, open records the fallback."""
    from fastapi import HTTPException

    dead = f"127.0.0.1:{free_port()}"
    ups = {t: f"127.0.0.1:{9000 + i}" for i, t in enumerate(TIERS)}
    model_list = litellm_config(ups, {})["model_list"]
    for mode in ("closed", "open"):
        plugin = Plugin(
            PluginConfig(service=dead, timeout_ms=200, failure=PluginFailure(mode=mode))
        )
        plugin.check(model_list)  # the service is down: tiers are checked at the first request
        data: dict[str, Any] = {
            "model": "tierpick/auto",
            "messages": [{"role": "user", "content": "hi"}],
            # a client cannot forge the decision: the hook replaces it
            "metadata": {DECISION_KEY: {"tier": "frontier", "status": "classified"}},
        }
        if mode == "closed":
            with pytest.raises(HTTPException) as err:
                asyncio.run(plugin.async_pre_call_hook(None, None, data, "completion"))
            assert err.value.status_code == 503 and "classifier error" in str(err.value.detail)
            assert plugin.counts["rejected"] == 1
        else:
            out = asyncio.run(plugin.async_pre_call_hook(None, None, data, "completion"))
            decision = out["metadata"][DECISION_KEY]
            assert decision["status"] == "fallback" and decision["tier"] is None
            assert decision["routed_tier"] == "mid"
            assert out["metadata"]["spend_logs_metadata"]["tierpick_tier"] == "mid"
            assert plugin.counts["fallback"] == 1


# ------------------------------------------------------------------------------- the proxy


def _start_service(log: Path) -> tuple[subprocess.Popen[str], int]:
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tierpick.cli", "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=REPO,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"serving on [\d.]+:(\d+)", line)
    assert match, line
    return proc, int(match.group(1))


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    if proc.stdout is not None:
        proc.stdout.close()


def _chat(content: Any, **extra: Any) -> dict[str, Any]:
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return {"model": "tierpick/auto", "messages": messages, **extra}


@pytest.mark.slow  # a real LiteLLM proxy (~20 s to start) and the tierpick service
def test_litellm_proxy_end_to_end(upstreams: dict[str, Upstream], tmp_path: Path) -> None:
    service, port = _start_service(tmp_path / "service.log")
    timeout_ms = 150
    proxy = None
    try:
        settings = {
            "service": f"127.0.0.1:{port}",
            "timeout_ms": timeout_ms,
            "request_policy": {"enabled": True, "fields": ["cost_weight", "allowed_tiers"]},
        }
        cfg = litellm_config({t: u.address for t, u in upstreams.items()}, settings)
        proxy = LiteLLMProxy(cfg, free_port())
        clf = classifier.load()

        # real prompts land on their tier's upstream, the model rewritten to the tier's
        cases = [(p, t, None) for t, p in _by_tier(clf, classifier.RoutingPolicy()).items()]
        cases += [
            (p, t, {"cost_weight": 1.0})
            for t, p in _by_tier(clf, classifier.RoutingPolicy(cost_weight=1.0)).items()
        ]
        cases.append(("hi, how are you?", "local", {"allowed_tiers": ["local"]}))
        assert {t for _, t, _ in cases} == set(TIERS)
        for prompt, tier, policy in cases:
            status, headers, body = proxy.chat(
                _chat(prompt, metadata={"tierpick": policy} if policy else {})
            )
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == f"answered by {tier}", prompt[:60]
            assert json.loads(body["body"])["model"] == f"{tier}-model"  # what the upstream got
            assert headers["x-tierpick-tier"] == tier
            assert headers["x-tierpick-status"] == "classified"
            assert headers["x-tierpick-model-version"] == clf.version
            expected = clf.predict_proba([prompt])[0]
            got = dict(kv.split("=") for kv in headers["x-tierpick-probabilities"].split(","))
            assert [float(got[t]) for t in clf.tiers] == pytest.approx(expected, abs=1e-3)

        # an agent loop is classified on its user's task
        _, headers, _ = proxy.chat(_chat(AGENT_MESSAGES))
        _, direct, _ = proxy.chat(_chat(TASK))
        assert headers["x-tierpick-probabilities"] == direct["x-tierpick-probabilities"]

        # bad input: no user text (a system prompt only, an image only) goes to the fallback
        # tier with the reason; a bad policy value is a 400 naming the field; an explicit model
        # passes untouched
        image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        for messages in (
            [{"role": "system", "content": "be brief"}],
            [{"role": "user", "content": [image]}],
        ):
            status, headers, body = proxy.chat(_chat(messages))
            assert status == 200 and body["choices"][0]["message"]["content"] == "answered by mid"
            assert headers["x-tierpick-status"] == "not-classified"
            assert "no user message with text" in headers["x-tierpick-reason"]
        # a text part whose text is not a string: the plug-in records why it did not classify;
        # LiteLLM itself then fails the request (500, "sequence item 0: expected str")
        bad_part = [{"role": "user", "content": [{"type": "text", "text": 42}]}]
        status, headers, body = proxy.chat(_chat(bad_part))
        assert headers["x-tierpick-status"] == "not-classified"
        assert "messages[0].content[0].text must be a string" in headers["x-tierpick-reason"]
        status, _, body = proxy.chat(_chat("hi", metadata={"tierpick": {"cost_weight": "lots"}}))
        assert status == 400 and "metadata.tierpick.cost_weight" in body["error"]["message"]
        status, _, body = proxy.chat(_chat("hi", metadata={"tierpick": {"cost_weight": -1}}))
        assert status == 400 and "metadata.tierpick.cost_weight" in body["error"]["message"]
        status, headers, body = proxy.chat(_chat("hi", metadata={"tierpick": {"min_success": 1}}))
        assert status == 200 and "['min_success'] ignored" in headers["x-tierpick-reason"]
        status, headers, body = proxy.chat({**_chat("hi"), "model": "frontier-llm"})
        assert body["choices"][0]["message"]["content"] == "answered by frontier"
        assert "x-tierpick-status" not in headers

        # the service hung (SIGSTOP), then stopped: the fallback tier within the budget
        for state in ("hung", "stopped"):
            if state == "hung":
                service.send_signal(signal.SIGSTOP)
            else:
                _stop(service)
            for _ in range(3):
                t0 = time.perf_counter()
                status, headers, body = proxy.chat(_chat(TASK))
                elapsed = time.perf_counter() - t0
                assert status == 200, (state, body)
                assert body["choices"][0]["message"]["content"] == "answered by mid", state
                assert headers["x-tierpick-status"] == "fallback", state
                # generous: a lost budget would be the proxy's request timeout (minutes)
                assert elapsed < timeout_ms / 1000 + 5.0, (state, elapsed)
    finally:
        if proxy is not None:
            proxy.close()
        _stop(service)


@pytest.mark.slow  # a real LiteLLM proxy that must refuse to start
def test_litellm_proxy_refuses_a_tier_without_a_model_group(
    upstreams: dict[str, Upstream],
) -> None:
    cfg = litellm_config({t: u.address for t, u in upstreams.items()}, {"model": "default"})
    routed = cfg["model_list"][0]["litellm_params"]["complexity_router_config"]
    routed["tiers"]["frontier"] = "gpt-9-llm"
    with pytest.raises(Exception) as err:
        LiteLLMProxy(cfg, free_port(), timeout=90)
    assert "tiers.frontier: model group(s) ['gpt-9-llm'] are not a model_name" in str(err.value)


def test_from_litellm_config_reads_its_section(tmp_path: Path) -> None:
    ups = {t: f"127.0.0.1:{9000 + i}" for i, t in enumerate(TIERS)}
    path = tmp_path / "litellm.yaml"
    import yaml

    path.write_text(yaml.safe_dump(litellm_config(ups, {"model": "default", "timeout_ms": 7})))
    plugin = from_litellm_config(path)
    assert plugin.config.timeout_ms == 7 and list(plugin.routed) == ["tierpick/auto"]


def test_shipped_example_config_passes_the_start_up_check() -> None:
    plugin = from_litellm_config(REPO / "serving" / "deploy" / "litellm.yaml")
    assert plugin.config.service == "127.0.0.1:50051" and not plugin.config.request_policy.enabled
    assert plugin.routed["tierpick/auto"].tiers == {
        "local": ["local-llm"],
        "mid": ["mid-llm"],
        "frontier": ["frontier-llm"],
    }


def test_a_tier_litellm_cannot_route_is_a_counted_failure() -> None:
    """A model whose tiers changed under a running proxy: the decision falls back, once."""
    plugin = Plugin(PluginConfig(service=None, model="default", timeout_ms=1000))
    hard = [{"role": "user", "content": "Prove that there are infinitely many primes."}]
    assert asyncio.run(plugin.decide(hard, None))["tier"] == "frontier"
    decision = asyncio.run(plugin.decide(hard, None, routable={"local", "mid"}))
    assert decision["status"] == "fallback" and decision["tier"] is None
    assert "'frontier' has no model group" in decision["reason"]
    assert plugin.counts["classified"] == 1 and plugin.counts["fallback"] == 1


FOLLOW_UP = FOLLOW_UP_CHAT


def test_a_follow_up_inherits_the_tier_of_what_it_continues_in_process_and_served() -> None:
    """'ok continue' alone goes local; after a hard request it goes where the request goes, in
    the plug-in's own model and through the service alike."""
    with both_plugins() as plugins:
        for plugin in plugins:
            assert routed_tier(plugin, FOLLOW_UP[-1:]) == "local"
            assert routed_tier(plugin, FOLLOW_UP) == "frontier"
