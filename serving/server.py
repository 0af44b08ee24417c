"""The gRPC service: ``TierRouter`` over a loaded model, with standard health, reflection,
Prometheus metrics, hot reload and graceful shutdown.

Build one with :func:`create_server`; :func:`serve` runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
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

from tierpick import classifier
from tierpick.classifier import TierClassifier
from tierpick.classifier._artifact import MANIFEST_FILE
from tierpick.classifier.errors import TierpickError
from tierpick.serving import _convert
from tierpick.serving._proto.tierpick.v1 import tierpick_pb2 as pb
from tierpick.serving._proto.tierpick.v1 import tierpick_pb2_grpc as pb_grpc

log = logging.getLogger("tierpick.serve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TierRouter"].full_name
WARMUP_PROMPT = "What is the capital of France?"


@dataclass(frozen=True)
class ServerConfig:
    """Serving limits and lifecycle settings.

    Attributes:
        max_batch: requests a ClassifyBatch may hold.
        max_concurrency: RPCs being handled at once; more get RESOURCE_EXHAUSTED at once. A
            call counts once its request has arrived: a stream that never sends its message
            holds no handler (the server is asynchronous) and only counts against
            ``max_streams_per_connection``.
        workers: threads that run ClassifyBatch (a single Classify runs on the event loop).
        drain_timeout: on stop, seconds in-flight calls get to finish before they are
            cancelled (a maximum batch of long prompts takes well under a second here).
        watch_seconds: > 0: poll the model directory's manifest for changes (hot reload).
        max_message_bytes: the largest request or response (a full batch of long prompts).
        drain_seconds: on stop, seconds of NOT_SERVING health while calls are still answered,
            so load balancers stop sending before the server refuses.
        max_streams_per_connection: concurrent HTTP/2 streams one connection may open.
        max_connection_age: seconds after which a connection is asked to go away (it gets
            ``drain_timeout`` more to finish), so no client holds streams forever.
    """

    max_batch: int = 256
    max_concurrency: int = 64
    workers: int = 2
    drain_timeout: float = 25.0
    watch_seconds: float = 2.0
    max_message_bytes: int = 64 * 1024 * 1024
    drain_seconds: float = 0.0
    max_streams_per_connection: int = 32
    max_connection_age: float = 600.0


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
        self._pending: str | None = None  # why the last changed directory was refused
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

    def reload(self, retry: bool = False) -> bool:
        """Load and verify the model again from its path; swap only if it is good.

        ``retry``: a watch retry of a directory refused before; the same refusal again is not
        logged or counted again.
        """
        with self._lock:
            stamp = self._manifest_stamp()
            try:
                new = self._load()
            except Exception as exc:  # any failure keeps the old model serving
                if not (retry and str(exc) == self._pending):
                    self.metrics.reloads.labels("refused").inc()
                    log.error("reload refused, still serving %s: %s", self.current.version, exc)
                self._stamp = stamp
                self._pending = str(exc)
                return False
            old = self.current.version
            self.current = new
            self._stamp = stamp
            self._pending = None
            self.metrics.reloads.labels("ok").inc()
            self._publish()
            log.info("reloaded model: %s -> %s", old, new.version)
            return True

    def changed(self) -> bool:
        return self._manifest_stamp() != self._stamp

    def poll(self) -> None:
        """The watch: reload when the manifest changed, and keep retrying while the directory
        is refused, as it is in the middle of a copy (manifest first, graph after): a deploy is
        picked up as soon as its files agree, without a SIGHUP."""
        if self.changed():
            if not self.reload():
                log.warning("retrying at every check until the model directory is consistent")
        elif self._pending is not None:
            self.reload(retry=True)


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
        metrics: Metrics,
        pool: futures.ThreadPoolExecutor,
    ) -> None:
        self.holder = holder
        self.config = config
        self.metrics = metrics
        self.pool = pool

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        resp = _convert.classify(self.holder.current, [request], None)[0]
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
                self.pool, _convert.classify, clf, list(request.requests), default
            )
            if n
            else []
        )
        for r in responses:
            self.metrics.tiers.labels(r.tier).inc()
        return pb.ClassifyBatchResponse(responses=responses)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return _convert.model_info(self.holder.current, self.config.max_batch)


@dataclass(frozen=True)
class _Malformed:
    """A request body that does not parse as the method's message (corrupt protobuf, invalid
    UTF-8 in a string field): the client's fault, answered INVALID_ARGUMENT."""

    error: str


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every TierRouter call goes through here: requests that do not parse and calls over the
    concurrency limit are refused, exceptions become status codes (bad input ->
    INVALID_ARGUMENT, anything else -> INTERNAL with the message logged), deadlines are
    honoured, and every outcome is counted by method and code."""

    def __init__(self, metrics: Metrics, max_concurrency: int) -> None:
        self.metrics = metrics
        self.max_concurrency = max_concurrency
        self.in_flight = 0  # touched only on the event loop

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
            try:
                return parse(data)
            except Exception as exc:  # protobuf's DecodeError and friends
                return _Malformed(f"{type(exc).__name__}: {exc}")

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            counted = False
            try:
                if isinstance(request, _Malformed):
                    code = grpc.StatusCode.INVALID_ARGUMENT
                    await context.abort(
                        code, f"the request is not a valid {method} message ({request.error})"
                    )
                if self.in_flight >= self.max_concurrency:
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED
                    await context.abort(
                        code, f"over {self.max_concurrency} calls in flight; retry with backoff"
                    )
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    await context.abort(code, "deadline expired before the request was handled")
                self.in_flight += 1
                counted = True
                self.metrics.in_flight.inc()
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except TierpickError as exc:  # bad request: PolicyError, RequestError, ...
                code = grpc.StatusCode.INVALID_ARGUMENT
                await context.abort(code, str(exc))
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code = grpc.StatusCode.INTERNAL
                log.exception("internal error in %s", method)
                await context.abort(code, f"internal error: {type(exc).__name__}")
            finally:
                if counted:
                    self.in_flight -= 1
                    self.metrics.in_flight.dec()
                self.metrics.requests.labels(method, code.name).inc()
                self.metrics.latency.labels(method).observe(time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )


class LoopThread:
    """An asyncio event loop on its own thread, so synchronous code (the CLI, tests, the
    signal-driven lifecycle) can own a ``grpc.aio`` server."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self._thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC core options shared by the RPC service and the gateway's processor."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        ("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.drain_timeout * 1000)),
    ]


def bind(server: Any, address: str, tls: TLS | None) -> int:
    """Bind ``address`` (TLS when given); a port in use or a bad address is one clear error."""
    try:
        if tls is not None:
            port = server.add_secure_port(address, tls.credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises "Failed to bind to address ..."
        raise TierpickError(f"cannot bind {address}: the port is in use or not local") from exc
    if port == 0:
        raise TierpickError(f"cannot bind {address}: the port is in use or not local")
    return int(port)


@dataclass(frozen=True)
class TLS:
    """Server TLS: certificate chain and key (PEM), and a CA that client certificates must be
    signed by (mutual TLS) when given."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    @classmethod
    def from_files(cls, cert: str | None, key: str | None, client_ca: str | None) -> TLS | None:
        """Read and check the files: a key that does not match its certificate, or a file that
        is not PEM, is refused with a message that says so (grpc would only fail to bind)."""
        if not (cert or key or client_ca):
            return None
        if not (cert and key):
            raise TierpickError("TLS needs both --tls-cert and --tls-key")
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise TierpickError(
                f"--tls-key {key} does not match --tls-cert {cert}, or one is not PEM ({exc})"
            ) from exc
        ca = None
        if client_ca:
            try:
                ssl.create_default_context(cafile=client_ca)
            except ssl.SSLError as exc:
                raise TierpickError(f"--tls-client-ca {client_ca} is not a PEM CA ({exc})") from exc
            ca = Path(client_ca).read_bytes()
        return cls(Path(cert).read_bytes(), Path(key).read_bytes(), ca)


@dataclass
class App:
    """A built server and everything it owns."""

    server: Any
    port: int
    holder: ModelHolder
    health: Any
    metrics: Metrics
    config: ServerConfig
    _stop_watch: threading.Event
    _loop: LoopThread
    _pool: futures.ThreadPoolExecutor

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

        async def set_all() -> None:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)

        self._loop.run(set_all())

    def shutdown(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING, new RPCs are refused, in-flight RPCs get ``grace`` (default
        the config's ``drain_timeout``) seconds to finish, then the server stops; idempotent."""
        if not self._loop.loop.is_running():
            return
        self.set_serving(False)
        self._stop_watch.set()
        if self.config.drain_seconds > 0:
            # still answering while health checkers notice NOT_SERVING and stop sending
            time.sleep(self.config.drain_seconds)
        timeout = self.config.drain_timeout if grace is None else grace
        self._loop.run(self.server.stop(timeout))
        self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def create_server(
    address: str = "127.0.0.1:0",
    model: str | None = None,
    config: ServerConfig | None = None,
    tls: TLS | tuple[bytes, bytes] | None = None,
) -> App:
    """Build, load and start a server; health is SERVING once the model is loaded and warm.

    Args:
        address: host:port to bind (port 0 = any free port; see ``App.port``).
        model: model directory or ``models:/`` URI (None = the shipped default).
        config: limits and reload settings.
        tls: :class:`TLS`, or (certificate chain PEM, private key PEM), to serve TLS.
    """
    from grpc_health.v1.health import aio as health_aio

    config = config or ServerConfig()
    if isinstance(tls, tuple):
        tls = TLS(*tls)
    metrics = Metrics()
    holder = ModelHolder(model, metrics)  # loaded and warmed before anything listens
    pool = futures.ThreadPoolExecutor(config.workers, thread_name_prefix="tierpick-batch")
    loop = LoopThread("tierpick-grpc")

    async def start() -> tuple[Any, Any, int]:
        server = grpc.aio.server(
            interceptors=[ErrorInterceptor(metrics, config.max_concurrency)],
            options=server_options(config),
        )
        health_servicer = health_aio.HealthServicer()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        pb_grpc.add_TierRouterServicer_to_server(
            TierRouterServicer(holder, config, metrics, pool), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = bind(server, address, tls)
        await server.start()
        return server, health_servicer, port

    try:
        server, health_servicer, port = loop.run(start())
    except BaseException:
        loop.close()
        pool.shutdown(wait=False)
        raise
    stop = threading.Event()
    app = App(server, port, holder, health_servicer, metrics, config, stop, loop, pool)
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
        app.holder.poll()


def serve(
    host: str,
    port: int,
    model: str | None,
    config: ServerConfig,
    metrics_port: int | None,
    tls: TLS | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (graceful: see :meth:`App.shutdown`); SIGHUP reloads the model."""
    app = create_server(f"{host}:{port}", model, config, tls)
    if metrics_port is not None:
        bound = app.metrics.serve_http(metrics_port, host)
        log.info("metrics on http://%s:%d/metrics (plain HTTP)", host, bound)
    print(f"tierpick serving on {host}:{app.port} (pid {os.getpid()})", flush=True)
    run_until_signalled(app.holder.reload)
    log.info("draining: up to %.0f s for in-flight calls", config.drain_timeout)
    app.shutdown()
    log.info("stopped")
    return 0


def run_until_signalled(reload: Callable[[], object], logger: logging.Logger | None = None) -> None:
    """Block until SIGTERM or SIGINT; SIGHUP calls ``reload`` (in a thread) meanwhile."""
    done = threading.Event()

    def on_term(signum: int, _frame: Any) -> None:
        (logger or log).info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=reload).start())
    done.wait()
