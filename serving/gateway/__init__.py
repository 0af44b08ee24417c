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

from tierpick.serving.decisions import HEADER_PREFIX
from tierpick.serving.gateway.config import (
    GatewayConfig,
    Upstream,
    check_model_tiers,
    load_gateway_config,
    parse_gateway_config,
)
from tierpick.serving.gateway.envoy import render_envoy_config
from tierpick.serving.gateway.processor import (
    DECISION_HEADERS,
    create_gateway,
    parse_body,
    prompt_of,
    request_policy,
    run_gateway,
)

__all__ = [
    "DECISION_HEADERS",
    "HEADER_PREFIX",
    "GatewayConfig",
    "Upstream",
    "check_model_tiers",
    "create_gateway",
    "load_gateway_config",
    "parse_body",
    "parse_gateway_config",
    "prompt_of",
    "render_envoy_config",
    "request_policy",
    "run_gateway",
]
