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
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from tierpick.classifier import RoutingPolicy, TierClassifier
from tierpick.classifier.errors import TierpickError
from tierpick.serving import _convert
from tierpick.serving._proto.tierpick.v1 import tierpick_pb2 as pb
from tierpick.serving._proto.tierpick.v1 import tierpick_pb2_grpc as pb_grpc
from tierpick.serving.decisions import DecisionLog, DecisionLogConfig
from tierpick.serving.lifecycle import (
    TLS,
    GrpcApp,
    Metrics,
    ModelHolder,
    OpenCalls,
    ServerConfig,
    run_app,
    start_app,
)

log = logging.getLogger("tierpick.serve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TierRouter"].full_name


class ServiceMetrics(Metrics):
    """The shared metrics, plus the gRPC server's under the names the common interceptors use
    (go-grpc-prometheus, py-grpc-prometheus): ``grpc_server_started_total``,
    ``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}`` (every code of
    every TierRouter method from the start, at 0) and ``grpc_server_handling_seconds``; health
    checks and reflection are not counted in them."""

    def __init__(self) -> None:
        super().__init__()
        from prometheus_client import Counter, Gauge, Histogram

        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server", labels, registry=self.registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure",
            [*labels, "grpc_code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server",
            labels,
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tierpick_in_flight",
            "TierRouter calls accepted and not yet answered",
            registry=self.registry,
        )
        for method in pb.DESCRIPTOR.services_by_name["TierRouter"].methods:
            key = ("unary", SERVICE_NAME, method.name)
            self.started.labels(*key)
            self.latency.labels(*key)
            for code in grpc.StatusCode:
                self.handled.labels(*key, code.name)

    def count(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        key = ("unary", SERVICE_NAME, method)
        self.handled.labels(*key, code.name).inc()
        self.latency.labels(*key).observe(seconds)


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
    """Thin: conversion lives in :mod:`serving._convert`, errors in :class:`ErrorInterceptor`.

    A Classify runs on the event loop (tens of microseconds, the prompt's work bounded by the
    manifest's cut lengths); a ClassifyBatch runs on the worker threads, so a large batch never
    holds up other calls or health checks.
    """

    def __init__(
        self,
        holder: ModelHolder,
        config: ServerConfig,
        metrics: ServiceMetrics,
        pool: futures.ThreadPoolExecutor,
        policy: RoutingPolicy | None = None,
        decisions: DecisionLog | None = None,
    ) -> None:
        self.policy = policy or RoutingPolicy()  # the server's policy; requests override fields
        self.decisions = decisions
        self.holder = holder
        self.config = config
        self.metrics = metrics
        self.pool = pool

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        args = (self.holder.current, [request], None, self.policy, self.decisions)
        if _text_chars(request) <= LOOP_CHARS:  # tens of microseconds: on the loop
            resp = _convert.classify(*args)[0]
        else:  # a large request is worked on a thread: the loop keeps answering everyone else
            loop = asyncio.get_running_loop()
            resp = (await loop.run_in_executor(self.pool, _convert.classify, *args))[0]
        self.metrics.tiers.labels(resp.tier).inc()
        return resp

    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        n = len(request.requests)
        if n > self.config.max_batch:
            raise _convert.RequestError(
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
        for r in responses:
            self.metrics.tiers.labels(r.tier).inc()
        return pb.ClassifyBatchResponse(responses=responses)

    def _batch(
        self, clf: TierClassifier, requests: list[pb.ClassifyRequest], default: Any
    ) -> list[pb.ClassifyResponse]:
        """A batch on a worker thread; a large one hands its memory back when done."""
        responses = _convert.classify(clf, requests, default, self.policy, self.decisions)
        if sum(_text_chars(r) for r in requests) > RELEASE_CHARS:
            release_memory()
        return responses

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return _convert.model_info(
            self.holder.current, self.config.max_batch, request.with_evaluation
        )


@dataclass(frozen=True)
class _Malformed:
    """A request body that does not parse as the method's message (corrupt protobuf, invalid
    UTF-8 in a string field): the client's fault, answered INVALID_ARGUMENT."""

    error: str


@dataclass(frozen=True)
class _OverBudget:
    """A request not parsed: the bytes of the requests being handled would pass the budget
    (answered RESOURCE_EXHAUSTED)."""

    size: int


class ByteBudget:
    """The request bytes of the calls being handled, against a budget: a request that would
    pass it is refused before it is parsed, so ``--max-concurrency`` large batches cannot hold
    gigabytes (measured before: 24 concurrent 52 MB batches took the process from 132 MB to
    1,285 MB). A request larger than the whole budget is refused outright."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0

    def take(self, size: int) -> bool:
        if self.used + size > self.budget:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


@dataclass(frozen=True)
class _Sized:
    """A parsed request and the bytes it came in."""

    message: Any
    size: int


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every TierRouter call goes through here: requests that do not parse, calls over the
    concurrency limit and calls that arrive while the server stops are refused, exceptions
    become status codes (bad input -> INVALID_ARGUMENT, anything else -> INTERNAL with the
    message logged), deadlines are honoured, and every outcome is counted by method and code.
    An accepted call is open (``calls``) until its status has been sent."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        max_concurrency: int,
        calls: OpenCalls,
        max_request_bytes: int = 1 << 30,
    ) -> None:
        self.metrics = metrics
        self.max_concurrency = max_concurrency
        self.calls = calls
        self.bytes = ByteBudget(max_request_bytes)

    def _refusal(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> tuple[grpc.StatusCode, str] | None:
        """Why a call is refused before its handler runs, or None."""
        if self.calls.draining:
            return grpc.StatusCode.UNAVAILABLE, "the server is stopping; retry on a replica"
        if isinstance(request, _Malformed):
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {method} message ({request.error})",
            )
        if isinstance(request, _OverBudget):
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a request of {request.size} bytes does not fit the {self.bytes.budget} bytes "
                "of requests handled at once; retry with backoff, or send smaller batches",
            )
        if self.calls.open >= self.max_concurrency:
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"over {self.max_concurrency} calls in flight; retry with backoff",
            )
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "deadline expired before the request was handled",
            )
        return None

    async def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        if not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler  # health and reflection: not limited, not counted as TierRouter
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        parse = handler.request_deserializer

        def deserialize(data: bytes) -> Any:
            if not self.bytes.take(len(data)):
                return _OverBudget(len(data))
            try:
                return _Sized(parse(data), len(data))
            except Exception as exc:  # protobuf's DecodeError and friends
                self.bytes.give(len(data))
                return _Malformed(f"{type(exc).__name__}: {exc}")

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # every outcome is counted before its status goes out: a client that has its
            # answer finds it counted
            start = time.perf_counter()
            self.metrics.started.labels("unary", SERVICE_NAME, method).inc()
            if isinstance(request, _Sized):  # its bytes count until the call is done
                size = request.size
                context.add_done_callback(lambda _ctx: self.bytes.give(size))
                request = request.message
            refused = self._refusal(method, request, context)
            if refused is None:
                self.calls.enter(context)
                try:
                    response = await inner(request, context)
                except grpc.aio.AbortError:
                    raise  # TierRouter's handlers raise, they do not abort
                except TierpickError as exc:  # bad request: PolicyError, RequestError, ...
                    refused = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
                except asyncio.CancelledError:
                    self.metrics.count(
                        method, grpc.StatusCode.CANCELLED, time.perf_counter() - start
                    )
                    raise
                except Exception as exc:
                    log.exception("internal error in %s", method)
                    refused = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
                else:
                    self.metrics.count(method, grpc.StatusCode.OK, time.perf_counter() - start)
                    return response
            self.metrics.count(method, refused[0], time.perf_counter() - start)
            await context.abort(*refused)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )


def create_server(
    address: str = "127.0.0.1:0",
    model: str | None = None,
    config: ServerConfig | None = None,
    tls: TLS | tuple[bytes, bytes] | None = None,
    policy: RoutingPolicy | None = None,
    decision_log: DecisionLogConfig | None = None,
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
    """
    config = config or ServerConfig()
    if isinstance(tls, tuple):
        tls = TLS(*tls)
    metrics = ServiceMetrics()
    policy = policy or RoutingPolicy()

    def fits(clf: TierClassifier) -> None:  # the policy must fit every model served
        clf.router(policy)

    holder = ModelHolder(model, metrics, check=fits)  # loaded and warmed before anything listens
    pool = futures.ThreadPoolExecutor(config.workers, thread_name_prefix="tierpick-batch")
    calls = OpenCalls()
    metrics.in_flight.set_function(lambda: calls.open)
    decisions = DecisionLog(decision_log) if decision_log is not None else None
    if decisions is not None:
        metrics.watch_decision_log(decisions)

    def add_services(server: Any) -> None:
        pb_grpc.add_TierRouterServicer_to_server(
            TierRouterServicer(holder, config, metrics, pool, policy, decisions), server
        )
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    app = start_app(
        "tierpick-grpc",
        holder,
        metrics,
        config,
        address,
        add_services,
        health_names=("", SERVICE_NAME),
        tls=tls,
        interceptors=[
            ErrorInterceptor(metrics, config.max_concurrency, calls, config.max_request_bytes)
        ],
        pool=pool,
        logger=log,
        calls=calls,
        on_stop=[decisions.close] if decisions is not None else [],
    )
    log.info(
        "serving %s (%s) on port %d",
        holder.current.manifest.model_name,
        holder.current.version,
        app.port,
    )
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
) -> int:
    """Run until SIGTERM/SIGINT (graceful: :meth:`GrpcApp.shutdown`); SIGHUP reloads the model."""
    app = create_server(f"{host}:{port}", model, config, tls, policy, decision_log)
    return run_app(app, "tierpick serving", metrics_port, host)
