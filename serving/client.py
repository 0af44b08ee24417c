"""A small Python client for gateways: ``TierpickClient("127.0.0.1:50051").classify("...")``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tierpick.classifier.routing import POLICY_FIELDS, RoutingPolicy
from tierpick.serving._proto.tierpick.v1 import tierpick_pb2 as pb
from tierpick.serving._proto.tierpick.v1 import tierpick_pb2_grpc as pb_grpc


def policy(
    min_success: float = 0.0,
    allowed_tiers: Sequence[str] = (),
    max_price: float | None = None,
    cost_weight: float | None = None,
    sticky: bool = False,
) -> pb.RoutingPolicy:
    """Build a RoutingPolicy message (unset optional fields stay unset)."""
    return policy_message(
        RoutingPolicy(min_success, tuple(allowed_tiers), max_price, cost_weight, sticky)
    )


def policy_message(p: RoutingPolicy) -> pb.RoutingPolicy:
    """A :class:`~tierpick.classifier.RoutingPolicy` as the request message, field by field
    (:data:`~tierpick.classifier.routing.POLICY_FIELDS`); a field at its default stays unset,
    so the server's policy applies there."""
    msg = pb.RoutingPolicy()
    for f in POLICY_FIELDS:
        value, default = getattr(p, f.name), getattr(_DEFAULT, f.name)
        if f.tiers:
            getattr(msg, f.name).extend(value)
        elif value is not None and (default is None or value != default):
            setattr(msg, f.name, value)
    return msg


_DEFAULT = RoutingPolicy()


def request(
    prompt: str = "",
    messages: Iterable[Mapping[str, str]] = (),
    routing: pb.RoutingPolicy | None = None,
    request_id: str = "",
    conversation_id: str = "",
) -> pb.ClassifyRequest:
    req = pb.ClassifyRequest(
        prompt=prompt,
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        request_id=request_id,
        conversation_id=conversation_id,
    )
    if routing is not None:
        req.policy.CopyFrom(routing)
    return req


def _channel(
    api: Any,
    target: str,
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, object]],
) -> Any:
    """A channel from ``api`` (``grpc``, or ``grpc.aio``): TLS with ``credentials``, else plain."""
    opts = list(options)
    if credentials:
        return api.secure_channel(target, credentials, options=opts)
    return api.insecure_channel(target, options=opts)


class _Stub:
    """What the sync and asyncio clients share: the channel, the stub, the default timeout, and
    the calls whose result each returns as its API does (a message, or an awaitable of one)."""

    def __init__(
        self,
        api: Any,
        target: str,
        timeout: float,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, object]],
    ) -> None:
        self.channel = _channel(api, target, credentials, options)
        self.stub = pb_grpc.TierRouterStub(self.channel)
        self.timeout = timeout

    def _classify(
        self,
        prompt: str,
        messages: Iterable[Mapping[str, str]],
        routing: pb.RoutingPolicy | None,
        request_id: str,
        timeout: float | None,
        conversation_id: str = "",
    ) -> Any:
        return self.stub.Classify(
            request(prompt, messages, routing, request_id, conversation_id),
            timeout=timeout or self.timeout,
        )

    def _model_info(self, timeout: float | None, with_evaluation: bool = False) -> Any:
        return self.stub.GetModelInfo(
            pb.GetModelInfoRequest(with_evaluation=with_evaluation), timeout=timeout or self.timeout
        )


class TierpickClient(_Stub):
    """A channel to a tierpick server with a default per-call timeout (seconds)."""

    def __init__(
        self,
        target: str,
        timeout: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        super().__init__(grpc, target, timeout, credentials, options)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def classify(
        self,
        prompt: str = "",
        *,
        messages: Iterable[Mapping[str, str]] = (),
        routing: pb.RoutingPolicy | None = None,
        request_id: str = "",
        timeout: float | None = None,
        conversation_id: str = "",
    ) -> pb.ClassifyResponse:
        resp: pb.ClassifyResponse = self._classify(
            prompt, messages, routing, request_id, timeout, conversation_id
        )
        return resp

    def classify_batch(
        self,
        prompts: Sequence[str],
        routing: pb.RoutingPolicy | None = None,
        timeout: float | None = None,
    ) -> pb.ClassifyBatchResponse:
        msg = pb.ClassifyBatchRequest(requests=[request(p) for p in prompts])
        if routing is not None:
            msg.policy.CopyFrom(routing)
        resp: pb.ClassifyBatchResponse = self.stub.ClassifyBatch(
            msg, timeout=timeout or self.timeout
        )
        return resp

    def model_info(
        self, timeout: float | None = None, with_evaluation: bool = False
    ) -> pb.ModelInfo:
        info: pb.ModelInfo = self._model_info(timeout, with_evaluation)
        return info

    def health_status(self, service: str = "") -> int:
        resp = self.health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
        )
        return int(resp.status)

    def wait_ready(self, deadline_seconds: float = 30.0) -> None:
        """Poll health until SERVING, or raise TimeoutError."""
        end = time.monotonic() + deadline_seconds
        while True:
            try:
                if self.health_status() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError("tierpick server did not become SERVING in time")
            time.sleep(0.05)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TierpickClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTierpickClient(_Stub):
    """The asyncio twin of :class:`TierpickClient` (``grpc.aio``), for gateways that run on an
    event loop (the LiteLLM plug-in). Create it inside the loop that will use it."""

    def __init__(
        self,
        target: str,
        timeout: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        super().__init__(grpc.aio, target, timeout, credentials, options)

    async def classify(
        self,
        prompt: str = "",
        *,
        messages: Iterable[Mapping[str, str]] = (),
        routing: pb.RoutingPolicy | None = None,
        request_id: str = "",
        timeout: float | None = None,
        conversation_id: str = "",
    ) -> pb.ClassifyResponse:
        resp: pb.ClassifyResponse = await self._classify(
            prompt, messages, routing, request_id, timeout, conversation_id
        )
        return resp

    async def model_info(
        self, timeout: float | None = None, with_evaluation: bool = False
    ) -> pb.ModelInfo:
        info: pb.ModelInfo = await self._model_info(timeout, with_evaluation)
        return info

    async def close(self) -> None:
        await self.channel.close()
