"""The ext_proc processor (``envoy.service.ext_proc.v3.ExternalProcessor``) and the app that
serves it: one bidirectional stream per HTTP request, answered with the tier's headers (and the
body with ``model`` rewritten). Its lifecycle is :mod:`tierpick.serving.lifecycle`, the same as
the RPC service's."""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

from tierpick.classifier import RoutingPolicy, TierClassifier
from tierpick.classifier.errors import (
    MissingDependencyError,
    NotClassifiable,
    PolicyError,
    PromptError,
    RequestError,
    TierpickError,
)
from tierpick.classifier.routing import POLICY_FIELDS, clip, overlay, within_grant
from tierpick.serving.conversations import Conversations, conversation_key
from tierpick.serving.decisions import (
    HEADER_PREFIX,
    DecisionLog,
    DecisionRecord,
    basis,
    policy_fields,
)
from tierpick.serving.gateway.config import (
    POLICY_HEADERS,
    GatewayConfig,
    Grant,
    check_model_tiers,
)
from tierpick.serving.guard import BudgetGuard, describe_policy, guard_for, guard_gauges
from tierpick.serving.lifecycle import (
    AppSpec,
    GrpcApp,
    Metrics,
    ModelHolder,
    ServerConfig,
    enable_reflection,
    run_app,
    start_app,
)

log = logging.getLogger("tierpick.gateway")

CONVERSATION_HEADER = "x-tierpick-conversation"  # a sticky policy's conversation id
MAX_EXT_PROC_BYTES = (64 << 20) + (1 << 20)  # envoy.MAX_BODY_BYTES and the message around it
DECISION_HEADERS = DecisionRecord.HEADERS
OUTCOMES = (
    "classified",
    "not-classified",
    "explicit-model",
    "passthrough",
    "fallback",
    "rejected",
    "bad-request",
    "shadow",
)


def is_virtual(model: object, virtual: tuple[str, ...]) -> bool:
    """Whether a request names a virtual model ("tierpick/auto", "auto", ...), compared without
    case or surrounding white space ("AUTO" and " auto" are the same request)."""
    if not isinstance(model, str):
        return False
    name = model.strip().casefold()
    return any(name == v.strip().casefold() for v in virtual)


BadRequest = RequestError  # a request whose tierpick headers are invalid: HTTP 400


def parse_body(body: bytes) -> dict[str, Any]:
    """An OpenAI-compatible request body as a JSON object."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotClassifiable(f"body is not JSON ({type(exc).__name__})") from exc
    except RecursionError as exc:
        raise NotClassifiable("body is not JSON we read (nested too deeply)") from exc
    if not isinstance(obj, dict):
        raise NotClassifiable("body is not a JSON object")
    return obj


def prompt_of(obj: Mapping[str, Any], clf: TierClassifier) -> str:
    """The text to classify in a parsed request body: of ``messages`` (chat/completions) the
    last user turn with text of its own, then the user turns before it as far as the model
    reads (:meth:`~tierpick.classifier.TierClassifier.chat_text`); or ``prompt``
    (completions)."""
    if "messages" in obj:
        try:
            text = clf.chat_text(obj["messages"])
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
    return text


def request_policy(base: RoutingPolicy, headers: Mapping[str, str]) -> RoutingPolicy:
    """``base`` with the per-request policy headers applied (one per policy field)."""
    values = {}
    for f in POLICY_FIELDS:
        text = headers.get(HEADER_PREFIX + f.header)
        if text is not None:
            try:
                values[f.name] = f.from_text(text, HEADER_PREFIX + f.header)
            except PolicyError as exc:
                raise BadRequest(str(exc)) from None
    return overlay(base, values)


class GatewayMetrics(Metrics):
    """The server's metrics plus the gateway's decisions."""

    def __init__(self) -> None:
        super().__init__()
        from prometheus_client import Counter, Histogram

        self.latency = Histogram(
            "tierpick_gateway_processing_seconds",
            "Time the processor takes on one request body (parse, classify, rewrite)",
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0),
            registry=self.registry,
        )
        self.decisions = Counter(
            "tierpick_gateway_requests",
            "Requests seen by the Envoy processor, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.policy_headers = Counter(
            "tierpick_gateway_policy_headers",
            "Per-request x-tierpick-* policy headers: applied (granted by request_policy), "
            "ignored (not granted) or rejected (invalid, or asking for a tier not granted)",
            ["header", "outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            self.decisions.labels(outcome)
        for header in POLICY_HEADERS:
            for outcome in ("applied", "ignored", "rejected"):
                self.policy_headers.labels(header, outcome)


class TierpickProcessor:
    """``envoy.service.ext_proc.v3.ExternalProcessor``: one bidirectional stream per request."""

    def __init__(
        self,
        cfg: GatewayConfig,
        holder: ModelHolder,
        metrics: GatewayMetrics,
        decisions: DecisionLog | None = None,
    ) -> None:
        from envoy.config.core.v3 import base_pb2
        from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
        from envoy.type.v3 import http_status_pb2

        self.cfg, self.holder, self.metrics = cfg, holder, metrics
        self.decisions = decisions
        self.conversations = Conversations()  # a sticky policy's state: this processor's
        self.guard: BudgetGuard | None = None  # a policy in plain terms, held live
        if cfg.hold is not None:
            self.guard = guard_for(cfg.hold.target, holder.current, cfg.policy)
            guard_gauges(lambda: self.guard, metrics.registry)
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
                common = self._common(DecisionRecord("not-classified", reason="no request body"))
                return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common))
            return ep.ProcessingResponse(request_headers=ep.HeadersResponse())
        if kind == "request_body":
            start = time.perf_counter()
            out = self._on_body(req.request_body.body, headers)
            self.metrics.latency.observe(time.perf_counter() - start)
            return out
        # not asked for by the processing mode; answer so the stream goes on
        return ep.ProcessingResponse(**{kind: _EMPTY[kind](ep)})

    def _policy(
        self, headers: Mapping[str, str], clf: TierClassifier
    ) -> tuple[Any, list[str], bool]:
        """The request's router: the config's policy (at the guard's cost weight, with a
        ``hold``), with the policy headers the config grants applied (a request that sets any
        is routed within the grant's tiers); the headers ignored because they are not granted;
        and whether the request is routed by the config's policy (what the guard observes). The
        grant is the request's API key's (``request_policy.api_keys``), else
        ``request_policy``'s. Every header seen is counted."""
        cfg = self.cfg
        present = [h for h in POLICY_HEADERS if HEADER_PREFIX + h in headers]
        by_key = self._key_grant(headers) if present and cfg.request_policy.keys else None
        if by_key is not None:
            enabled, allowed, grant = True, by_key.headers, by_key.tiers
        else:
            enabled = cfg.request_policy.enabled
            allowed, grant = cfg.request_policy.headers, cfg.request_policy.tiers
        granted = [h for h in present if enabled and h in allowed]
        ignored = [h for h in present if h not in granted]
        # the config's policy, at the weight the guard holds now
        base = cfg.policy if self.guard is None else self.guard.policy(cfg.policy)
        try:
            policy = request_policy(
                base, {HEADER_PREFIX + h: headers[HEADER_PREFIX + h] for h in granted}
            )
            if granted:
                chose = "allowed-tiers" in granted
                where = f"{HEADER_PREFIX}allowed-tiers"
                policy = within_grant(policy, clf.tiers, grant, chose, where)
            router = clf.router(policy)
        except TierpickError:  # BadRequest, PolicyError
            for h in granted:
                self.metrics.policy_headers.labels(h, "rejected").inc()
            raise
        for h in granted:
            self.metrics.policy_headers.labels(h, "applied").inc()
        for h in ignored:
            self.metrics.policy_headers.labels(h, "ignored").inc()
        return router, ignored, policy == base

    def _key_grant(self, headers: Mapping[str, str]) -> Grant | None:
        """The grant of the API key the request carries (``request_policy.api_keys``), if any."""
        value = headers.get(self.cfg.request_policy.api_key_header)
        if not value:
            return None
        if value[:7].lower() == "bearer ":
            value = value[7:]
        digest = hashlib.sha256(value.strip().encode("utf-8")).hexdigest()
        return self.cfg.request_policy.keys.get(digest)

    def _on_body(self, body: bytes, headers: Mapping[str, str]) -> Any:
        cfg = self.cfg
        clf = self.holder.current
        conversation = headers.get(CONVERSATION_HEADER, "")
        try:
            router, ignored, by_config = self._policy(headers, clf)
            if conversation:  # a client's: bounded, a bad one is refused
                conversation_key(conversation, None)
        except TierpickError as exc:
            self.metrics.decisions.labels("bad-request").inc()
            return self._reject(400, "invalid_request_error", str(exc))
        model: object = None
        explicit = False
        try:
            if len(body) > cfg.processor.max_body_bytes:
                raise NotClassifiable(
                    f"body of {len(body)} bytes is over processor.max_body_bytes "
                    f"({cfg.processor.max_body_bytes})"
                )
            obj = parse_body(body)
            model = obj.get("model")
            explicit = model is not None and not is_virtual(model, cfg.virtual_models)
            if explicit and cfg.mode == "route":
                tier = self._tier_of_model(model)
                if tier is None or self._may_name(headers, tier):
                    return self._explicit_model(model)
                # a tier's model named by a client not granted that tier: tierpick decides
                # (no client reaches the dearest tier by naming its model)
                ignored = [*ignored, "explicit-model"]
                explicit = False
            prompt = prompt_of(obj, clf)
            reading = clf.read([prompt], familiarity=True)
            proba = reading.proba
            decision = clf.route_proba(proba, router)[0]
            decision, held = self.conversations.hold_decision(
                conversation, obj.get("messages"), decision, clf, router
            )
        except (NotClassifiable, PromptError) as exc:
            if explicit:  # shadow mode: nothing to log, the request goes as it would
                return self._explicit_model(model)
            self.metrics.decisions.labels("not-classified").inc()
            return self._body_response(
                self._common(DecisionRecord("not-classified", reason=str(exc)))
            )
        except Exception as exc:  # the classifier failed: the failure policy decides
            if cfg.mode == "shadow":  # nothing was going to change: the request goes as it would
                log.exception("classifier error (shadow mode)")
                return self._explicit_model(model) if explicit else self._shadow(None)
            return self._classifier_failed(exc)
        if self.decisions is not None:
            self.decisions.record(
                door="envoy",
                mode=cfg.mode,
                prompt=prompt,
                tiers=clf.tiers,
                proba=proba[0],
                tier=decision.tier,
                model_version=clf.version,
                policy=policy_fields(router),
                request_id=headers.get("x-request-id", "")[:200],
                requested_model=str(model)[:200] if model is not None else None,
            )
        if cfg.mode == "shadow":
            return self._explicit_model(model) if explicit else self._shadow(decision.tier)
        self.metrics.decisions.labels("classified").inc()
        self.metrics.tiers.labels(decision.tier).inc()
        self.metrics.observe_reading(clf.tiers, proba, reading.familiarity)
        if self.guard is not None and by_config:
            chosen = [clf.tiers.index(decision.tier)]
            self.guard.record([len(prompt)], proba, chosen, router, clf.manifest.tiers)
        reason = ""
        if ignored:
            named = [h for h in ignored if h != "explicit-model"]
            reason = "; ".join(
                (
                    [f"model {clip(repr(model), 100)} is a tier's: routed by tierpick, not granted"]
                    if "explicit-model" in ignored
                    else []
                )
                + (
                    [
                        f"policy header(s) {', '.join(HEADER_PREFIX + h for h in named)} ignored: "
                        "not granted by this gateway's request_policy"
                    ]
                    if named
                    else []
                )
            )
        new_body = None
        upstream_model = cfg.tiers[decision.tier].model
        if cfg.rewrite_model and upstream_model is not None and obj.get("model") != upstream_model:
            obj["model"] = upstream_model
            new_body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        raw_headers = {}
        if new_body is not None and "content-length" in headers:
            raw_headers["content-length"] = str(len(new_body))
        record = DecisionRecord(
            "classified",
            decision.tier,
            decision.probabilities,
            clf.version,
            reason,
            basis(router, proba[0], reading.cut[0], held),
        )
        return self._body_response(self._common(record, new_body, raw_headers))

    def _tier_of_model(self, model: object) -> str | None:
        return next((t for t, u in self.cfg.tiers.items() if u.model == model), None)

    def _may_name(self, headers: Mapping[str, str], tier: str) -> bool:
        """Whether the request may send itself to ``tier`` by naming its model: only with a
        grant (its API key's, else ``request_policy``'s) that includes the tier."""
        cfg = self.cfg
        by_key = self._key_grant(headers) if cfg.request_policy.keys else None
        if by_key is not None:
            return not by_key.tiers or tier in by_key.tiers
        if not cfg.request_policy.enabled:
            return False
        return not cfg.request_policy.tiers or tier in cfg.request_policy.tiers

    def _explicit_model(self, model: object) -> Any:
        """A request that names a model of its own: never rewritten. It goes to the tier whose
        upstream serves that model, else (unknown to the config) to the fallback route."""
        tier = self._tier_of_model(model)
        if tier is not None:
            self.metrics.decisions.labels("explicit-model").inc()
            return self._body_response(self._common(DecisionRecord("explicit-model", tier)))
        self.metrics.decisions.labels("passthrough").inc()
        reason = (
            f"model {clip(repr(model), 100)} is not a tierpick virtual model "
            f"{list(self.cfg.virtual_models)} "
            "nor a tier's model: passed through untouched"
        )
        return self._body_response(self._common(DecisionRecord("passthrough", reason=reason)))

    def _shadow(self, tier: str | None) -> Any:
        """Shadow mode, a request for a virtual model (or none): no tier decision, so it goes
        where it would without tierpick (the fallback route); the decision is only logged."""
        self.metrics.decisions.labels("shadow").inc()
        return self._body_response(self._common(DecisionRecord("shadow", shadow_tier=tier)))

    def _classifier_failed(self, exc: Exception) -> Any:
        cfg = self.cfg
        log.exception("classifier error")
        if cfg.failure.mode == "closed":
            self.metrics.decisions.labels("rejected").inc()
            return self._reject(503, "tierpick_unavailable", f"classifier error: {exc}")
        self.metrics.decisions.labels("fallback").inc()
        return self._body_response(
            self._common(DecisionRecord("fallback", cfg.fallback_tier, reason="classifier error"))
        )

    def _common(
        self,
        decision: DecisionRecord,
        body: bytes | None = None,
        raw_headers: Mapping[str, str] | None = None,
    ) -> Any:
        items = decision.headers() | dict(raw_headers or {})
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


def create_gateway(
    cfg: GatewayConfig, address: str | None = None, config: ServerConfig | None = None
) -> GrpcApp:
    """Load the model (checked against the config's tiers) and start the processor: health
    SERVING once the model is loaded, hot reload, NOT_SERVING then a drain on stop
    (:meth:`~tierpick.serving.lifecycle.GrpcApp.shutdown`)."""
    try:
        from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
        from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
        from grpc_health.v1.health import SERVICE_NAME as health_service
    except ImportError as exc:
        raise MissingDependencyError(
            f"the gateway needs Envoy's ext_proc stubs (pip install 'tierpick[gateway]'): {exc}"
        ) from exc
    # every body Envoy passes on reaches the processor (which reads it only up to
    # max_body_bytes): a larger gRPC message would fail the stream and send the request to the
    # failure policy instead (a 503 when closed)
    config = config or ServerConfig()
    config = replace(config, max_message_bytes=max(config.max_message_bytes, MAX_EXT_PROC_BYTES))
    metrics = GatewayMetrics()
    holder = ModelHolder(cfg.model, metrics, check=lambda c: check_model_tiers(cfg, c))
    decisions = DecisionLog(cfg.decision_log) if cfg.decision_log is not None else None
    if decisions is not None:
        metrics.watch_decision_log(decisions)

    service = ep.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name

    def add_services(server: Any) -> None:
        ep_grpc.add_ExternalProcessorServicer_to_server(
            TierpickProcessor(cfg, holder, metrics, decisions), server
        )
        enable_reflection(server, (service, health_service))

    app = start_app(
        AppSpec(
            "tierpick-gateway",
            address or cfg.processor_address,
            holder,
            metrics,
            config,
            add_services,
            services=(service,),
            logger=log,
            on_stop=(decisions.close,) if decisions is not None else (),
        )
    )
    atexit.register(app.shutdown, 0)  # a running aio server would hold the interpreter at exit
    active = describe_policy(
        holder.current.router(cfg.policy), cfg.hold.target if cfg.hold is not None else None
    )
    metrics.policy.info({"policy": active})
    log.info(
        "tierpick ext_proc processor on port %d (model %s); policy: %s",
        app.port,
        holder.current.version,
        active,
    )
    return app


def run_gateway(cfg: GatewayConfig, metrics_port: int | None = None) -> int:
    """Run the processor until SIGTERM/SIGINT; SIGHUP reloads the model."""
    return run_app(
        create_gateway(cfg), "tierpick gateway processor", metrics_port, cfg.processor.host
    )
