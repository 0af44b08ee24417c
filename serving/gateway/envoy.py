"""Envoy's bootstrap config for a gateway config: one cluster per tier, routes on
``x-tierpick-tier``, the ext_proc filter pointed at the processor."""

from __future__ import annotations

from typing import Any

import yaml

from tierpick.serving.decisions import HEADER_PREFIX
from tierpick.serving.gateway.config import GatewayConfig
from tierpick.serving.gateway.processor import DECISION_HEADERS

MAX_BODY_BYTES = 64 << 20  # the largest request body the rendered Envoy passes on (else 413)


def _lua_pattern(text: str) -> str:
    """``text`` as a Lua pattern matching it without case (as the processor compares virtual
    model names)."""
    return "".join(
        f"[{c.lower()}{c.upper()}]" if c.isalpha() else "%" + c if c in "^$()%.[]*+-?" else c
        for c in text.strip()
    )


def _lua_string(text: str) -> str:
    """``text`` as a Lua string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _fallback_model_lua(cfg: GatewayConfig) -> str | None:
    """A Lua filter for requests that reach Envoy's router without ``x-tierpick-tier``: the
    processor was down or over its time budget (fail-open), or the body could not be
    classified. They go to the fallback tier, so a virtual model name in the body (which a real
    provider rejects) becomes the fallback tier's model, without the processor. Explicit models
    are left alone (they are not virtual names)."""
    model = cfg.tiers[cfg.fallback_tier].model
    if not cfg.rewrite_model or model is None or not cfg.virtual_models:
        return None
    names = ", ".join(_lua_string(_lua_pattern(v)) for v in cfg.virtual_models)
    replacement = _lua_string('%1"' + model.replace("%", "%%") + '"')
    return f"""
local virtual = {{{names}}}
function envoy_on_request(handle)
  if handle:headers():get("{HEADER_PREFIX}tier") ~= nil then return end
  -- a body larger than the processor reads is not buffered here either: it streams on
  local length = tonumber(handle:headers():get("content-length") or "")
  if length == nil or length > {cfg.processor.max_body_bytes} then return end
  local body = handle:body()
  if body == nil or body:length() == 0 then return end
  local raw = body:getBytes(0, body:length())
  for _, name in ipairs(virtual) do
    local new, n = string.gsub(raw, '("model"%s*:%s*)"%s*' .. name .. '%s*"', {replacement}, 1)
    if n > 0 then
      body:setBytes(new)
      handle:headers():replace("content-length", tostring(#new))
      return
    end
  end
end
"""


def render_envoy_config(
    cfg: GatewayConfig, with_processor: bool = True, processor_port: int | None = None
) -> str:
    """Envoy's bootstrap YAML for ``cfg``: one cluster per tier, routes on ``x-tierpick-tier``.

    ``with_processor=False`` renders the same Envoy without the ext_proc filter (it routes
    everything to the fallback tier): the baseline for measuring the filter's cost.
    """
    fallback = cfg.fallback_tier
    buffer_limit = MAX_BODY_BYTES + (64 << 10)
    tier_header = HEADER_PREFIX + "tier"
    status_header = HEADER_PREFIX + "status"
    timeout = f"{cfg.envoy.upstream_timeout_s:g}s"
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
            "failure_mode_allow": cfg.failure.mode == "open",
            "message_timeout": f"{cfg.failure.timeout_ms / 1000:g}s",
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "BUFFERED",
                "response_body_mode": "NONE",
            },
            "send_body_without_waiting_for_header_response": True,
            "stat_prefix": "tierpick",
        }
        if cfg.failure.mode == "closed":
            ext_proc["status_on_error"] = {"code": 503}
        filters.append({"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc})
    lua = _fallback_model_lua(cfg)
    if lua is not None:
        filters.append(
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": lua},
                },
            }
        )
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
                cfg.processor.host,
                processor_port or cfg.processor.port,
                http2=True,
            )
        )
    doc = {
        "admin": {
            "address": {
                "socket_address": {"address": "127.0.0.1", "port_value": cfg.envoy.admin_port}
            }
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "tierpick_gateway",
                    # Envoy's default buffer, 1 MiB, answered 413 to any larger body, even
                    # without the processor: bodies up to MAX_BODY_BYTES reach an upstream (those
                    # over max_body_bytes unclassified, on the fallback route)
                    "per_connection_buffer_limit_bytes": buffer_limit,
                    "address": {
                        "socket_address": {
                            "address": cfg.envoy.listen_host,
                            "port_value": cfg.envoy.listen_port,
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
