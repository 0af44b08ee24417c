"""The gateway's YAML config: declared as settings models (:mod:`tierpick.classifier.settings`),
each default written once; every unknown key and out-of-range value is reported at once in a
:class:`~tierpick.classifier.errors.ConfigError` naming its key path; then checked against the
loaded model's tiers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from tierpick.classifier import RoutingPolicy, TierClassifier
from tierpick.classifier.errors import ConfigError
from tierpick.classifier.files import load_yaml
from tierpick.classifier.routing import POLICY_FIELDS, clip
from tierpick.classifier.settings import (
    Name,
    Number,
    PolicyValue,
    Port,
    Settings,
    StrictBool,
    StrictInt,
    StrictStr,
    grant_problems,
    parse_settings,
)
from tierpick.serving.decisions import MODES, DecisionLogConfig
from tierpick.serving.guard import Hold

POLICY_HEADERS = tuple(f.header for f in POLICY_FIELDS)  # x-tierpick-...


def _address(value: object) -> object:
    if isinstance(value, str):
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port, got {clip(value)}")
    return value


class Upstream(Settings):
    """Where a tier's requests go: ``host:port``, TLS or not, and the model name to ask for."""

    upstream: Annotated[StrictStr, BeforeValidator(_address)]
    model: Name | None = None
    tls: StrictBool = False

    @property
    def address(self) -> str:
        return self.upstream

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


class Processor(Settings):
    host: StrictStr = "127.0.0.1"
    port: Port = 50052
    # a larger body is passed through unclassified (to the fallback tier): the work one request
    # costs the processor is bounded (parsing, and re-encoding it for the model rewrite, grow
    # with the body: ~25 ms at 900 KB here), so a few large bodies cannot starve small ones
    max_body_bytes: Annotated[StrictInt, Field(ge=1, le=64 << 20)] = 256 * 1024


class Failure(Settings):
    mode: Literal["open", "closed"] = "open"
    # None: the middle tier (the cheaper of two): a request tierpick cannot classify (a body
    # too large, gzip, not JSON) goes there, so no client reaches the dearest tier by sending
    # one (GatewayConfig.fallback_tier)
    fallback_tier: StrictStr | None = None
    timeout_ms: Annotated[StrictInt, Field(ge=1, le=60_000)] = 200


class EnvoySettings(Settings):
    listen_host: StrictStr = "127.0.0.1"
    listen_port: Port = 8080
    admin_port: Port = 9901
    upstream_timeout_s: Annotated[Number, Field(ge=0.001)] = 300.0


PolicyHeader = Literal[POLICY_HEADERS]  # type: ignore[valid-type]


class Grant(Settings):
    """Which per-request policy headers apply, and the tiers a request that sets any of them is
    routed within (empty: every tier)."""

    headers: tuple[PolicyHeader, ...] = POLICY_HEADERS
    tiers: tuple[StrictStr, ...] = ()


class KeyGrant(Grant):
    """One API key's own grant: the sha256 (hex) of the key a request carries."""

    sha256: Annotated[
        StrictStr,
        Field(
            pattern=r"^[0-9a-f]{64}$",
            description='the hex sha256 of the API key (printf %s "$KEY" | sha256sum)',
        ),
    ]


class RequestPolicy(Grant):
    """Per-request x-tierpick-* policy headers are off unless granted here: which headers, and
    the tiers a request that sets any of them is routed within; per API key (the sha256 of the
    key a request carries in ``api_key_header``, "Bearer " dropped), that key's own grant."""

    enabled: StrictBool = False
    api_key_header: Annotated[Name, AfterValidator(str.lower)] = "authorization"
    api_keys: tuple[KeyGrant, ...] = ()

    @property
    def keys(self) -> dict[str, Grant]:
        return {k.sha256: k for k in self.api_keys}


class GatewayConfig(Settings):
    """The gateway's settings, as its YAML file holds them (see docs/gateway.md);
    :func:`load_gateway_config` reads and validates them."""

    tiers: Annotated[dict[str, Upstream], Field(min_length=1)]
    processor: Processor = Processor()
    model: StrictStr | None = None  # a model directory or models:/ URI (default: the shipped)
    policy: PolicyValue = RoutingPolicy()  # a mapping of the policy's fields, or a policy file
    rewrite_model: StrictBool = True
    failure: Failure = Failure()
    envoy: EnvoySettings = EnvoySettings()
    # requests whose body names one of these models (or none) are classified; any other model
    # is the client's explicit choice and passes through untouched
    virtual_models: tuple[Name, ...] = ("tierpick/auto", "auto")
    request_policy: RequestPolicy = RequestPolicy()
    # route: the decision is applied; shadow: every classifiable body is classified and logged,
    # and the request goes where it would without tierpick (no tier header, no rewrite)
    mode: Literal[MODES] = "route"  # type: ignore[valid-type]
    decision_log: DecisionLogConfig | None = None
    hold: Hold | None = None

    @property
    def fallback_tier(self) -> str:
        tiers = list(self.tiers)
        return self.failure.fallback_tier or tiers[(len(tiers) - 1) // 2]

    @property
    def processor_address(self) -> str:
        return f"{self.processor.host}:{self.processor.port}"

    def problems(self) -> Iterator[tuple[str, str]]:
        tiers = sorted(self.tiers)
        if self.failure.fallback_tier is not None and self.failure.fallback_tier not in tiers:
            yield "failure.fallback_tier", f"must be one of {tiers}, got {clip(self.fallback_tier)}"
        allowed = self.policy.allowed_tiers
        if unknown := [t for t in allowed if t not in tiers]:
            yield "policy.allowed_tiers", f"{clip(unknown)} are not tiers of {tiers}"
        grants = [("request_policy", self.request_policy)] + [
            (f"request_policy.api_keys[{i}]", k) for i, k in enumerate(self.request_policy.api_keys)
        ]
        for where, grant in grants:
            if unknown := [t for t in grant.tiers if t not in tiers]:
                yield f"{where}.tiers", f"must list tiers of {tiers}, got {clip(unknown)}"
            else:
                yield from grant_problems(self.policy, grant.tiers, where)
        if self.hold is not None:
            yield from self.hold.conflicts(self.policy, tiers)


def parse_gateway_config(raw: object) -> GatewayConfig:
    """Validate a parsed YAML mapping; every problem is reported at once, naming its key."""
    return parse_settings(GatewayConfig, raw, "gateway config:")


def load_gateway_config(path: str | Path) -> GatewayConfig:
    return parse_gateway_config(load_yaml(Path(path), "gateway config"))


def check_model_tiers(cfg: GatewayConfig, clf: TierClassifier) -> None:
    """The config must name an upstream for every tier of the model, and no other tier."""
    if set(cfg.tiers) != set(clf.tiers):
        odd = [t for t in cfg.tiers if t not in clf.tiers]
        missing = [t for t in clf.tiers if t not in cfg.tiers]
        raise ConfigError(
            f"gateway config: tiers: {sorted(cfg.tiers)} != the model's tiers {list(clf.tiers)}"
            + (f"; not tiers of the model: {clip(odd)}" if odd else "")
            + (f"; no upstream for: {missing}" if missing else "")
        )
