"""Envoy integration: an external processor (``envoy.service.ext_proc.v3``) that routes
OpenAI-compatible requests to the tier tierpick chooses.

Flow of one request through Envoy (see :func:`render_envoy_config`):

1. a ``header_mutation`` filter strips any ``x-tierpick-*`` decision header the client sent;
2. the ``ext_proc`` filter sends the request headers and the buffered body to this processor,
   which reads ``messages`` (chat/completions: the last user turn) or ``prompt``
   (completions), classifies it with the loaded model and answers with headers
   (``x-tierpick-tier``, ``x-tierpick-model-version``, ``x-tierpick-probabilities``,
   ``x-tierpick-status``) and, when ``rewrite_model`` is on, the body with ``model`` set to the
   tier's upstream model name (``content-length`` updated); it clears Envoy's route cache;
3. the route table sends the request to the cluster of ``x-tierpick-tier``; a request without
   one (processor down or over its time budget with ``failure.mode: open``, or a body that
   could not be classified) takes the last route, to the fallback tier, marked
   ``x-tierpick-status: fallback`` unless the processor said why.

Failure policy (``failure.mode``): ``open`` sends requests the classifier could not handle to
``failure.fallback_tier`` and counts them; ``closed`` rejects them with HTTP 503. The time
budget is Envoy's ``message_timeout`` (``failure.timeout_ms``), which bounds the whole hop,
network included. A body that is not JSON, or has no prompt, passes through untouched with
``x-tierpick-status: not-classified`` and ``x-tierpick-reason``. A bad per-request policy
header is answered with HTTP 400 and an OpenAI-style error body.

Per-request policy headers: ``x-tierpick-min-success``, ``x-tierpick-allowed-tiers`` (comma
list), ``x-tierpick-cost-weight``, ``x-tierpick-max-price``; they override the config's policy.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import yaml

from tierpick.classifier import RoutingPolicy, TierClassifier, messages_to_prompt
from tierpick.classifier.errors import (
    ConfigError,
    MissingDependencyError,
    PromptError,
    TierpickError,
)
from tierpick.serving.server import (
    LoopThread,
    Metrics,
    ModelHolder,
    ServerConfig,
    bind,
    run_until_signalled,
    server_options,
)

log = logging.getLogger("tierpick.gateway")

HEADER_PREFIX = "x-tierpick-"
DECISION_HEADERS = ("tier", "model-version", "probabilities", "status", "reason")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Upstream:
    """Where a tier's requests go: ``host:port``, TLS or not, and the model name to ask for."""

    address: str
    model: str | None = None
    tls: bool = False

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway's settings; :func:`load_gateway_config` reads and validates them."""

    tiers: dict[str, Upstream]
    processor_host: str = "127.0.0.1"
    processor_port: int = 50052
    # a larger body is passed through unclassified (to the fallback tier): the work one request
    # costs the processor is bounded (parsing, and re-encoding it for the model rewrite, grow
    # with the body: ~25 ms at 900 KB here), so a few large bodies cannot starve small ones
    max_body_bytes: int = 256 * 1024
    model: str | None = None
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    rewrite_model: bool = True
    failure_mode: str = "open"  # open | closed
    fallback_tier: str = ""
    timeout_ms: int = 200
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    admin_port: int = 9901
    upstream_timeout_s: float = 300.0

    @property
    def processor_address(self) -> str:
        return f"{self.processor_host}:{self.processor_port}"


_KEYS = {
    "processor": {"host", "port", "max_body_bytes"},
    "model": None,
    "policy": {"min_success", "allowed_tiers", "cost_weight", "max_price"},
    "rewrite_model": None,
    "failure": {"mode", "fallback_tier", "timeout_ms"},
    "tiers": None,
    "envoy": {"listen_host", "listen_port", "admin_port", "upstream_timeout_s"},
}


def _fail(key: str, problem: str) -> ConfigError:
    return ConfigError(f"gateway config: {key}: {problem}")


def _number(value: object, key: str, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _fail(key, f"must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _port(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise _fail(key, f"must be a port number (0-65535), got {value!r}")
    return value


def _section(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise _fail(name, f"must be a mapping, got {type(value).__name__}")
    allowed = _KEYS[name] or set()
    if unknown := sorted(set(value) - allowed):
        raise _fail(name, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return value


def parse_gateway_config(raw: object) -> GatewayConfig:
    """Validate a parsed YAML mapping; every problem names its key."""
    if not isinstance(raw, dict):
        raise ConfigError("gateway config: the file must hold a mapping")
    if unknown := sorted(set(raw) - set(_KEYS)):
        raise _fail("(top level)", f"unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    tiers_raw = raw.get("tiers")
    if not isinstance(tiers_raw, dict) or not tiers_raw:
        raise _fail("tiers", "a mapping of tier name -> {upstream: host:port, model: name}")
    tiers: dict[str, Upstream] = {}
    for name, spec in tiers_raw.items():
        key = f"tiers.{name}"
        if not isinstance(spec, dict) or not isinstance(spec.get("upstream"), str):
            raise _fail(key, "needs upstream: host:port")
        if unknown := sorted(set(spec) - {"upstream", "model", "tls"}):
            raise _fail(key, f"unknown key(s) {unknown}; allowed: ['model', 'tls', 'upstream']")
        address = spec["upstream"]
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _fail(f"{key}.upstream", f"must be host:port, got {address!r}")
        model = spec.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise _fail(f"{key}.model", f"must be a model name, got {model!r}")
        tiers[str(name)] = Upstream(address, model, bool(spec.get("tls", False)))
    proc = _section(raw, "processor")
    pol = _section(raw, "policy")
    fail = _section(raw, "failure")
    env = _section(raw, "envoy")
    allowed = pol.get("allowed_tiers") or []
    if not isinstance(allowed, list) or any(t not in tiers for t in allowed):
        raise _fail("policy.allowed_tiers", f"must list tiers of {sorted(tiers)}, got {allowed!r}")
    policy = RoutingPolicy(
        min_success=_number(pol.get("min_success", 0.0), "policy.min_success", 0.0, 1.0),
        allowed_tiers=tuple(allowed),
        cost_weight=None
        if pol.get("cost_weight") is None
        else _number(pol["cost_weight"], "policy.cost_weight", 0.0),
        max_price=None
        if pol.get("max_price") is None
        else _number(pol["max_price"], "policy.max_price", 0.0),
    )
    mode = fail.get("mode", "open")
    if mode not in ("open", "closed"):
        raise _fail("failure.mode", f"must be open or closed, got {mode!r}")
    fallback = fail.get("fallback_tier", list(tiers)[-1])
    if fallback not in tiers:
        raise _fail("failure.fallback_tier", f"must be one of {sorted(tiers)}, got {fallback!r}")
    rewrite = raw.get("rewrite_model", True)
    if not isinstance(rewrite, bool):
        raise _fail("rewrite_model", f"must be true or false, got {rewrite!r}")
    model_path = raw.get("model")
    if model_path is not None and not isinstance(model_path, str):
        raise _fail("model", f"must be a model directory or models:/ URI, got {model_path!r}")
    return GatewayConfig(
        tiers=tiers,
        processor_host=str(proc.get("host", "127.0.0.1")),
        processor_port=_port(proc.get("port", 50052), "processor.port"),
        max_body_bytes=int(
            _number(proc.get("max_body_bytes", 256 * 1024), "processor.max_body_bytes", 1, 64 << 20)
        ),
        model=model_path,
        policy=policy,
        rewrite_model=rewrite,
        failure_mode=mode,
        fallback_tier=fallback,
        timeout_ms=int(_number(fail.get("timeout_ms", 200), "failure.timeout_ms", 1, 60_000)),
        listen_host=str(env.get("listen_host", "127.0.0.1")),
        listen_port=_port(env.get("listen_port", 8080), "envoy.listen_port"),
        admin_port=_port(env.get("admin_port", 9901), "envoy.admin_port"),
        upstream_timeout_s=_number(
            env.get("upstream_timeout_s", 300.0), "envoy.upstream_timeout_s", 0.001
        ),
    )


def load_gateway_config(path: str | Path) -> GatewayConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"gateway config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"gateway config {path}: not valid YAML: {exc}") from exc
    return parse_gateway_config(raw)


def check_model_tiers(cfg: GatewayConfig, clf: TierClassifier) -> None:
    """The config must name an upstream for every tier of the model, and no other tier."""
    if set(cfg.tiers) != set(clf.tiers):
        raise ConfigError(
            f"gateway config tiers {sorted(cfg.tiers)} != the model's tiers {list(clf.tiers)}"
        )


# --------------------------------------------------------------------------- the processor


class BadRequest(TierpickError):
    """A request whose tierpick headers are invalid: answered with HTTP 400."""


class NotClassifiable(TierpickError):
    """A body with nothing to classify: passed through untouched."""


def prompt_of(body: bytes) -> tuple[str, dict[str, Any]]:
    """The text to classify in an OpenAI-compatible request body, and the parsed body."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotClassifiable(f"body is not JSON ({type(exc).__name__})") from exc
    except RecursionError as exc:
        raise NotClassifiable("body is not JSON we read (nested too deeply)") from exc
    if not isinstance(obj, dict):
        raise NotClassifiable("body is not a JSON object")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise NotClassifiable("messages is not a list of objects")
        try:
            text = messages_to_prompt(messages)
        except ValueError as exc:
            raise NotClassifiable(str(exc)) from exc
    elif isinstance(obj.get("prompt"), str):
        text = obj["prompt"]
    elif isinstance(obj.get("prompt"), list) and all(isinstance(p, str) for p in obj["prompt"]):
        text = "\n".join(obj["prompt"])
    else:
        raise NotClassifiable("no messages or prompt")
    if not text.strip():
        raise NotClassifiable("the prompt is empty")
    return text, obj


def request_policy(base: RoutingPolicy, headers: Mapping[str, str]) -> RoutingPolicy:
    """``base`` with the per-request policy headers applied."""

    def number(name: str) -> float | None:
        value = headers.get(HEADER_PREFIX + name)
        if value is None:
            return None
        try:
            x = float(value)
        except ValueError:
            raise BadRequest(f"{HEADER_PREFIX}{name}: not a number: {value!r}") from None
        if not math.isfinite(x):
            raise BadRequest(f"{HEADER_PREFIX}{name}: not a finite number: {value!r}")
        return x

    policy = base
    if (v := number("min-success")) is not None:
        policy = replace(policy, min_success=v)
    if (v := number("cost-weight")) is not None:
        policy = replace(policy, cost_weight=v)
    if (v := number("max-price")) is not None:
        policy = replace(policy, max_price=v)
    tiers = headers.get(HEADER_PREFIX + "allowed-tiers")
    if tiers is not None:
        policy = replace(
            policy, allowed_tiers=tuple(t.strip() for t in tiers.split(",") if t.strip())
        )
    return policy


class GatewayMetrics(Metrics):
    """The server's metrics plus the gateway's decisions."""

    def __init__(self) -> None:
        super().__init__()
        from prometheus_client import Counter

        self.decisions = Counter(
            "tierpick_gateway_requests",
            "Requests seen by the Envoy processor, by outcome "
            "(classified, not-classified, fallback, rejected, bad-request)",
            ["outcome"],
            registry=self.registry,
        )


class TierpickProcessor:
    """``envoy.service.ext_proc.v3.ExternalProcessor``: one bidirectional stream per request."""

    def __init__(self, cfg: GatewayConfig, holder: ModelHolder, metrics: GatewayMetrics) -> None:
        from envoy.config.core.v3 import base_pb2
        from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
        from envoy.type.v3 import http_status_pb2

        self.cfg, self.holder, self.metrics = cfg, holder, metrics
        self.ep, self.base, self.http_status = ep, base_pb2, http_status_pb2

    async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        """One HTTP request: its headers, then (buffered) its body; one answer to each.

        Runs on the server's event loop: classifying one prompt costs tens of microseconds,
        less than handing it to a thread would.
        """
        headers: dict[str, str] = {}
        async for req in requests:
            yield self.respond(req, headers)

    def respond(self, req: Any, headers: dict[str, str]) -> Any:
        """The answer to one message of a request's stream; ``headers`` carries the request's
        headers from its first message to its body."""
        ep = self.ep
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            headers.update(
                (h.key.lower(), h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
                for h in req.request_headers.headers.headers
            )
            if req.request_headers.end_of_stream:  # no body to read: leave it to the route
                self.metrics.decisions.labels("not-classified").inc()
                common = self._common({"status": "not-classified", "reason": "no request body"})
                return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common))
            return ep.ProcessingResponse(request_headers=ep.HeadersResponse())
        if kind == "request_body":
            start = time.perf_counter()
            out = self._on_body(req.request_body.body, headers)
            self.metrics.latency.labels("ext_proc").observe(time.perf_counter() - start)
            return out
        # not asked for by the processing mode; answer so the stream goes on
        return ep.ProcessingResponse(**{kind: _EMPTY[kind](ep)})

    def _on_body(self, body: bytes, headers: Mapping[str, str]) -> Any:
        cfg = self.cfg
        try:
            policy = request_policy(cfg.policy, headers)
            clf = self.holder.current
            router = clf.router(policy)
        except TierpickError as exc:  # BadRequest, PolicyError
            self.metrics.decisions.labels("bad-request").inc()
            return self._reject(400, "invalid_request_error", str(exc))
        try:
            if len(body) > cfg.max_body_bytes:
                raise NotClassifiable(
                    f"body of {len(body)} bytes is over processor.max_body_bytes "
                    f"({cfg.max_body_bytes})"
                )
            prompt, obj = prompt_of(body)
            decision = clf.route_proba(clf.predict_proba([prompt]), router)[0]
        except (NotClassifiable, PromptError) as exc:
            self.metrics.decisions.labels("not-classified").inc()
            return self._body_response(
                self._common({"status": "not-classified", "reason": str(exc)})
            )
        except Exception as exc:  # the classifier failed: the failure policy decides
            return self._classifier_failed(exc)
        self.metrics.decisions.labels("classified").inc()
        self.metrics.tiers.labels(decision.tier).inc()
        set_headers = {
            "tier": decision.tier,
            "model-version": clf.version,
            "probabilities": ",".join(f"{t}={p:.4f}" for t, p in decision.probabilities.items()),
            "status": "classified",
        }
        new_body = None
        upstream_model = cfg.tiers[decision.tier].model
        if cfg.rewrite_model and upstream_model is not None and obj.get("model") != upstream_model:
            obj["model"] = upstream_model
            new_body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        raw_headers = {}
        if new_body is not None and "content-length" in headers:
            raw_headers["content-length"] = str(len(new_body))
        return self._body_response(self._common(set_headers, new_body, raw_headers))

    def _classifier_failed(self, exc: Exception) -> Any:
        cfg = self.cfg
        log.exception("classifier error")
        if cfg.failure_mode == "closed":
            self.metrics.decisions.labels("rejected").inc()
            return self._reject(503, "tierpick_unavailable", f"classifier error: {exc}")
        self.metrics.decisions.labels("fallback").inc()
        return self._body_response(
            self._common(
                {"tier": cfg.fallback_tier, "status": "fallback", "reason": "classifier error"}
            )
        )

    def _common(
        self,
        decision: Mapping[str, str],
        body: bytes | None = None,
        raw_headers: Mapping[str, str] | None = None,
    ) -> Any:
        items = {HEADER_PREFIX + k: v for k, v in decision.items()}
        items.update(raw_headers or {})
        return self.ep.CommonResponse(
            header_mutation=self._set_headers(items),
            body_mutation=self.ep.BodyMutation(body=body) if body is not None else None,
            clear_route_cache=True,
        )

    def _set_headers(self, items: Mapping[str, str]) -> Any:
        """A header mutation that sets (overwrites) each of ``items``."""
        option = self.base.HeaderValueOption
        return self.ep.HeaderMutation(
            set_headers=[
                option(
                    header=self.base.HeaderValue(key=k, raw_value=v.encode("utf-8")),
                    append_action=option.OVERWRITE_IF_EXISTS_OR_ADD,
                )
                for k, v in items.items()
            ]
        )

    def _body_response(self, common: Any) -> Any:
        return self.ep.ProcessingResponse(request_body=self.ep.BodyResponse(response=common))

    def _reject(self, code: int, kind: str, message: str) -> Any:
        body = json.dumps({"error": {"message": message, "type": kind, "code": code}})
        headers = {"content-type": "application/json", HEADER_PREFIX + "status": "rejected"}
        return self.ep.ProcessingResponse(
            immediate_response=self.ep.ImmediateResponse(
                status=self.http_status.HttpStatus(code=code),
                headers=self._set_headers(headers),
                body=body.encode("utf-8"),
                details=f"tierpick_{kind}",
            )
        )


_EMPTY = {
    "request_trailers": lambda ep: ep.TrailersResponse(),
    "response_headers": lambda ep: ep.HeadersResponse(),
    "response_body": lambda ep: ep.BodyResponse(),
    "response_trailers": lambda ep: ep.TrailersResponse(),
}


class Gateway:
    """A running processor: a ``grpc.aio`` server on its own event-loop thread, with the same
    lifecycle as the RPC service (:mod:`serving.server`): health SERVING once the model is
    loaded, NOT_SERVING then a drain on stop."""

    def __init__(
        self, cfg: GatewayConfig, address: str | None = None, config: ServerConfig | None = None
    ) -> None:
        try:
            from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
        except ImportError as exc:
            raise MissingDependencyError(
                f"the gateway needs Envoy's ext_proc stubs (pip install 'tierpick[gateway]'): {exc}"
            ) from exc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from grpc_health.v1.health import aio as health_aio

        self.config = config or ServerConfig()
        self.metrics = GatewayMetrics()
        self.holder = ModelHolder(
            cfg.model, self.metrics, check=lambda c: check_model_tiers(cfg, c)
        )
        self._loop = LoopThread("tierpick-gateway")
        address = address or cfg.processor_address
        self._health_pb2 = health_pb2

        async def start() -> tuple[Any, Any, int]:
            server = grpc.aio.server(options=server_options(self.config))
            ep_grpc.add_ExternalProcessorServicer_to_server(
                TierpickProcessor(cfg, self.holder, self.metrics), server
            )
            health_servicer = health_aio.HealthServicer()
            await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            port = bind(server, address, None)
            await server.start()
            return server, health_servicer, port

        try:
            self._server, self._health, self.port = self._loop.run(start())
        except BaseException:
            self._loop.close()
            raise
        atexit.register(self.stop, 0)  # a running aio server would hold the interpreter at exit
        log.info(
            "tierpick ext_proc processor on port %d (model %s)",
            self.port,
            self.holder.current.version,
        )

    def stop(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING, in-flight requests get ``grace`` seconds (default the
        config's ``drain_timeout``) to finish, then the processor stops; idempotent."""
        if not self._loop.loop.is_running():
            return
        not_serving = self._health_pb2.HealthCheckResponse.NOT_SERVING
        self._loop.run(self._health.set("", not_serving))
        timeout = self.config.drain_timeout if grace is None else grace
        self._loop.run(self._server.stop(timeout))
        self._loop.close()
        log.info("tierpick ext_proc processor stopped")


def create_gateway(cfg: GatewayConfig, address: str | None = None) -> Gateway:
    """Load the model (checked against the config's tiers) and start the processor."""
    return Gateway(cfg, address)


def run_gateway(cfg: GatewayConfig, metrics_port: int | None = None) -> int:
    """Run the processor until SIGTERM/SIGINT; SIGHUP reloads the model."""
    gw = create_gateway(cfg)
    if metrics_port is not None:
        bound = gw.metrics.serve_http(metrics_port, cfg.processor_host)
        log.info("metrics on http://%s:%d/metrics (plain HTTP)", cfg.processor_host, bound)
    print(f"tierpick gateway processor on {cfg.processor_host}:{gw.port}", flush=True)
    run_until_signalled(gw.holder.reload, log)
    log.info("draining: up to %.0f s for in-flight requests", gw.config.drain_timeout)
    gw.stop()
    return 0


# --------------------------------------------------------------------------- Envoy config


def render_envoy_config(
    cfg: GatewayConfig, with_processor: bool = True, processor_port: int | None = None
) -> str:
    """Envoy's bootstrap YAML for ``cfg``: one cluster per tier, routes on ``x-tierpick-tier``.

    ``with_processor=False`` renders the same Envoy without the ext_proc filter (it routes
    everything to the fallback tier): the baseline for measuring the filter's cost.
    """
    fallback = cfg.fallback_tier
    tier_header = HEADER_PREFIX + "tier"
    status_header = HEADER_PREFIX + "status"
    timeout = f"{cfg.upstream_timeout_s:g}s"
    routes: list[dict[str, Any]] = [
        {
            "match": {
                "prefix": "/",
                "headers": [{"name": tier_header, "string_match": {"exact": t}}],
            },
            "route": {"cluster": f"tier_{t}", "timeout": timeout},
        }
        for t in cfg.tiers
    ]
    routes.append(
        {
            "match": {"prefix": "/"},
            "route": {"cluster": f"tier_{fallback}", "timeout": timeout},
            "request_headers_to_add": [
                {
                    "header": {"key": tier_header, "value": fallback},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                },
                {
                    "header": {"key": status_header, "value": "fallback"},
                    "append_action": "ADD_IF_ABSENT",
                },
            ],
        }
    )
    filters: list[dict[str, Any]] = [
        {
            # a client must not choose its own tier by sending the decision headers
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3."
                "HeaderMutation",
                "mutations": {
                    "request_mutations": [{"remove": HEADER_PREFIX + h} for h in DECISION_HEADERS]
                },
            },
        }
    ]
    if with_processor:
        ext_proc: dict[str, Any] = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
            "ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "tierpick_processor"}},
            "failure_mode_allow": cfg.failure_mode == "open",
            "message_timeout": f"{cfg.timeout_ms / 1000:g}s",
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "BUFFERED",
                "response_body_mode": "NONE",
            },
            "send_body_without_waiting_for_header_response": True,
            "stat_prefix": "tierpick",
        }
        if cfg.failure_mode == "closed":
            ext_proc["status_on_error"] = {"code": 503}
        filters.append({"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc})
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        }
    )
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
        "v3.HttpConnectionManager",
        "stat_prefix": "tierpick_gateway",
        "codec_type": "AUTO",
        "route_config": {
            "name": "tiers",
            "virtual_hosts": [
                {
                    "name": "llm",
                    "domains": ["*"],
                    "routes": routes,
                    # the client sees the decision
                    "response_headers_to_add": [
                        {
                            "header": {"key": h, "value": f"%REQ({h})%"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                        for h in (tier_header, status_header)
                    ],
                }
            ],
        },
        "http_filters": filters,
    }
    clusters = [_cluster(f"tier_{t}", up.host, up.port, tls=up.tls) for t, up in cfg.tiers.items()]
    if with_processor:
        clusters.append(
            _cluster(
                "tierpick_processor",
                cfg.processor_host,
                processor_port or cfg.processor_port,
                http2=True,
            )
        )
    doc = {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": cfg.admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "tierpick_gateway",
                    "address": {
                        "socket_address": {
                            "address": cfg.listen_host,
                            "port_value": cfg.listen_port,
                        }
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }
    header = (
        "# Envoy bootstrap rendered by `tierpick gateway envoy-config` from a tierpick gateway "
        "config.\n# Regenerate it rather than editing it by hand.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, width=100)


def _cluster(
    name: str, host: str, port: int, http2: bool = False, tls: bool = False
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                "UpstreamTlsContext",
                "sni": host,
            },
        }
    return cluster
