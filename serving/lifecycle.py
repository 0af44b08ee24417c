"""The lifecycle every tierpick gRPC server shares: the RPC service
(:mod:`tierpick.serving.service`) and the gateway's ext_proc processor
(:mod:`tierpick.serving.gateway`) are both a :class:`GrpcApp`.

- the model: :class:`ModelHolder` loads, checks and warms it before anything listens, reloads it
  on SIGHUP or when its manifest changes (the watch), and keeps the old one on a bad artifact;
- the server: ``grpc.aio`` on an event-loop thread (:class:`LoopThread`), bound by :func:`bind`
  (TLS or plain), with the shared limits of :class:`ServerConfig` (:func:`server_options`);
- health: NOT_SERVING until the model is warm and the port bound, SERVING while up,
  NOT_SERVING again at stop, then a drain of in-flight calls (:meth:`GrpcApp.shutdown`);
- signals: :func:`run_app` blocks until SIGTERM/SIGINT, reloading on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ConfigDict, Field, with_config

from tierpick import classifier
from tierpick.classifier import TierClassifier
from tierpick.classifier.artifact import MANIFEST_FILE
from tierpick.classifier.errors import TierpickError
from tierpick.classifier.runtime import default_model_dir
from tierpick.classifier.settings import Flag

log = logging.getLogger("tierpick.serve")
WARMUP_PROMPT = "What is the capital of France?"


Positive = Annotated[int, Field(strict=True, ge=1)]
Seconds = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True)
class ServerConfig:
    """Serving limits and lifecycle settings, shared by every gRPC app; ``tierpick serve``'s
    flags are built from the fields that carry a :class:`~tierpick.classifier.settings.Flag`.

    A call counts against ``max_concurrency`` once its request has arrived: a stream that never
    sends its message holds no handler (the server is asynchronous) and only counts against
    ``max_streams_per_connection``.
    """

    max_batch: Annotated[Positive, Flag("--max-batch", "requests a ClassifyBatch may hold")] = 256
    max_concurrency: Annotated[
        Positive,
        Flag("--max-concurrency", "calls handled at once; more get RESOURCE_EXHAUSTED at once"),
    ] = 256
    workers: Annotated[
        Positive,
        Flag("--workers", "threads that run ClassifyBatch (a Classify runs on the event loop)"),
    ] = 2
    drain_timeout: Annotated[
        Seconds,
        Flag(
            "--drain-timeout",
            "on stop, seconds in-flight calls get to finish before they are cancelled",
        ),
    ] = 25.0
    watch_seconds: Annotated[
        Seconds,
        Flag("--watch", "seconds between checks of the model's manifest for hot reload (0: off)"),
    ] = 2.0
    # the largest request or response: a full batch of the longest prompts a model reads (256 x
    # 4 x 1,536 characters, up to 4 bytes each: 6.3 MB) fits; chat history beyond what is
    # classified is the client's to trim
    max_message_bytes: Positive = 16 * 1024 * 1024
    drain_seconds: Annotated[
        Seconds,
        Flag(
            "--drain",
            "on stop, seconds of NOT_SERVING health while calls are still answered, so load "
            "balancers stop sending before the server refuses",
        ),
    ] = 0.0
    # more streams than calls handled at once: a client's calls beyond the concurrency limit
    # get RESOURCE_EXHAUSTED, never a refused stream (32 refused 3 to 30 of 64 calls on one
    # channel)
    max_streams_per_connection: Annotated[
        Positive, Flag("--max-streams", "concurrent HTTP/2 streams one client connection may open")
    ] = 512
    # seconds after which a connection is asked to go away (it gets drain_timeout more to
    # finish), so no client holds streams forever
    max_connection_age: Annotated[Seconds, Field(gt=0)] = 600.0
    max_request_bytes: Annotated[
        Positive,
        Flag(
            "--max-request-mb",
            "MB of requests handled at once (a request past it: RESOURCE_EXHAUSTED, unparsed)",
            unit=1 << 20,
        ),
    ] = 128 * 1024 * 1024
    familiarity: Annotated[
        bool,
        Field(strict=True),
        Flag(
            "--no-familiarity",
            "do not measure each prompt's familiarity to the training data (drift metrics; "
            "about 50 us a prompt)",
            negate=True,
        ),
    ] = True


OTHER_STREAMS_GRACE = 1.0  # seconds left to streams that are not the app's calls on stop


LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0)


def grpc_type(client_streaming: bool, server_streaming: bool) -> str:
    """A method's ``grpc_type`` label, as go-grpc-prometheus names it."""
    if client_streaming and server_streaming:
        return "bidi_stream"
    return "client_stream" if client_streaming else "server_stream" if server_streaming else "unary"


class Metrics:
    """Prometheus metrics in their own registry (several servers may live in one process): the
    process and Python runtime collectors operators already alert on, and what every tierpick
    server shares: the model served, reloads, prompts routed per tier, and the gRPC server's
    ``grpc_server_started_total``, ``grpc_server_handled_total{grpc_type,grpc_service,
    grpc_method,grpc_code}`` and ``grpc_server_handling_seconds`` for the app's own services
    (:class:`CallGuard` counts them). Every labelled series exists from the start, at 0, so the
    first event shows in ``increase()``."""

    def __init__(self) -> None:
        from prometheus_client import (
            GC_COLLECTOR,
            PLATFORM_COLLECTOR,
            PROCESS_COLLECTOR,
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            Info,
        )

        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.tiers = Counter(
            "tierpick_routed", "Prompts routed, by tier", ["tier"], registry=self.registry
        )
        self.model = Info("tierpick_model", "The model being served", registry=self.registry)
        self.policy = Info(
            "tierpick_policy", "The policy of calls that set none", registry=self.registry
        )
        self.reloads = Counter(
            "tierpick_reloads", "Model reloads by outcome", ["outcome"], registry=self.registry
        )
        for outcome in ("ok", "refused"):
            self.reloads.labels(outcome)
        # the gRPC server's, under the names the common interceptors use (go-grpc-prometheus,
        # py-grpc-prometheus); health checks and reflection are not counted in them
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.grpc_started = Counter(
            "grpc_server_started", "RPCs started on the server", labels, registry=self.registry
        )
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure",
            [*labels, "grpc_code"],
            registry=self.registry,
        )
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tierpick_in_flight",
            "The app's calls accepted and not yet answered",
            registry=self.registry,
        )

        self.familiarity = Histogram(
            "tierpick_prompt_familiarity",
            "How ordinary each classified prompt would be among the training prompts (0: less "
            "like them than any; about 10% of in-distribution prompts are under 0.05)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0),
            registry=self.registry,
        )
        self.probability = Histogram(
            "tierpick_success_probability",
            "Each classified prompt's calibrated success probability, by tier",
            ["tier"],
            buckets=tuple(round(0.1 * i, 1) for i in range(1, 11)),
            registry=self.registry,
        )
        self._probability_series: dict[str, Any] = {}  # tier -> its series, looked up once

    def observe_reading(self, tiers: Sequence[str], proba: Any, familiarity: Any = None) -> None:
        """The distributions drift shows in: each prompt's probabilities and familiarity."""
        series = [self._probability_of(t) for t in tiers]
        for row in proba:
            for one, p in zip(series, row, strict=True):
                one.observe(float(p))
        for f in familiarity if familiarity is not None else ():
            self.familiarity.observe(float(f))

    def _probability_of(self, tier: str) -> Any:
        """The tier's probability histogram series, looked up once (the request path)."""
        series = self._probability_series.get(tier)
        if series is None:
            series = self._probability_series[tier] = self.probability.labels(tier)
        return series

    def track(self, services: Sequence[str]) -> None:
        """Create every series of ``services``' methods, every code at 0 (see the class)."""
        from google.protobuf import descriptor_pool

        pool = descriptor_pool.Default()
        for service in services:
            for method in pool.FindServiceByName(service).methods:
                key = (grpc_type(method.client_streaming, method.server_streaming), service)
                self.grpc_started.labels(*key, method.name)
                self.grpc_seconds.labels(*key, method.name)
                for code in grpc.StatusCode:
                    self.grpc_handled.labels(*key, method.name, code.name)

    def count(self, key: tuple[str, str, str], code: grpc.StatusCode, seconds: float) -> None:
        """One call of ``key`` (type, service, method) ended with ``code``."""
        self.grpc_handled.labels(*key, code.name).inc()
        self.grpc_seconds.labels(*key).observe(seconds)

    def watch_decision_log(self, decisions: Any) -> None:
        """Export a :class:`~tierpick.serving.decisions.DecisionLog`'s counts."""
        from prometheus_client import Gauge

        for name, what in (("written", "written to"), ("dropped", "dropped from")):
            gauge = Gauge(
                f"tierpick_decision_log_{name}_rows",
                f"Decisions {what} the decision log since start (dropped: its queue was full "
                "or the disk failed)",
                registry=self.registry,
            )
            gauge.set_function(functools.partial(getattr, decisions, name))

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
        for tier in m.tier_names:
            self.metrics.tiers.labels(tier)
            self.metrics.probability.labels(tier)

    def _manifest_stamp(self) -> tuple[str, float, int] | None:
        """Where the served path points now and its manifest's mtime and size: a symlink
        swapped to another directory is a change even when the manifests look alike."""
        local = self.path is None or not str(self.path).startswith(("models:/", "runs:/"))
        where = (
            (Path(self.path) if self.path is not None else default_model_dir())
            if local
            else Path(self.current.model_dir)
        )
        try:
            st = (where / MANIFEST_FILE).stat()
            real = os.path.realpath(where)
        except OSError:
            return None
        return (real, st.st_mtime, st.st_size)

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


class OpenCalls:
    """A server's calls from the moment they are accepted until gRPC has sent their status, a
    later moment than the handler's return (the response is still to be serialized and
    written). Touched only on the event loop.

    A stop waits for these before it stops the gRPC server (:meth:`GrpcApp.shutdown`). Once
    its shutdown has begun, gRPC closes a connection the moment the last call on it ends, and
    that close can reset the connection before the client has read a large response: the client
    sees UNAVAILABLE instead of the answer it was sent (measured here: 3 of 55 stops during a
    3.7 MB batch answer; 0 of 70 since). A connection stopped with no call open goes through
    gRPC's graceful GOAWAY, whose ping the client answers only after reading what came before.
    """

    def __init__(self) -> None:
        self.open = 0
        self.draining = False
        self._idle: asyncio.Event | None = None

    def enter(self, context: grpc.aio.ServicerContext) -> None:
        """Count an accepted call until it ends, however it ends (answer, abort, cancel)."""
        self.open += 1
        context.add_done_callback(self._leave)

    def _leave(self, _context: object) -> None:
        self.open -= 1
        if self.open == 0 and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout: float) -> None:
        """From now on new calls are to be refused; return once none is open, or at
        ``timeout``."""
        self.draining = True
        if self.open == 0:
            return
        self._idle = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)


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


@dataclass
class _Outcome:
    """How an accepted call's handler ended: None, or the status it is refused with."""

    refused: tuple[grpc.StatusCode, str] | None = None


class CallGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every call of an app's own services goes through here, whatever the app: calls that
    arrive while the server stops and calls over the concurrency limit are refused, exceptions
    become status codes (bad input, :class:`TierpickError` -> INVALID_ARGUMENT, anything else
    -> INTERNAL with the message logged), deadlines are honoured, and every outcome is counted
    by method and code (:class:`Metrics`). An accepted call is open (``calls``) until its
    status has been sent. A unary request is also held to the byte budget, and one that does
    not parse is answered INVALID_ARGUMENT. Health and reflection pass untouched."""

    def __init__(
        self, metrics: Metrics, config: ServerConfig, calls: OpenCalls, services: Sequence[str]
    ) -> None:
        self.metrics = metrics
        self.max_concurrency = config.max_concurrency
        self.calls = calls
        self.bytes = ByteBudget(config.max_request_bytes)
        self.prefixes = tuple(f"/{s}/" for s in services)

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

    @contextlib.asynccontextmanager
    async def _handled(
        self, key: tuple[str, str, str], start: float, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[_Outcome]:
        """An accepted call's handler: the call is open until its status is sent; an exception
        becomes the status it is refused with (bad input, :class:`TierpickError` ->
        INVALID_ARGUMENT, anything else -> INTERNAL, logged); success and cancellation are
        counted here, a refusal by the caller once it aborts."""
        outcome = _Outcome()
        self.calls.enter(context)
        try:
            yield outcome
        except grpc.aio.AbortError:
            raise  # the apps' handlers raise, they do not abort
        except asyncio.CancelledError:
            self.metrics.count(key, grpc.StatusCode.CANCELLED, time.perf_counter() - start)
            raise
        except Exception as exc:
            if isinstance(exc, TierpickError):  # bad request: PolicyError, RequestError, ...
                outcome.refused = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            else:
                log.exception("internal error in %s", key[2])
                outcome.refused = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
        else:
            self.metrics.count(key, grpc.StatusCode.OK, time.perf_counter() - start)

    async def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefixes):
            return handler  # health and reflection: not limited, not counted
        service, method = details.method[1:].rsplit("/", 1)
        if handler.unary_unary is not None:
            return self._unary(handler, (grpc_type(False, False), service, method))
        if handler.stream_stream is not None:
            return self._bidi(handler, (grpc_type(True, True), service, method))
        return handler  # no such methods in tierpick's services

    def _unary(self, handler: Any, key: tuple[str, str, str]) -> Any:
        method, inner, parse = key[2], handler.unary_unary, handler.request_deserializer

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
            self.metrics.grpc_started.labels(*key).inc()
            if isinstance(request, _Sized):  # its bytes count until the call is done
                size = request.size
                context.add_done_callback(lambda _ctx: self.bytes.give(size))
                request = request.message
            refused = self._refusal(method, request, context)
            if refused is None:
                async with self._handled(key, start, context) as outcome:
                    response = await inner(request, context)
                if outcome.refused is None:
                    return response
                refused = outcome.refused
            self.metrics.count(key, refused[0], time.perf_counter() - start)
            await context.abort(*refused)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )

    def _bidi(self, handler: Any, key: tuple[str, str, str]) -> Any:
        """A bidirectional stream (the gateway's ext_proc: one per HTTP request): limited,
        counted and drained like a unary call, from its first message to its status."""
        method, inner = key[2], handler.stream_stream

        async def wrapped(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            self.metrics.grpc_started.labels(*key).inc()
            refused = self._refusal(method, None, context)
            if refused is None:
                async with self._handled(key, start, context) as outcome:
                    async for response in inner(requests, context):
                        yield response
                if outcome.refused is None:
                    return
                refused = outcome.refused
            self.metrics.count(key, refused[0], time.perf_counter() - start)
            await context.abort(*refused)

        return grpc.stream_stream_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class GrpcApp:
    """A started ``grpc.aio`` server and everything it owns; build one with :func:`start_app`."""

    name: str
    server: Any
    port: int
    holder: ModelHolder
    health: Any
    metrics: Metrics
    config: ServerConfig
    health_names: tuple[str, ...]
    _loop: LoopThread
    _pool: futures.ThreadPoolExecutor | None = None
    logger: logging.Logger = log
    calls: OpenCalls = field(default_factory=OpenCalls)
    on_stop: Sequence[Callable[[], None]] = ()  # run once the server has stopped
    _stop_watch: threading.Event = field(default_factory=threading.Event)

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

        async def set_all() -> None:
            for name in self.health_names:
                await self.health.set(name, status)

        self._loop.run(set_all())

    def shutdown(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING, new calls are refused, in-flight calls get ``grace`` (default
        the config's ``drain_timeout``) seconds to finish, then the server stops; idempotent.

        With :class:`OpenCalls`, the app's own calls are drained before the gRPC server is
        stopped (see there why); the server's stop then gets what is left of ``grace``."""
        if not self._loop.loop.is_running():
            return
        self.set_serving(False)
        self._stop_watch.set()
        if self.config.drain_seconds > 0:
            # still answering while health checkers notice NOT_SERVING and stop sending
            time.sleep(self.config.drain_seconds)
        timeout = self.config.drain_timeout if grace is None else grace

        async def stop() -> None:
            end = time.monotonic() + timeout
            await self.health.enter_graceful_shutdown()  # watchers are told NOT_SERVING
            await self.calls.drain(timeout)
            # the app's own calls are answered: what is left open is health Watch streams
            # and reflection, which would otherwise hold the stop for the whole drain
            # timeout (27 s against 1.7 s, measured with one Watch open)
            grace = min(OTHER_STREAMS_GRACE, max(0.0, end - time.monotonic()))
            await self.server.stop(max(0.0, min(grace, end - time.monotonic())))
            await asyncio.sleep(0.05)  # the loop finishes its last completions before it stops

        self._loop.run(stop())
        self._loop.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for hook in self.on_stop:
            hook()
        self.logger.info("stopped")

    def _watch(self) -> None:
        while not self._stop_watch.wait(self.config.watch_seconds):
            self.holder.poll()


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_reflection_v1_descriptor() -> None:
    """``grpc/reflection/v1/reflection.proto`` in the default descriptor pool: grpcio-reflection
    ships only v1alpha, whose messages are v1's under another package (same fields, same
    numbers), so v1's file is v1alpha's renamed."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from grpc_reflection.v1alpha import reflection_pb2

    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_REFLECTION_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = _REFLECTION_V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")
    messages = list(proto.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)


def enable_reflection(server: Any, services: Sequence[str]) -> None:
    """Server reflection, v1 and v1alpha (grpcurl, Postman and most tools ask v1 first), for
    ``services`` and the reflection services themselves."""
    from grpc_reflection.v1alpha import reflection, reflection_pb2
    from grpc_reflection.v1alpha._async import ReflectionServicer

    _add_reflection_v1_descriptor()
    names = (*services, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


@dataclass(frozen=True)
class AppSpec:
    """What a gRPC app is made of; :func:`start_app` starts one.

    Attributes:
        name: the app's name (its threads and logs).
        address: host:port to bind (port 0 = any free port).
        holder: the loaded model.
        metrics: its registry (:class:`Metrics` or a subclass with the app's own).
        config: limits and lifecycle settings.
        add_services: registers the app's servicers on the server.
        services: the full names of the app's own services: health answers for each (and for
            ""), and :class:`CallGuard` limits, counts and drains their calls.
        tls: serve TLS.
        pool: worker threads the app runs work on, shut down with it.
        logger: the app's log.
        on_stop: run once the server has stopped.
    """

    name: str
    address: str
    holder: ModelHolder
    metrics: Metrics
    config: ServerConfig
    add_services: Callable[[Any], None]
    services: tuple[str, ...]
    tls: TLS | None = None
    pool: futures.ThreadPoolExecutor | None = None
    logger: logging.Logger = log
    on_stop: tuple[Callable[[], None], ...] = ()


def start_app(spec: AppSpec) -> GrpcApp:
    """Start a ``grpc.aio`` server for a loaded model: ``spec.add_services(server)`` registers
    the app's services, every call of which goes through a :class:`CallGuard` (limits, status
    codes, metrics, the drain on stop); the standard health service answers for "" and the
    app's services (NOT_SERVING until the port is bound and the server started, then SERVING);
    the watch thread polls the model directory when ``config.watch_seconds`` > 0. On a failure
    to start, nothing is left running.
    """
    from grpc_health.v1.health import aio as health_aio

    loop = LoopThread(spec.name)
    calls = OpenCalls()
    spec.metrics.track(spec.services)
    spec.metrics.in_flight.set_function(lambda: calls.open)
    health_names = ("", *spec.services)

    async def start() -> tuple[Any, Any, int]:
        server = grpc.aio.server(
            interceptors=[CallGuard(spec.metrics, spec.config, calls, spec.services)],
            options=server_options(spec.config),
        )
        health_servicer = health_aio.HealthServicer()
        for service in health_names:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        spec.add_services(server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = bind(server, spec.address, spec.tls)
        await server.start()
        return server, health_servicer, port

    try:
        server, health_servicer, port = loop.run(start())
    except BaseException:
        loop.close()
        if spec.pool is not None:
            spec.pool.shutdown(wait=False)
        raise
    app = GrpcApp(
        spec.name,
        server,
        port,
        spec.holder,
        health_servicer,
        spec.metrics,
        spec.config,
        health_names,
        loop,
        spec.pool,
        spec.logger,
        calls,
        spec.on_stop,
    )
    app.set_serving(True)
    if spec.config.watch_seconds > 0:
        threading.Thread(target=app._watch, daemon=True, name=f"{spec.name}-watch").start()
    return app


def run_app(app: GrpcApp, banner: str, metrics_port: int | None, host: str) -> int:
    """Run a started app until SIGTERM/SIGINT (graceful: see :meth:`GrpcApp.shutdown`); SIGHUP
    reloads the model; ``metrics_port`` exposes Prometheus metrics on plain HTTP."""
    if metrics_port is not None:
        bound = app.metrics.serve_http(metrics_port, host)
        app.logger.info("metrics on http://%s:%d/metrics (plain HTTP)", host, bound)
    # the banner says "ready": printed once SIGTERM is handled, so a supervisor that stops the
    # server as soon as it reads it still gets a graceful stop
    line = f"{banner} on {host}:{app.port} (pid {os.getpid()})"
    run_until_signalled(app.holder.reload, app.logger, ready=lambda: print(line, flush=True))
    app.logger.info("draining: up to %.0f s for in-flight calls", app.config.drain_timeout)
    app.shutdown()
    return 0


def run_until_signalled(
    reload: Callable[[], object],
    logger: logging.Logger = log,
    ready: Callable[[], object] | None = None,
) -> None:
    """Block until SIGTERM or SIGINT; SIGHUP calls ``reload`` (in a thread) meanwhile.
    ``ready`` is called once the handlers are in place."""
    done = threading.Event()

    def on_term(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=reload).start())
    if ready is not None:
        ready()
    # Python runs a handler in the main thread once that thread runs Python code again. A
    # signal the kernel hands to another thread (the server has many) does not wake a main
    # thread blocked in an untimed wait: seen with SIGTERM sent right after SIGCONT, which the
    # server then never handled. Waking twice a second bounds that delay.
    while not done.wait(0.5):
        pass
