"""LiteLLM plug-in: LiteLLM's complexity router routes each request to the model group of the
tier tierpick chooses.

Extension point: the complexity router's custom classifier (``classifier_type: custom``,
``classifier_plugin``), which LiteLLM provides for exactly this: a classifier names the tier,
LiteLLM maps the tier to a model group of its own ``model_list``, applies the time budget
(``classifier_plugin_timeout_ms``) and its ``fallback_tier``, and records the routing decision
in its spend logs. It runs in the proxy and in the Python ``Router`` alike. The same object is
also a LiteLLM callback (:class:`~litellm.integrations.custom_logger.CustomLogger`); on the
proxy it adds what a classifier alone cannot do:

- ``async_pre_call_hook``: a request for a tierpick model group is classified here, before
  routing, so that a bad per-request policy is answered with an OpenAI-style 400 naming the
  field, ``failure.mode: closed`` can reject with 503, and the decision is stored in the
  request's metadata (``tierpick_decision``, and ``spend_logs_metadata`` for spend reports);
  the request then goes straight to the tier's model group, read from the complexity router's
  own ``tiers`` at start-up (the first group when a tier lists several): the router's own
  pipeline measured ~3 ms more per request;
- ``async_post_call_response_headers_hook``: ``x-tierpick-tier``, ``-probabilities``,
  ``-model-version``, ``-status``, ``-reason`` on the response.

With the Python ``Router`` (no proxy hooks) the classifier classifies itself: a bad policy or
a classifier failure goes to the fallback tier, counted and logged.

What is classified: the last user turn with text of its own, then the user turns before it as
far as the model reads (:func:`~tierpick.classifier.conversation_text`), so a follow-up is read
with what it continues: system prompts, assistant turns and tool results are skipped,
agent-harness blocks (``<system-reminder>``, Codex's environment and AGENTS.md blocks, ...) are
removed, and a user turn left empty is skipped.

Settings: a ``tierpick:`` section of the LiteLLM config file (LiteLLM ignores it), or the YAML
file named by ``$TIERPICK_LITELLM_CONFIG``::

    tierpick:
      service: 127.0.0.1:50051     # the tierpick gRPC service; or model: DIR|default
                                   # (classify in process)
      timeout_ms: 50               # one decision's budget (the gRPC deadline)
      failure: {mode: open}        # open: the fallback tier; closed: 503 (proxy)
      policy: {cost_weight: 0.2}   # the base policy (or a policy file)
      request_policy: {enabled: true, fields: [cost_weight], tiers: [local, mid]}
      hold: {target: frontier=0.2}  # a plain target held live (with model: only)

The proxy config names ``tierpick.serving.litellm_plugin.plugin`` as the complexity router's
``classifier_plugin`` and in ``litellm_settings.callbacks``; at start-up the plug-in checks the
config (every tier of the model maps to a model group of ``model_list``) and refuses to start
otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import grpc
from pydantic import Field, model_validator

from tierpick import classifier
from tierpick.classifier import Router, RoutingPolicy, TierClassifier, conversation_text
from tierpick.classifier.errors import (
    ConfigError,
    MissingDependencyError,
    NotClassifiable,
    PolicyError,
    PromptError,
    RequestError,
    TierpickError,
)
from tierpick.classifier.files import load_yaml
from tierpick.classifier.routing import POLICY_KEYS, within_grant
from tierpick.classifier.settings import (
    Name,
    PolicyValue,
    Settings,
    StrictBool,
    StrictInt,
    StrictStr,
    grant_problems,
    parse_settings,
    policy_from_mapping,
)
from tierpick.serving.conversations import Conversations, conversation_key
from tierpick.serving.decisions import (
    MODES,
    DecisionLog,
    DecisionLogConfig,
    DecisionRecord,
    basis,
    policy_fields,
)
from tierpick.serving.guard import BudgetGuard, Hold, describe_policy, guard_for, guard_gauges

try:
    from litellm.integrations.custom_logger import CustomLogger
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise MissingDependencyError(
        f"the LiteLLM plug-in needs LiteLLM (pip install 'tierpick[litellm]'): {exc}"
    ) from exc

log = logging.getLogger("tierpick.litellm")

CONFIG_ENV = "TIERPICK_LITELLM_CONFIG"
POLICY_KEY = "tierpick"  # request metadata: the per-request policy
DECISION_KEY = "tierpick_decision"  # request metadata: the decision (set by the plug-in only)
ROUTER_MODEL = "auto_router/complexity_router"
OUTCOMES = ("classified", "not-classified", "fallback", "rejected", "bad-request", "shadow")


BadRequest = RequestError  # a per-request policy that cannot be applied: HTTP 400 on the proxy
NotClassified = NotClassifiable  # nothing to classify: the fallback tier, with the reason


class Decision(dict[str, Any]):
    """The decision on one request, kept in its metadata: ``tier`` (None: LiteLLM's
    ``fallback_tier``), ``status`` (one of :data:`OUTCOMES`), ``reason``, ``probabilities``,
    ``model_version``, ``basis`` (rule, knob, utilities, whether the prompt was cut), ``ms``.
    A dict, so LiteLLM logs it as it is; its own type, so a client cannot forge one in JSON
    metadata. Made from a :class:`~tierpick.serving.decisions.DecisionRecord`, the shape
    every door's decision has."""

    @classmethod
    def of(cls, record: DecisionRecord) -> Decision:
        return cls(record.as_dict())


# ---------------------------------------------------------------------------------- settings


class PluginFailure(Settings):
    mode: Literal["open", "closed"] = "open"  # open: the fallback tier; closed: 503 (proxy)


class PluginGrant(Settings):
    """Per-request policy (metadata.tierpick) is off unless granted: which fields, and the
    tiers a request that sets any of them is routed within (empty: every tier)."""

    enabled: StrictBool = False
    fields: tuple[Literal[POLICY_KEYS], ...] = POLICY_KEYS  # type: ignore[valid-type]
    tiers: tuple[StrictStr, ...] = ()


class PluginConfig(Settings):
    """The plug-in's settings (the ``tierpick:`` section); :func:`parse_plugin_config` reads
    and validates them."""

    service: Name | None = "127.0.0.1:50051"
    model: Name | None = None  # classify in process instead of calling the service
    timeout_ms: Annotated[StrictInt, Field(ge=1, le=60_000)] = 50
    failure: PluginFailure = PluginFailure()
    policy: PolicyValue = RoutingPolicy()
    request_policy: PluginGrant = PluginGrant()
    # route: requests for a routed group go to the tier's group; shadow: every chat request is
    # classified and logged, and goes where it would without tierpick (a routed group's
    # fallback tier, any other group untouched)
    mode: Literal[MODES] = "route"  # type: ignore[valid-type]
    decision_log: DecisionLogConfig | None = None
    # a policy in plain terms held on the traffic the config's policy routes (in process: with
    # a service, the service holds it, tierpick serve --hold)
    hold: Hold | None = None

    @model_validator(mode="before")
    @classmethod
    def _in_process(cls, raw: Any) -> Any:
        # a model given and no service: classify in process, call no service
        if isinstance(raw, dict) and raw.get("model") is not None and "service" not in raw:
            return {**raw, "service": None}
        return raw

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.model is not None and self.service is not None:
            yield "", "give service (host:port) or model (a directory), not both"
        if self.hold is not None:
            if self.model is None:
                yield (
                    "hold",
                    "needs model: (classify in process); with a service, the service holds the "
                    "target (tierpick serve --hold)",
                )
            yield from self.hold.conflicts(self.policy, [])
        yield from grant_problems(self.policy, self.request_policy.tiers, "request_policy")


def parse_plugin_config(raw: object, where: str = "tierpick") -> PluginConfig:
    """Validate the ``tierpick`` settings; every problem is reported at once, naming its key."""
    return parse_settings(PluginConfig, raw, where)


@dataclass(frozen=True)
class RoutedGroup:
    """A model group of LiteLLM's ``model_list`` routed by this plug-in."""

    name: str
    tiers: dict[str, list[str]]  # tier -> model groups
    fallback_tier: str


def _names(value: object) -> list[str]:
    """A complexity-router tier's model group names (a string, an object, or a list of them)."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        name = item.get("model_name") if isinstance(item, dict) else item
        if isinstance(name, str):
            out.append(name)
    return out


def check_model_list(
    model_list: Sequence[Mapping[str, Any]], model_tiers: Sequence[str] | None = None
) -> list[RoutedGroup]:
    """The complexity-router entries of a LiteLLM ``model_list`` that use a tierpick
    classifier, checked: every tier names model groups that exist in ``model_list``, there is a
    ``fallback_tier``, and (when ``model_tiers`` is given) the tiers are the model's.

    Raises:
        ConfigError: naming the entry and the key.
    """
    names = {m.get("model_name") for m in model_list if isinstance(m, Mapping)}
    out = []
    for entry in model_list:
        params = entry.get("litellm_params") if isinstance(entry, Mapping) else None
        if not isinstance(params, Mapping) or params.get("model") != ROUTER_MODEL:
            continue
        cfg = params.get("complexity_router_config") or {}
        plugin = cfg.get("classifier_plugin")
        if not (isinstance(plugin, Plugin) or (isinstance(plugin, str) and "tierpick" in plugin)):
            continue
        where = f"model_list[{entry.get('model_name')!r}].litellm_params.complexity_router_config"
        if cfg.get("classifier_type") != "custom":
            raise ConfigError(f"{where}.classifier_type: must be custom for a tierpick plug-in")
        tiers = cfg.get("tiers")
        if not isinstance(tiers, Mapping) or not tiers:
            raise ConfigError(f"{where}.tiers: a mapping of tier -> model group")
        groups = {str(t): _names(v) for t, v in tiers.items()}
        for tier, group_names in groups.items():
            if not group_names:
                raise ConfigError(f"{where}.tiers.{tier}: names no model group")
            if missing := [g for g in group_names if g not in names]:
                raise ConfigError(
                    f"{where}.tiers.{tier}: model group(s) {missing} are not a model_name of "
                    "model_list"
                )
        if model_tiers is not None and set(groups) != set(model_tiers):
            raise ConfigError(
                f"{where}.tiers: {sorted(groups)} must be the tierpick model's tiers "
                f"{list(model_tiers)}"
            )
        fallback = cfg.get("fallback_tier")
        if fallback not in groups:
            raise ConfigError(
                f"{where}.fallback_tier: must name one of {sorted(groups)} (where a request goes "
                f"when tierpick cannot classify it), got {fallback!r}"
            )
        out.append(RoutedGroup(str(entry.get("model_name")), groups, str(fallback)))
    return out


# ---------------------------------------------------------------------------------- plug-in


CONVERSATION_KEY = "conversation_id"  # in metadata.tierpick: a sticky policy's conversation


def _conversation_id(raw: object) -> tuple[str, object]:
    """``metadata.tierpick``'s conversation id (checked: a string of at most
    :data:`~tierpick.serving.conversations.MAX_ID_CHARS` printable characters), and the rest
    of the mapping, the policy fields."""
    if not isinstance(raw, Mapping) or CONVERSATION_KEY not in raw:
        return "", raw
    value = raw[CONVERSATION_KEY]
    where = f"metadata.{POLICY_KEY}.{CONVERSATION_KEY}"
    if not isinstance(value, str):
        raise BadRequest(f"{where}: must be a string, got {type(value).__name__}")
    try:
        conversation_key(value, None)
    except PolicyError as exc:
        raise BadRequest(f"{where}: {exc}") from None
    return value, {k: v for k, v in raw.items() if k != CONVERSATION_KEY}


class Plugin(CustomLogger):
    """tierpick as LiteLLM's complexity-router classifier (``classify``) and callback."""

    def __init__(self, config: PluginConfig | None = None) -> None:
        super().__init__()
        self.config = config or PluginConfig()
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.routed: dict[str, RoutedGroup] = {}  # model group name -> its tiers (proxy)
        self._clf: TierClassifier | None = None
        self._info: Any = None  # the service's ModelInfo, fetched once
        self.conversations = Conversations()  # a sticky policy's state (in-process model)
        self._service_checked: RoutingPolicy | None = None  # the config's, once valid
        self._clients: dict[int, tuple[Any, Any]] = {}  # one grpc.aio channel per event loop
        cfg_log = self.config.decision_log
        self.decisions = DecisionLog(cfg_log) if cfg_log is not None else None
        self.guard: BudgetGuard | None = None  # a policy in plain terms, held live
        if self.config.model is not None:  # "default": the shipped model
            model = self.config.model
            self._clf = classifier.load(None if model == "default" else model)
            if self.config.hold is not None:
                self.guard = guard_for(self.config.hold.target, self._clf, self.config.policy)
                _watch(self.guard)

    def __deepcopy__(self, memo: dict[int, Any]) -> Plugin:
        """The plug-in itself: LiteLLM's ``Router`` deep-copies its ``model_list``, and the
        plug-in (a loaded model, open channels, its counts) is one shared object."""
        return self

    # ------------------------------------------------------------- set-up

    def model_tiers(self) -> list[str] | None:
        """The tiers of the model that will classify, or None when the service cannot be
        reached now (it is asked again at the first request)."""
        if self._clf is not None:
            return list(self._clf.tiers)
        from tierpick.serving.client import TierpickClient

        assert self.config.service is not None
        try:
            with TierpickClient(self.config.service, timeout=2.0) as client:
                self._info = client.model_info()
        except grpc.RpcError as exc:
            log.warning(
                "tierpick service %s not reachable at start-up (%s): tiers checked at the "
                "first request",
                self.config.service,
                exc.code().name,
            )
            return None
        return [t.name for t in self._info.tiers]

    def check(self, model_list: Sequence[Mapping[str, Any]]) -> list[RoutedGroup]:
        """Check a LiteLLM ``model_list`` against this plug-in's model (see
        :func:`check_model_list`) and remember the groups it routes."""
        groups = check_model_list(model_list, self.model_tiers())
        for t in self.config.request_policy.tiers + self.config.policy.allowed_tiers:
            if groups and t not in groups[0].tiers:
                raise ConfigError(f"tierpick: tier {t!r} is not one of {sorted(groups[0].tiers)}")
        self.routed = {g.name: g for g in groups}
        return groups

    # ------------------------------------------------------------- the decision

    def request_policy(self, raw: object) -> tuple[RoutingPolicy, list[str]]:
        """The config's policy with the request's granted fields (``metadata.tierpick``) over
        it, and the fields ignored because they are not granted.

        Raises:
            BadRequest: a value out of range or of the wrong type, or a tier not granted.
        """
        cfg = self.config
        base = self.base_policy()
        if raw is None or (isinstance(raw, Mapping) and not raw):
            return base, []
        where = f"metadata.{POLICY_KEY}"
        if not isinstance(raw, dict):
            raise BadRequest(f"{where}: must be an object of {list(POLICY_KEYS)}")
        enabled = cfg.request_policy.enabled
        granted = [k for k in raw if enabled and k in cfg.request_policy.fields]
        ignored = [str(k)[:50] for k in raw if k not in granted][:10]
        if not granted:  # nothing the operator allows: not even read
            return base, ignored
        try:  # only what is granted is read (an ungranted field is ignored, even if invalid)
            asked = policy_from_mapping({k: raw[k] for k in granted}, where)
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
        policy = base
        for key in granted:
            policy = replace(policy, **{key: getattr(asked, key)})
        if granted:
            chose = "allowed_tiers" in granted
            try:
                policy = within_grant(
                    policy, self._tiers(), cfg.request_policy.tiers, chose, f"{where}.allowed_tiers"
                )
            except PolicyError as exc:
                raise BadRequest(str(exc)) from None
        return policy, ignored

    def active_policy(self) -> str:
        """The policy of requests that set none, in one line (in process; with a service, the
        service's ``GetModelInfo.active_policy`` says it)."""
        if self._clf is None:
            return f"the service's at {self.config.service}, with this config's over it"
        hold = self.config.hold.target if self.config.hold is not None else None
        return describe_policy(self._clf.router(self.base_policy()), hold)

    def base_policy(self) -> RoutingPolicy:
        """The config's policy, at the cost weight the guard holds now (``hold``)."""
        if self.guard is None:
            return self.config.policy
        return self.guard.policy(self.config.policy)

    def _tiers(self) -> list[str]:
        if self._clf is not None:
            return list(self._clf.tiers)
        return [t.name for t in self._info.tiers] if self._info is not None else []

    def _router(self, policy: RoutingPolicy) -> Router | None:
        """``policy`` validated against the model's tiers (:class:`BadRequest` if it fails): the
        in-process model's router, or None once checked for the service (which routes itself;
        the config's own policy is checked once)."""
        try:
            if self._clf is not None:
                return self._clf.router(policy)  # built once per policy by the model
            if policy != self._service_checked:
                info = self._info
                Router.for_tiers(policy, list(info.tiers), info.default_cost_weight)
                if policy == self.config.policy:
                    self._service_checked = policy
            return None
        except TierpickError as exc:
            raise BadRequest(f"metadata.{POLICY_KEY}: {exc}") from None

    async def decide(
        self,
        messages: object,
        raw_policy: object,
        routable: Collection[str] | None = None,
        requested_model: str | None = None,
    ) -> Decision:
        """Classify a chat request: never raises but :class:`BadRequest`. A request with nothing
        to classify, or a classifier that fails or runs over ``timeout_ms`` (the whole
        decision, the service's round trip included), gets a decision with ``tier`` None
        (LiteLLM's fallback tier) and the reason; with ``failure.mode: closed`` a failure is
        ``status: rejected``. A tier outside ``routable`` (the tiers LiteLLM has model groups
        for) is a failure too."""
        start = time.perf_counter()
        try:
            tier, proba, version, note, why = await asyncio.wait_for(
                self._classify(messages, raw_policy, requested_model), self.config.timeout_ms / 1000
            )
            if routable is not None and tier not in routable:
                # the service's model changed its tiers under a running proxy
                raise ConfigError(f"the model's tier {tier!r} has no model group")
        except BadRequest:
            self._count("bad-request")
            raise
        except (NotClassified, PromptError) as exc:
            return self._done(Decision.of(DecisionRecord("not-classified", reason=str(exc))), start)
        except Exception as exc:  # the service is down, hung, or the model failed
            return self._failed(exc, start)
        decision = Decision.of(DecisionRecord("classified", tier, proba, version, note, why))
        return self._done(decision, start)

    async def _classify(
        self, messages: object, raw_policy: object, requested_model: str | None = None
    ) -> tuple[str, dict[str, float], str, str, dict[str, Any] | None]:
        if self._clf is None and self._info is None:
            await self._fetch_info()
        conversation, raw_policy = _conversation_id(raw_policy)
        policy, ignored = self.request_policy(raw_policy)
        router = self._router(policy)
        note = (
            f"metadata.{POLICY_KEY} field(s) {ignored} ignored: not granted by "
            "tierpick.request_policy"
            if ignored
            else ""
        )
        if self._clf is not None:  # ~0.3 ms: on the loop, as the gateway's processor does
            clf = self._clf
            assert router is not None
            try:
                prompt = clf.chat_text(messages)
            except ValueError as exc:
                raise NotClassified(str(exc)) from None
            reading = clf.read([prompt])
            d = clf.route_proba(reading.proba, router)[0]
            d, held = self.conversations.hold_decision(conversation, messages, d, clf, router)
            if self.guard is not None and policy == self.base_policy():  # the config's traffic
                chosen = [clf.tiers.index(d.tier)]
                self.guard.record([len(prompt)], reading.proba, chosen, router, clf.manifest.tiers)
            self._log(prompt, d.tier, d.probabilities, clf.version, router, requested_model)
            proba = {t: round(p, 4) for t, p in d.probabilities.items()}
            made = basis(router, reading.proba[0], reading.cut[0], held)
            return d.tier, proba, clf.version, note, made
        from tierpick.serving.client import policy_message

        try:  # the conversation as the service's model reads it
            prompt = conversation_text(messages, self._info.max_prompt_chars)
        except ValueError as exc:
            raise NotClassified(str(exc)) from None
        try:
            resp = await self._client().classify(
                prompt,
                routing=policy_message(policy),
                # the service sees the text only: the conversation is named for it
                conversation_id=(conversation or conversation_key("", messages) or "")
                if policy.sticky
                else "",
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # the policy was checked: the prompt
                raise NotClassified(exc.details() or "invalid prompt") from None
            raise
        exact = {s.tier: s.success_probability for s in resp.scores}
        if self.decisions is not None:  # the policy as the service applied it
            info = self._info
            applied = Router.for_tiers(policy, list(info.tiers), info.default_cost_weight)
            self._log(prompt, resp.tier, exact, resp.model_version, applied, requested_model)
        proba = {t: round(p, 4) for t, p in exact.items()}
        why = (
            {
                "rule": resp.basis.rule,
                "cost_weight": resp.basis.cost_weight,
                "min_success": resp.basis.min_success,
                "prompt_cut": resp.basis.prompt_cut,
                "held_by_conversation": resp.basis.held_by_conversation,
                "utilities": {s.tier: s.utility for s in resp.scores if s.allowed},
            }
            if resp.basis.rule  # an older service sends none
            else None
        )
        return resp.tier, proba, resp.model_version, note, why

    def _log(
        self,
        prompt: str,
        tier: str,
        proba: Mapping[str, float],
        version: str,
        router: Router,
        requested_model: str | None,
    ) -> None:
        if self.decisions is not None:
            self.decisions.record(
                door="litellm",
                mode=self.config.mode,
                prompt=prompt,
                tiers=list(proba),
                proba=list(proba.values()),
                tier=tier,
                model_version=version,
                policy=policy_fields(router),
                requested_model=requested_model,
            )

    async def _fetch_info(self) -> None:
        """The service's model (tiers, prices), once; checked against the routed groups."""
        info = await self._client().model_info()
        tiers = sorted(t.name for t in info.tiers)
        for group in self.routed.values():
            if sorted(group.tiers) != tiers:
                raise ConfigError(
                    f"the tierpick service's model has tiers {tiers}, LiteLLM's "
                    f"{group.name!r} routes {sorted(group.tiers)}"
                )
        self._info = info

    def _client(self) -> Any:
        from tierpick.serving.client import AsyncTierpickClient

        loop = asyncio.get_running_loop()
        owner, client = self._clients.get(id(loop), (None, None))
        if owner is not loop:  # a new loop (an id can be reused once a loop is gone)
            assert self.config.service is not None
            client = AsyncTierpickClient(
                self.config.service,
                self.config.timeout_ms / 1000,
                # a restarted service is found again within a second, not after gRPC's
                # default backoff (up to two minutes of fallbacks)
                options=[
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ],
            )
            self._clients[id(loop)] = (loop, client)
        return client

    def _failed(self, exc: BaseException, start: float) -> Decision:
        reason = (
            f"classifier over its {self.config.timeout_ms} ms budget"
            if isinstance(exc, asyncio.TimeoutError)
            else f"classifier error: {type(exc).__name__}: {_short(exc)}"
        )
        status = "rejected" if self.config.failure.mode == "closed" else "fallback"
        log.warning("tierpick %s: %s", status, reason)
        return self._done(Decision.of(DecisionRecord(status, reason=reason)), start)

    def _done(self, decision: Decision, start: float) -> Decision:
        decision["ms"] = round((time.perf_counter() - start) * 1000, 3)
        self._count(decision["status"])
        return decision

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        _metric().labels(outcome).inc()

    # ------------------------------------------------------------- LiteLLM: classifier

    async def classify(self, context: Any) -> str | None:
        """LiteLLM's ``ClassifierPlugin``: the tier's name, or None to let the complexity
        router's ``fallback_tier`` decide. On the proxy the pre-call hook has decided already."""
        metadata = context.metadata or {}
        decision = metadata.get(DECISION_KEY)
        if not isinstance(decision, Decision):  # the Python Router: no proxy hook ran
            messages = list(context.structured_messages or context.raw_messages or [])
            try:
                decision = await self.decide(messages, metadata.get(POLICY_KEY))
            except BadRequest as exc:  # no way to answer 400 from here: the fallback tier
                log.warning("tierpick bad-request (fallback tier): %s", exc)
                return None
        tier = decision.get("tier")
        return tier if isinstance(tier, str) else None

    # ------------------------------------------------------------- LiteLLM: proxy hooks

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any]:
        """Classify a request for a tierpick model group before routing (see the module)."""
        metadata = data.get("metadata")
        if isinstance(metadata, dict):
            metadata.pop(DECISION_KEY, None)  # only the plug-in sets it
            spend = metadata.get("spend_logs_metadata")
            if isinstance(spend, dict):  # nor does a client write tierpick's spend-log keys
                for key in [k for k in spend if str(k).startswith("tierpick_")]:
                    del spend[key]
        requested = data.get("model")
        group = self.routed.get(requested)  # type: ignore[arg-type]
        shadow = self.config.mode == "shadow"
        if group is None:  # another model, named explicitly: untouched
            if shadow and data.get("messages"):  # logged only: what would tierpick choose?
                with contextlib.suppress(BadRequest):
                    await self.decide(data["messages"], None, None, str(requested)[:200])
            return data
        if not isinstance(metadata, dict):
            metadata = data["metadata"] = {}
        try:
            decision = await self.decide(
                data.get("messages"),
                None if shadow else metadata.get(POLICY_KEY),
                routable=group.tiers,
                requested_model=str(requested)[:200],
            )
        except BadRequest as exc:
            raise _http_error(400, str(exc), "invalid_request_error") from None
        if shadow:  # where the request would go without tierpick: the fallback tier
            decision["shadow_tier"], decision["tier"] = decision.get("tier"), None
            decision["status"] = "shadow"
            decision["routed_tier"] = group.fallback_tier
            metadata[DECISION_KEY] = decision
            data["model"] = group.tiers[group.fallback_tier][0]
            return data
        if decision["status"] == "rejected":
            raise _http_error(503, f"tierpick: {decision['reason']}", "tierpick_unavailable")
        if decision["tier"] is None:
            decision["routed_tier"] = group.fallback_tier
        metadata[DECISION_KEY] = decision
        spend = metadata.get("spend_logs_metadata")
        spend = dict(spend) if isinstance(spend, dict) else {}
        spend.update(
            {
                "tierpick_tier": decision.get("tier") or group.fallback_tier,
                "tierpick_status": decision["status"],
                "tierpick_model_version": decision.get("model_version", ""),
            }
        )
        metadata["spend_logs_metadata"] = spend
        # straight to the tier's model group: the complexity router's own pipeline (session
        # affinity, compaction, its decision record) costs ~3 ms more per request on this
        # machine (measured by `tierpick bench --litellm`), for nothing the decision needs
        data["model"] = group.tiers[str(decision.get("tier") or group.fallback_tier)][0]
        return data

    async def async_post_call_response_headers_hook(
        self,
        data: dict[str, Any],
        user_api_key_dict: Any,
        response: Any,
        request_headers: dict[str, str] | None = None,
        litellm_call_info: dict[str, Any] | None = None,
    ) -> dict[str, str] | None:
        """The decision as ``x-tierpick-*`` response headers."""
        metadata = data.get("metadata")
        decision = metadata.get(DECISION_KEY) if isinstance(metadata, dict) else None
        if not isinstance(decision, Decision):
            return None
        return decision_headers(decision)


def decision_headers(decision: Mapping[str, Any]) -> dict[str, str]:
    """The ``x-tierpick-*`` headers of a decision (the tier it was routed to, in shadow mode
    the routed group's fallback tier)."""
    record = DecisionRecord.of(decision)
    if record.tier is None and decision.get("routed_tier"):
        record = replace(record, tier=decision["routed_tier"])
    return record.headers()


def _short(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name} {exc.details() or ''}".strip()
    return str(exc)[:200]


def _http_error(code: int, message: str, kind: str) -> Exception:
    """An HTTP error LiteLLM's proxy answers as ``{"error": {...}}``."""
    from fastapi import HTTPException

    return HTTPException(status_code=code, detail={"error": message, "type": kind})


_METRIC: Any = None
_GUARD: list[BudgetGuard] = []  # the guard the tierpick_guard_* gauges read (the latest)


def _watch(guard: BudgetGuard) -> None:
    """Export ``guard`` on prometheus_client's default registry (LiteLLM's ``/metrics``); the
    gauges are made once per process and read the latest plug-in's guard."""
    if not _GUARD:
        from prometheus_client import REGISTRY

        guard_gauges(lambda: _GUARD[-1] if _GUARD else None, REGISTRY)
    _GUARD[:] = [guard]


def _metric() -> Any:
    """``tierpick_litellm_requests_total{outcome}`` on prometheus_client's default registry
    (the one LiteLLM's ``/metrics`` serves), every outcome from 0."""
    global _METRIC
    if _METRIC is None:
        from prometheus_client import Counter

        _METRIC = Counter(
            "tierpick_litellm_requests",
            "Requests decided by the tierpick LiteLLM plug-in",
            ["outcome"],
        )
        for outcome in OUTCOMES:
            _METRIC.labels(outcome)
    return _METRIC


# ---------------------------------------------------------------------------------- the proxy


def _proxy_config_path() -> str | None:
    import sys

    proxy = sys.modules.get("litellm.proxy.proxy_server")
    path = getattr(proxy, "user_config_file_path", None) if proxy is not None else None
    return path or os.environ.get("CONFIG_FILE_PATH")


def from_litellm_config(path: str | Path | None) -> Plugin:
    """The plug-in for a LiteLLM proxy config: settings from its ``tierpick`` section (or
    ``$TIERPICK_LITELLM_CONFIG``), checked against its ``model_list``."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = load_yaml(Path(path), "LiteLLM config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"LiteLLM config {path}: must hold a mapping")
    settings = raw.get("tierpick")
    where = "tierpick"
    if settings is None and (own := os.environ.get(CONFIG_ENV)):
        settings = load_yaml(Path(own), CONFIG_ENV)
        where = own
    plugin = Plugin(parse_plugin_config(settings, where))
    plugin.check(raw.get("model_list") or [])
    return plugin


_PLUGIN: Plugin | None = None


def __getattr__(name: str) -> Any:
    """``tierpick.serving.litellm_plugin.plugin``: the proxy's instance, built (and checked
    against the proxy's config) the first time LiteLLM resolves it."""
    global _PLUGIN
    if name != "plugin":
        raise AttributeError(name)
    if _PLUGIN is None:
        _PLUGIN = from_litellm_config(_proxy_config_path())
        log.info(
            "tierpick LiteLLM plug-in: %s, routing %s; policy: %s",
            _PLUGIN.config.model or _PLUGIN.config.service,
            sorted(_PLUGIN.routed),
            _PLUGIN.active_policy(),
        )
    return _PLUGIN
