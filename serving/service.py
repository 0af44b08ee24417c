"""The RPC service: ``TierRouter`` over a loaded model, with standard health, reflection,
Prometheus metrics, hot reload and graceful shutdown (the lifecycle is
:mod:`tierpick.serving.lifecycle`, shared with the gateway).

Build one with :func:`create_server`; :func:`serve` runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health

from tierpick.classifier import RoutingPolicy, TierClassifier
from tierpick.classifier.errors import ConfigError, RequestError
from tierpick.serving import _convert
from tierpick.serving._proto.tierpick.v1 import tierpick_pb2 as pb
from tierpick.serving._proto.tierpick.v1 import tierpick_pb2_grpc as pb_grpc
from tierpick.serving.conversations import Conversations
from tierpick.serving.decisions import DecisionLog, DecisionLogConfig
from tierpick.serving.guard import BudgetGuard, Target, describe_policy, guard_for, guard_gauges
from tierpick.serving.lifecycle import (
    TLS,
    AppSpec,
    GrpcApp,
    Metrics,
    ModelHolder,
    ServerConfig,
    enable_reflection,
    run_app,
    start_app,
)

log = logging.getLogger("tierpick.serve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TierRouter"].full_name


# A Classify whose text is longer than this is handled on a worker thread, not on the event
# loop (its text work is bounded, text.MAX_TURN_CHARS a turn, but not tiny).
LOOP_CHARS = 16_384


RELEASE_CHARS = 1 << 20  # a batch with more text than this returns its memory when done


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _text_chars(request: pb.ClassifyRequest) -> int:
    return len(request.prompt) + sum(len(m.content) for m in request.messages)


class TierRouterServicer(pb_grpc.TierRouterServicer):
    """Thin: conversion lives in :mod:`serving._convert`, limits and errors in the lifecycle's
    :class:`~tierpick.serving.lifecycle.CallGuard`.

    A Classify runs on the event loop (tens of microseconds, the prompt's work bounded by the
    manifest's cut lengths); a ClassifyBatch runs on the worker threads, so a large batch never
    holds up other calls or health checks.
    """

    def __init__(
        self,
        holder: ModelHolder,
        config: ServerConfig,
        metrics: Metrics,
        pool: futures.ThreadPoolExecutor,
        policy: RoutingPolicy | None = None,
        decisions: DecisionLog | None = None,
        guard: BudgetGuard | None = None,
    ) -> None:
        self.policy = policy or RoutingPolicy()  # the server's policy; requests override fields
        self.guard = guard
        self.decisions = decisions
        self.holder = holder
        self.config = config
        self.metrics = metrics
        self.pool = pool
        self.conversations = Conversations()  # a sticky policy's state: this server's

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        args = (
            self.holder.current,
            [request],
            None,
            self.policy,
            self.decisions,
            self.conversations,
            self.guard,
            self.config.familiarity,
        )
        if _text_chars(request) <= LOOP_CHARS:  # tens of microseconds: on the loop
            resp = _convert.classify(*args)[0]
        else:  # a large request is worked on a thread: the loop keeps answering everyone else
            loop = asyncio.get_running_loop()
            resp = (await loop.run_in_executor(self.pool, _convert.classify, *args))[0]
        self._count([resp])
        return resp

    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        n = len(request.requests)
        if n > self.config.max_batch:
            raise RequestError(
                f"batch of {n} requests is over the maximum of {self.config.max_batch}"
            )
        clf = self.holder.current
        default = request.policy if request.HasField("policy") else None
        responses = (
            await asyncio.get_running_loop().run_in_executor(
                self.pool, self._batch, clf, list(request.requests), default
            )
            if n
            else []
        )
        self._count(responses)
        return pb.ClassifyBatchResponse(responses=responses)

    def _count(self, responses: Sequence[pb.ClassifyResponse]) -> None:
        """The tiers routed to, and the distributions drift shows in."""
        for r in responses:
            self.metrics.tiers.labels(r.tier).inc()
        self.metrics.observe_reading(
            [s.tier for s in responses[0].scores] if responses else [],
            [[s.success_probability for s in r.scores] for r in responses],
            [r.familiarity for r in responses if r.HasField("familiarity")],
        )

    def _batch(
        self, clf: TierClassifier, requests: list[pb.ClassifyRequest], default: Any
    ) -> list[pb.ClassifyResponse]:
        """A batch on a worker thread; a large one hands its memory back when done."""
        responses = _convert.classify(
            clf,
            requests,
            default,
            self.policy,
            self.decisions,
            self.conversations,
            self.guard,
            self.config.familiarity,
        )
        if sum(_text_chars(r) for r in requests) > RELEASE_CHARS:
            release_memory()
        return responses

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        clf = self.holder.current
        info = _convert.model_info(clf, self.config.max_batch, request.with_evaluation)
        info.active_policy = self.describe_policy(clf)
        return info

    def describe_policy(self, clf: TierClassifier) -> str:
        """The policy calls that set none are routed by, now (the guard's weight included)."""
        policy = self.policy
        if self.guard is not None:
            policy = self.guard.policy(policy)
        return describe_policy(clf.router(policy), self.guard.target if self.guard else None)


def create_server(
    address: str = "127.0.0.1:0",
    model: str | None = None,
    config: ServerConfig | None = None,
    tls: TLS | tuple[bytes, bytes] | None = None,
    policy: RoutingPolicy | None = None,
    decision_log: DecisionLogConfig | None = None,
    hold: Target | None = None,
) -> GrpcApp:
    """Build, load and start a server; health is SERVING once the model is loaded and warm.

    Args:
        address: host:port to bind (port 0 = any free port; see ``GrpcApp.port``).
        model: model directory or ``models:/`` URI (None = the shipped default).
        config: limits and reload settings.
        tls: :class:`~tierpick.serving.lifecycle.TLS`, or (certificate chain PEM, private key
            PEM), to serve TLS.
        policy: the routing policy of calls that set none (``tierpick tune`` writes one); the
            fields a call sets override it. Checked against the model at start and at every
            reload (a model whose tiers it does not fit is refused).
        decision_log: log every decision there (:mod:`tierpick.serving.decisions`).
        hold: a target in plain terms (a tier's share, a spend, a quality) held on the
            traffic the server's policy routes (:mod:`tierpick.serving.guard`); the policy
            must use the utility rule.
    """
    config = config or ServerConfig()
    if isinstance(tls, tuple):
        tls = TLS(*tls)
    metrics = Metrics()
    policy = policy or RoutingPolicy()

    def fits(clf: TierClassifier) -> None:  # the policy must fit every model served
        clf.router(policy)
        if hold is not None and hold.kind == "share" and hold.tier not in clf.tiers:
            raise ConfigError(f"--hold: no tier {hold.tier!r} in {list(clf.tiers)}")

    if hold is not None and policy.min_success > 0:
        raise ConfigError("--hold adjusts the utility rule's cost weight: min_success must be 0")
    holder = ModelHolder(model, metrics, check=fits)  # loaded and warmed before anything listens
    guard = None
    if hold is not None:
        guard = guard_for(hold, holder.current, policy)
        guard_gauges(lambda: guard, metrics.registry)
    pool = futures.ThreadPoolExecutor(config.workers, thread_name_prefix="tierpick-batch")
    decisions = DecisionLog(decision_log) if decision_log is not None else None
    if decisions is not None:
        metrics.watch_decision_log(decisions)

    def add_services(server: Any) -> None:
        pb_grpc.add_TierRouterServicer_to_server(
            TierRouterServicer(holder, config, metrics, pool, policy, decisions, guard), server
        )
        enable_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))

    app = start_app(
        AppSpec(
            "tierpick-grpc",
            address,
            holder,
            metrics,
            config,
            add_services,
            services=(SERVICE_NAME,),
            tls=tls,
            pool=pool,
            logger=log,
            on_stop=(decisions.close,) if decisions is not None else (),
        )
    )
    active = describe_policy(holder.current.router(policy), hold)
    log.info(
        "serving %s (%s) on port %d; policy: %s",
        holder.current.manifest.model_name,
        holder.current.version,
        app.port,
        active,
    )
    metrics.policy.info({"policy": active})
    return app


def serve(
    host: str,
    port: int,
    model: str | None,
    config: ServerConfig,
    metrics_port: int | None,
    tls: TLS | None = None,
    policy: RoutingPolicy | None = None,
    decision_log: DecisionLogConfig | None = None,
    hold: Target | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (graceful: :meth:`GrpcApp.shutdown`); SIGHUP reloads the model."""
    app = create_server(f"{host}:{port}", model, config, tls, policy, decision_log, hold)
    return run_app(app, "tierpick serving", metrics_port, host)
