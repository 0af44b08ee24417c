"""The gateway's YAML config: read, validated key by key (unknown keys and out-of-range values
are a :class:`~tierpick.classifier.errors.ConfigError` naming the key), and checked against the
loaded model's tiers."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierpick.classifier import RoutingPolicy, TierClassifier
from tierpick.classifier.errors import ConfigError
from tierpick.classifier.files import load_yaml
from tierpick.classifier.routing import POLICY_FIELDS, policy_from_mapping, read_policy
from tierpick.serving.decisions import MODES, DecisionLogConfig
from tierpick.serving.guard import Target

POLICY_HEADERS = tuple(f.header for f in POLICY_FIELDS)  # x-tierpick-...


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
class Grant:
    """Which per-request policy headers apply, and the tiers a request that sets any of them is
    routed within (empty: every tier)."""

    headers: tuple[str, ...] = POLICY_HEADERS
    tiers: tuple[str, ...] = ()


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
    # requests whose body names one of these models (or none) are classified; any other model
    # is the client's explicit choice and passes through untouched
    virtual_models: tuple[str, ...] = ("tierpick/auto", "auto")
    # per-request x-tierpick-* policy headers are off unless granted here: which headers, and
    # the tiers a request that sets any of them is routed within (empty: every tier)
    request_policy_enabled: bool = False
    request_policy_headers: tuple[str, ...] = POLICY_HEADERS
    request_policy_tiers: tuple[str, ...] = ()
    # per API key: the sha256 (hex) of the key a request carries in `request_policy_key_header`
    # ("Bearer " dropped) -> that key's own grant, in place of the one above
    request_policy_keys: dict[str, Grant] = field(default_factory=dict)
    request_policy_key_header: str = "authorization"
    # route: the decision is applied; shadow: every classifiable body is classified and logged,
    # and the request goes where it would without tierpick (no tier header, no rewrite)
    mode: str = "route"
    decision_log: DecisionLogConfig | None = None
    # a policy in plain terms held on the traffic the config's policy routes (serving.guard)
    hold: Target | None = None

    @property
    def processor_address(self) -> str:
        return f"{self.processor_host}:{self.processor_port}"


_KEYS = {
    "processor": {"host", "port", "max_body_bytes"},
    "virtual_models": None,
    "request_policy": {"enabled", "headers", "tiers", "api_key_header", "api_keys"},
    "model": None,
    "policy": None,  # a mapping of routing.POLICY_KEYS, or the path of a policy file
    "rewrite_model": None,
    "failure": {"mode", "fallback_tier", "timeout_ms"},
    "tiers": None,
    "envoy": {"listen_host", "listen_port", "admin_port", "upstream_timeout_s"},
    "mode": None,
    "decision_log": None,
    "hold": {"target", "window"},
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


def _grant(raw: Mapping[str, Any], where: str, tiers: list[str]) -> Grant:
    headers = raw.get("headers", list(POLICY_HEADERS))
    if not isinstance(headers, list) or any(h not in POLICY_HEADERS for h in headers):
        raise _fail(
            f"{where}.headers", f"must list some of {list(POLICY_HEADERS)}, got {headers!r}"
        )
    granted = raw.get("tiers", [])
    if not isinstance(granted, list) or any(t not in tiers for t in granted):
        raise _fail(f"{where}.tiers", f"must list tiers of {tiers}, got {granted!r}")
    return Grant(tuple(headers), tuple(granted))


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
    fail = _section(raw, "failure")
    env = _section(raw, "envoy")
    pol = raw.get("policy")
    if isinstance(pol, str):  # a policy file, as `tierpick tune --out` writes
        policy = read_policy(pol)
    else:
        policy = policy_from_mapping(pol, "gateway config: policy")
    if unknown := [t for t in policy.allowed_tiers if t not in tiers]:
        raise _fail("policy.allowed_tiers", f"{unknown} are not tiers of {sorted(tiers)}")
    grant = _section(raw, "request_policy")
    enabled = grant.get("enabled", False)
    if not isinstance(enabled, bool):
        raise _fail("request_policy.enabled", f"must be true or false, got {enabled!r}")
    default_grant = _grant(grant, "request_policy", sorted(tiers))
    key_header = grant.get("api_key_header", "authorization")
    if not isinstance(key_header, str) or not key_header:
        raise _fail("request_policy.api_key_header", f"must be a header name, got {key_header!r}")
    keys_raw = grant.get("api_keys", [])
    if not isinstance(keys_raw, list):
        raise _fail("request_policy.api_keys", "a list of {sha256, headers, tiers}")
    keys: dict[str, Grant] = {}
    for i, entry in enumerate(keys_raw):
        where = f"request_policy.api_keys[{i}]"
        if not isinstance(entry, dict) or (
            unknown := sorted(set(entry) - {"sha256", "headers", "tiers"})
        ):
            raise _fail(
                where,
                "a mapping of sha256 (the key's, hex), headers, tiers"
                + (f"; unknown key(s) {unknown}" if isinstance(entry, dict) else ""),
            )
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise _fail(
                f"{where}.sha256",
                f'the hex sha256 of the API key (printf %s "$KEY" | sha256sum), got {digest!r}',
            )
        keys[digest] = _grant(entry, where, sorted(tiers))
    for where, g in [
        ("request_policy", default_grant),
        *((f"request_policy.api_keys[{i}]", k) for i, k in enumerate(keys.values())),
    ]:
        if policy.allowed_tiers and g.tiers and not set(policy.allowed_tiers) & set(g.tiers):
            raise _fail(
                f"{where}.tiers",
                f"{list(g.tiers)} has no tier in policy.allowed_tiers {list(policy.allowed_tiers)}"
                ": a request that sets its own policy would have no tier to go to",
            )
    virtual = raw.get("virtual_models", ["tierpick/auto", "auto"])
    if not isinstance(virtual, list) or not all(isinstance(m, str) and m for m in virtual):
        raise _fail("virtual_models", f"must be a list of model names, got {virtual!r}")
    mode = fail.get("mode", "open")
    if mode not in ("open", "closed"):
        raise _fail("failure.mode", f"must be open or closed, got {mode!r}")
    # by default the middle tier (the cheaper of two): a request tierpick cannot classify (a
    # body too large, gzip, not JSON) goes there, so no client reaches the dearest tier by
    # sending one
    fallback = fail.get("fallback_tier", list(tiers)[(len(tiers) - 1) // 2])
    if fallback not in tiers:
        raise _fail("failure.fallback_tier", f"must be one of {sorted(tiers)}, got {fallback!r}")
    rewrite = raw.get("rewrite_model", True)
    if not isinstance(rewrite, bool):
        raise _fail("rewrite_model", f"must be true or false, got {rewrite!r}")
    model_path = raw.get("model")
    if model_path is not None and not isinstance(model_path, str):
        raise _fail("model", f"must be a model directory or models:/ URI, got {model_path!r}")
    gateway_mode = raw.get("mode", "route")
    if gateway_mode not in MODES:
        raise _fail("mode", f"must be one of {list(MODES)}, got {gateway_mode!r}"[:300])
    decision_log = DecisionLogConfig.from_mapping(
        raw.get("decision_log"), "gateway config: decision_log"
    )
    hold = None
    if raw.get("hold") is not None:
        held = _section(raw, "hold")
        if not isinstance(held.get("target"), str):
            raise _fail(
                "hold.target", "must be a string such as frontier=0.2, spend=2 or quality=0.95"
            )
        window = int(_number(held.get("window", 1000), "hold.window", 100, 1e7))
        try:
            hold = Target.parse(held["target"], window)
        except ConfigError as exc:
            raise _fail("hold.target", str(exc)) from None
        if hold.kind == "share" and hold.tier not in tiers:
            raise _fail("hold.target", f"no tier {hold.tier!r} in {sorted(tiers)}")
        if policy.min_success > 0:
            raise _fail(
                "hold", "adjusts the utility rule's cost weight: policy.min_success must be 0"
            )
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
        virtual_models=tuple(virtual),
        request_policy_enabled=enabled,
        request_policy_headers=default_grant.headers,
        request_policy_tiers=default_grant.tiers,
        request_policy_keys=keys,
        request_policy_key_header=key_header.lower(),
        mode=gateway_mode,
        decision_log=decision_log,
        hold=hold,
    )


def load_gateway_config(path: str | Path) -> GatewayConfig:
    return parse_gateway_config(load_yaml(Path(path), "gateway config"))


def check_model_tiers(cfg: GatewayConfig, clf: TierClassifier) -> None:
    """The config must name an upstream for every tier of the model, and no other tier."""
    if set(cfg.tiers) != set(clf.tiers):
        raise ConfigError(
            f"gateway config tiers {sorted(cfg.tiers)} != the model's tiers {list(clf.tiers)}"
        )
