"""The gRPC service: ``TierRouter`` over a loaded model, with standard health, reflection,
Prometheus metrics, hot reload and graceful shutdown.

Build one with :func:`create_server`; :func:`serve` runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import classifier
from classifier import TierClassifier
from classifier._artifact import MANIFEST_FILE
from classifier.errors import TierpickError
from serving import _convert
from serving._proto.tierpick.v1 import tierpick_pb2 as pb
from serving._proto.tierpick.v1 import tierpick_pb2_grpc as pb_grpc

log = logging.getLogger("tierpick.serve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TierRouter"].full_name
WARMUP_PROMPT = "What is the capital of France?"


@dataclass(frozen=True)
class ServerConfig:
    """Serving limits. ``max_concurrency`` in-flight RPCs at most; more get RESOURCE_EXHAUSTED."""

    max_batch: int = 256
    max_concurrency: int = 64
    workers: int = 8
    grace_seconds: float = 5.0
    watch_seconds: float = 0.0  # > 0: poll the model directory's manifest for changes
    max_message_bytes: int = 64 * 1024 * 1024  # a full batch of long prompts fits
    drain_seconds: float = 0.0  # NOT_SERVING this long before refusing new calls (load balancers)


class Metrics:
    """Prometheus metrics in their own registry (several servers may live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tierpick_requests",
            "RPCs by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tierpick_request_seconds",
            "RPC handling time by method",
            ["method"],
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0),
            registry=self.registry,
        )
        self.tiers = Counter(
            "tierpick_routed", "Prompts routed, by tier", ["tier"], registry=self.registry
        )
        self.model = Info("tierpick_model", "The model being served", registry=self.registry)
        self.reloads = Counter(
            "tierpick_reloads", "Model reloads by outcome", ["outcome"], registry=self.registry
        )
        self.in_flight = Gauge("tierpick_in_flight", "RPCs being handled", registry=self.registry)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics on ``port`` (0 = any free port); returns the bound port."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


class ModelHolder:
    """The model being served. A reload verifies the new artifact (manifest, checksums, a
    smoke prediction) before swapping it in; a bad one is refused and the old one keeps
    serving."""

    def __init__(
        self,
        path: str | None,
        metrics: Metrics,
        check: Callable[[TierClassifier], None] | None = None,
    ) -> None:
        self.path = path
        self.metrics = metrics
        self.check = check  # more conditions a model must meet (e.g. the gateway's tiers)
        self._lock = threading.Lock()
        self.current: TierClassifier = self._load()
        self._publish()
        self._stamp = self._manifest_stamp()

    def _load(self) -> TierClassifier:
        clf = classifier.load(self.path)
        if self.check is not None:
            self.check(clf)
        p = clf.predict_proba([WARMUP_PROMPT])  # warm-up and smoke test
        if p.shape != (1, len(clf.tiers)) or not ((p >= 0) & (p <= 1)).all():
            raise TierpickError(f"model at {self.path} failed its smoke prediction: {p}")
        return clf

    def _publish(self) -> None:
        m = self.current.manifest
        self.metrics.model.info({"name": m.model_name, "version": m.model_version})

    def _manifest_stamp(self) -> tuple[float, int] | None:
        try:
            st = (Path(self.current.model_dir) / MANIFEST_FILE).stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def reload(self) -> bool:
        """Load and verify the model again from its path; swap only if it is good."""
        with self._lock:
            try:
                new = self._load()
            except Exception as exc:  # any failure keeps the old model serving
                self.metrics.reloads.labels("refused").inc()
                log.error("reload refused, still serving %s: %s", self.current.version, exc)
                self._stamp = self._manifest_stamp()
                return False
            old = self.current.version
            self.current = new
            self._stamp = self._manifest_stamp()
            self.metrics.reloads.labels("ok").inc()
            self._publish()
            log.info("reloaded model: %s -> %s", old, new.version)
            return True

    def changed(self) -> bool:
        return self._manifest_stamp() != self._stamp


class TierRouterServicer(pb_grpc.TierRouterServicer):
    """Thin: conversion lives in :mod:`serving._convert`, errors in :class:`ErrorInterceptor`."""

    def __init__(self, holder: ModelHolder, config: ServerConfig, metrics: Metrics) -> None:
        self.holder = holder
        self.config = config
        self.metrics = metrics

    def Classify(
        self, request: pb.ClassifyRequest, context: grpc.ServicerContext
    ) -> pb.ClassifyResponse:
        clf = self.holder.current
        resp = _convert.classify(clf, [request], None)[0]
        self.metrics.tiers.labels(resp.tier).inc()
        return resp

    def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: grpc.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        n = len(request.requests)
        if n > self.config.max_batch:
            raise _convert.RequestError(
                f"batch of {n} requests is over the maximum of {self.config.max_batch}"
            )
        clf = self.holder.current
        default = request.policy if request.HasField("policy") else None
        responses = _convert.classify(clf, list(request.requests), default) if n else []
        for r in responses:
            self.metrics.tiers.labels(r.tier).inc()
        return pb.ClassifyBatchResponse(responses=responses)

    def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        return _convert.model_info(self.holder.current, self.config.max_batch)


class ErrorInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Maps exceptions to status codes (bad input -> INVALID_ARGUMENT, anything else ->
    INTERNAL with the message logged), honours deadlines, and records metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        metrics = self.metrics

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            metrics.in_flight.inc()
            try:
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    context.abort(code, "deadline expired before the request was handled")
                return inner(request, context)
            except TierpickError as exc:  # bad request: PolicyError, RequestError, ...
                code = grpc.StatusCode.INVALID_ARGUMENT
                context.abort(code, str(exc))
            except Exception as exc:
                if code != grpc.StatusCode.OK:  # our own abort above: already a status
                    raise
                code = grpc.StatusCode.INTERNAL
                log.exception("internal error in %s", method)
                context.abort(code, f"internal error: {type(exc).__name__}")
            finally:
                metrics.in_flight.dec()
                metrics.requests.labels(method, code.name).inc()
                metrics.latency.labels(method).observe(time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class App:
    """A built server and everything it owns."""

    server: grpc.Server
    port: int
    holder: ModelHolder
    health: health.HealthServicer
    metrics: Metrics
    config: ServerConfig
    _stop_watch: threading.Event

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def shutdown(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING, new RPCs are refused, in-flight RPCs finish, then stop."""
        self.set_serving(False)
        self._stop_watch.set()
        if self.config.drain_seconds > 0:
            # still answering while health checkers notice NOT_SERVING and stop sending
            time.sleep(self.config.drain_seconds)
        self.server.stop(self.config.grace_seconds if grace is None else grace).wait()


def create_server(
    address: str = "127.0.0.1:0",
    model: str | None = None,
    config: ServerConfig | None = None,
    tls: tuple[bytes, bytes] | None = None,
) -> App:
    """Build, load and start a server; health is SERVING once the model is loaded and warm.

    Args:
        address: host:port to bind (port 0 = any free port; see ``App.port``).
        model: model directory or ``models:/`` URI (None = the shipped default).
        config: limits and reload settings.
        tls: (certificate chain PEM, private key PEM) to serve TLS instead of plaintext.
    """
    config = config or ServerConfig()
    metrics = Metrics()
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="tierpick"),
        interceptors=[ErrorInterceptor(metrics)],
        maximum_concurrent_rpcs=config.max_concurrency,
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
    )
    holder = ModelHolder(model, metrics)
    pb_grpc.add_TierRouterServicer_to_server(TierRouterServicer(holder, config, metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise TierpickError(f"cannot bind {address}")
    server.start()
    stop = threading.Event()
    app = App(server, port, holder, health_servicer, metrics, config, stop)
    app.set_serving(True)
    if config.watch_seconds > 0:
        threading.Thread(target=_watch, args=(app,), daemon=True, name="tierpick-watch").start()
    log.info(
        "serving %s (%s) on port %d",
        holder.current.manifest.model_name,
        holder.current.version,
        port,
    )
    return app


def _watch(app: App) -> None:
    while not app._stop_watch.wait(app.config.watch_seconds):
        if app.holder.changed():
            app.holder.reload()


def serve(
    host: str,
    port: int,
    model: str | None,
    config: ServerConfig,
    metrics_port: int | None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (graceful) ; SIGHUP reloads the model."""
    tls = None
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise TierpickError("TLS needs both --tls-cert and --tls-key")
        tls = (Path(tls_cert).read_bytes(), Path(tls_key).read_bytes())
    app = create_server(f"{host}:{port}", model, config, tls)
    if metrics_port is not None:
        bound = app.metrics.serve_http(metrics_port, host)
        log.info("metrics on http://%s:%d/metrics", host, bound)
    print(f"tierpick serving on {host}:{app.port} (pid {os.getpid()})", flush=True)
    run_until_signalled(app.holder.reload)
    app.shutdown()
    log.info("stopped")
    return 0


def run_until_signalled(reload: Callable[[], object]) -> None:
    """Block until SIGTERM or SIGINT; SIGHUP calls ``reload`` (in a thread) meanwhile."""
    done = threading.Event()

    def on_term(signum: int, _frame: Any) -> None:
        log.info("signal %d: draining", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=reload).start())
    done.wait()
