"""The routing rules, defined once: the runtime serves them, and evaluation, reports and every
gateway adapter measure them through the same functions.

Tiers are ordered cheapest first. A model gives each prompt a calibrated probability of success
per tier (:func:`platt`); a :class:`RoutingPolicy`, validated once against a model's tiers into a
:class:`Router`, turns them into a tier by one of two rules:

- threshold (``min_success > 0``): the cheapest allowed tier whose probability reaches the
  threshold; when none does, the dearest allowed tier (:func:`threshold_choice`);
- utility (``min_success == 0``): the allowed tier with the highest probability - cost_weight x
  normalized cost (:func:`utility_choice`; costs from :func:`normalized_costs`). With calibrated
  probabilities this buys the most success per unit of cost.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tierpick.classifier.errors import ConfigError, PolicyError

FloatArray = npt.NDArray[np.floating[Any]]
IndexArray = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]


def sigmoid(z: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The logistic function (in float64), without overflow warnings for large |z|."""
    out: npt.NDArray[np.float64] = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))
    return out


def platt(logits: npt.ArrayLike, a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Per-tier Platt calibration: sigmoid(a x logit + b), one (a, b) per tier."""
    return sigmoid(np.asarray(logits, dtype=np.float64) * np.asarray(a) + np.asarray(b))


def normalized_costs(
    price_input: Sequence[float], price_output: Sequence[float]
) -> npt.NDArray[np.float64]:
    """Cost per call of each tier on a 0-1 scale: (input + output price per 1M tokens), mapped
    so the cheapest tier is 0 and the dearest 1. Routing and evaluation share this scale."""
    c = np.asarray(price_input, dtype=np.float64) + np.asarray(price_output, dtype=np.float64)
    return rescale(c)


def rescale(costs: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Costs mapped to [0, 1] over the tiers given (cheapest 0, dearest 1)."""
    lo, hi = float(costs.min()), float(costs.max())
    out: npt.NDArray[np.float64] = (costs - lo) / (hi - lo) if hi > lo else np.zeros_like(costs)
    return out


def threshold_choice(
    proba: FloatArray, threshold: float, allowed: Mask | None = None
) -> tuple[IndexArray, Mask]:
    """The cheapest allowed tier whose probability reaches ``threshold``, else the dearest
    allowed tier; and whether the threshold was met, per row."""
    allowed = np.ones(proba.shape[1], dtype=bool) if allowed is None else allowed
    ok = (proba >= threshold) & allowed
    met = np.asarray(ok.any(axis=1), dtype=bool)
    fallback = int(np.flatnonzero(allowed)[-1])
    chosen: IndexArray = np.where(met, np.argmax(ok, axis=1), fallback).astype(np.int64)
    return chosen, met


def utility_choice(
    proba: FloatArray, costs: FloatArray, cost_weight: float, allowed: Mask | None = None
) -> IndexArray:
    """The allowed tier maximizing probability - cost_weight x normalized cost (ties: the
    cheaper). Sweeping ``cost_weight`` traces the best cost-quality trade-off the probabilities
    allow; over prompt-agnostic scores it traces exactly the best fixed tier mix."""
    value = proba - cost_weight * np.asarray(costs)
    if allowed is not None:
        value = np.where(allowed, value, -np.inf)
    chosen: IndexArray = np.argmax(value, axis=1).astype(np.int64)
    return chosen


RULE_KNOB = {"utility": "cost_weight", "threshold": "min_success"}  # the field each rule turns on


@dataclass(frozen=True)
class RoutingPolicy:
    """How probabilities become a tier; set per request, separate from the model.

    Attributes:
        min_success: the probability a tier must reach, in [0, 1]; 0 = the utility rule.
        allowed_tiers: tiers that may be chosen (empty: all).
        max_price: the highest price per 1M output tokens (USD) a chosen tier may have
            (None: no cap).
        cost_weight: the utility rule's price of cost, finite and >= 0 (None: the model's
            default).
        sticky: a conversation is never routed below the dearest tier it was routed to
            before (among the tiers this request allows); the serving doors keep that state.
    """

    min_success: float = 0.0
    allowed_tiers: tuple[str, ...] = ()
    max_price: float | None = None
    cost_weight: float | None = None
    sticky: bool = False


class TierPrices(Protocol):
    """What routing needs to know of a tier: its name and USD price per 1M tokens (a
    manifest's :class:`classifier.TierSpec`, a tier config's tier)."""

    @property
    def name(self) -> str: ...
    @property
    def price_input(self) -> float: ...
    @property
    def price_output(self) -> float: ...


@dataclass(frozen=True, eq=False)
class Router:
    """A :class:`RoutingPolicy` validated against one model's tiers: build it with
    :meth:`for_tiers` (which raises :class:`PolicyError` for a bad policy), then
    :meth:`choose` as often as needed."""

    tiers: tuple[str, ...]
    costs: npt.NDArray[np.float64]
    allowed: Mask
    min_success: float
    cost_weight: float
    sticky: bool = False

    @classmethod
    def for_tiers(
        cls, policy: RoutingPolicy, tiers: Sequence[TierPrices], default_cost_weight: float
    ) -> Router:
        names = tuple(t.name for t in tiers)
        # the same ranges as every door's (POLICY_FIELDS), checked once more against a model
        if not 0.0 <= policy.min_success <= FIELD["min_success"].hi:  # NaN fails too
            raise PolicyError(f"min_success must be in [0, 1], got {clip(policy.min_success)}")
        cap = FIELD["cost_weight"].hi
        if policy.cost_weight is not None and not 0 <= policy.cost_weight <= cap:
            # inf x a zero cost is NaN, which would pick a tier outside allowed_tiers
            raise PolicyError(
                f"cost_weight must be >= 0 and finite (at most {cap:g}), got "
                f"{clip(policy.cost_weight)}"
            )
        unknown = [t for t in policy.allowed_tiers if t not in names]
        if unknown:
            raise PolicyError(
                f"unknown tier(s) {clip(unknown)}; this model's tiers are {list(names)}"
            )
        allowed = np.array([not policy.allowed_tiers or t in policy.allowed_tiers for t in names])
        if policy.max_price is not None:
            if not policy.max_price >= 0:  # NaN too
                raise PolicyError(f"max_price must be >= 0, got {policy.max_price}")
            allowed &= np.array([t.price_output <= policy.max_price for t in tiers])
        if not allowed.any():
            raise PolicyError("no tier is allowed by allowed_tiers and max_price together")
        costs = normalized_costs([t.price_input for t in tiers], [t.price_output for t in tiers])
        weight = default_cost_weight if policy.cost_weight is None else policy.cost_weight
        return cls(names, costs, allowed, policy.min_success, float(weight), policy.sticky)

    @property
    def rule(self) -> str:
        return "threshold" if self.min_success > 0 else "utility"

    @property
    def knob(self) -> str:
        """The policy field the active rule turns on (see :meth:`knob_ranges`)."""
        return RULE_KNOB[self.rule]

    def choose(self, proba: FloatArray) -> tuple[IndexArray, Mask]:
        """Tier index per row, and whether the threshold was met (always True under the
        utility rule)."""
        if self.min_success > 0:
            return threshold_choice(proba, self.min_success, self.allowed)
        chosen = utility_choice(proba, self.costs, self.cost_weight, self.allowed)
        return chosen, np.ones(len(chosen), dtype=bool)

    def utilities(self, proba: FloatArray) -> FloatArray:
        """Each tier's probability - cost_weight x normalized cost (-inf where not allowed)."""
        value: FloatArray = np.where(self.allowed, proba - self.cost_weight * self.costs, -np.inf)
        return value

    def knob_ranges(self, proba_row: FloatArray) -> list[tuple[float, float] | None]:
        """For one prompt's probabilities, the values of the active rule's knob (``cost_weight``
        under the utility rule, ``min_success`` under the threshold rule) at which each tier
        would be chosen, all else equal: ``(lo, hi)`` per tier (``hi`` may be ``inf``), None
        for a tier no value of the knob chooses. What it would take to move the decision.

        Utility: a tier is chosen for ``lo <= cost_weight < hi`` (at a bound, ties go to the
        cheaper tier). Threshold: for ``lo < min_success <= hi``, within (0, 1]."""
        p = np.asarray(proba_row, dtype=np.float64)
        ok = np.flatnonzero(self.allowed)
        ranges: list[tuple[float, float] | None] = [None] * len(p)
        if self.min_success > 0:
            below = 0.0  # the best probability of the cheaper allowed tiers
            for j in ok:
                hi = 1.0 if j == ok[-1] else float(p[j])  # the dearest also takes the rest
                if hi > below:
                    ranges[j] = (below, hi)
                below = max(below, float(p[j]))
            return ranges
        # the utility rule's choice only moves to cheaper tiers as cost_weight grows: it is
        # piecewise constant between the weights where two tiers' utilities cross
        c = self.costs
        cuts = sorted(
            {0.0}
            | {
                float((p[j] - p[k]) / (c[j] - c[k]))
                for j in ok
                for k in ok
                if c[j] > c[k] and p[j] > p[k]
            }
        )
        probes = [(a + b) / 2 for a, b in itertools.pairwise(cuts)] + [cuts[-1] + 1.0]
        # the tier chosen on each open segment between consecutive cuts, and past the last
        chosen_at = [int(utility_choice(p[None, :], c, w, self.allowed)[0]) for w in probes]
        start = 0.0
        for i, tier in enumerate(chosen_at):
            if i + 1 < len(chosen_at) and chosen_at[i + 1] == tier:
                continue
            hi = cuts[i + 1] if i + 1 < len(cuts) else math.inf
            ranges[tier] = (start, hi)
            start = hi
        return ranges


def within_grant(
    policy: RoutingPolicy,
    tiers: Sequence[str],
    grant: Sequence[str],
    chose_tiers: bool,
    where: str,
) -> RoutingPolicy:
    """``policy`` held to the tiers an operator grants a request that sets its own policy
    (``grant``; empty: every tier of ``tiers``), for the gateway and the LiteLLM plug-in alike.

    Raises:
        PolicyError: the request chose tiers itself (``chose_tiers``) outside the grant; the
            message starts with ``where``.
    """
    if not grant:
        return policy
    asked = policy.allowed_tiers or tuple(tiers)
    if chose_tiers and (beyond := [t for t in asked if t not in grant]):
        raise PolicyError(
            f"{where}: {clip(beyond)} not granted; a request may choose among {list(grant)}"
        )
    within = tuple(t for t in asked if t in grant)
    if not within:  # () would mean "every tier": the request would escape both lists
        raise PolicyError(
            f"{where}: no tier is both allowed by the policy ({list(asked)}) and granted to "
            f"requests ({list(grant)})"
        )
    return replace(policy, allowed_tiers=within)


@dataclass(frozen=True)
class PolicyField:
    """One field of :class:`RoutingPolicy` as every door names and checks it: the attribute is
    also the policy-file key, the LiteLLM metadata key and the proto field; ``header`` follows
    ``x-tierpick-``; the CLI flag is ``--`` + the name with dashes. Adding a policy field is an
    entry here, the attribute, and the proto field."""

    name: str
    header: str
    help: str
    lo: float = 0.0
    hi: float = math.inf
    tiers: bool = False  # a list of tier names, not a number
    switch: bool = False  # true or false, not a number

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: object) -> Any:
        """The field's value from JSON/YAML (a policy file, request metadata; None: not set).

        Raises:
            ValueError: what is wrong with ``value`` (``must be ...``), without a key.
        """
        if value is None:
            return None
        if self.switch:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {clip(value)}")
            return value
        if self.tiers:
            if (
                not isinstance(value, list | tuple)
                or len(value) > MAX_TIERS
                or not all(isinstance(t, str) for t in value)
            ):
                raise ValueError(
                    f"must be a list of at most {MAX_TIERS} tier names, got {clip(value)}"
                )
            return tuple(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not self.lo <= value <= self.hi  # NaN fails too
        ):
            raise ValueError(
                f"must be a number in [{float(self.lo)}, {float(self.hi)}], got {clip(value)}"
            )
        return float(value)

    def from_value(self, value: object, where: str) -> Any:
        """:meth:`check`, its error a :class:`ConfigError` naming ``where``."""
        try:
            return self.check(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def from_text(self, text: str, where: str) -> Any:
        """The field's value from text (a header, a command-line flag): a comma list of tiers,
        or a number; a bad one is a :class:`PolicyError` naming ``where``."""
        if self.switch:
            word = text.strip().lower()
            if word not in SWITCH_WORDS:
                raise PolicyError(f"{where}: not true or false: {clip(text, 100)}")
            return SWITCH_WORDS[word]
        if self.tiers:
            names = tuple(t.strip() for t in text.split(",", MAX_TIERS) if t.strip())
            if len(names) > MAX_TIERS:
                raise PolicyError(f"{where}: more than {MAX_TIERS} tiers")
            return names
        try:
            x = float(text)
        except ValueError:
            raise PolicyError(f"{where}: not a number: {clip(text, 100)}") from None
        if not math.isfinite(x):
            raise PolicyError(f"{where}: not a finite number: {clip(text, 100)}")
        return x


POLICY_FIELDS = (
    PolicyField(
        "min_success",
        "min-success",
        "threshold rule: the probability the chosen tier must reach (0: the utility rule)",
        hi=1.0,
    ),
    PolicyField(
        "allowed_tiers", "allowed-tiers", "the tiers that may be chosen (comma list)", tiers=True
    ),
    PolicyField(
        "max_price", "max-price", "the highest USD per 1M output tokens a chosen tier may cost"
    ),
    PolicyField("cost_weight", "cost-weight", "utility rule: the price of cost", hi=1e12),
    PolicyField(
        "sticky",
        "sticky",
        "never route a conversation below the dearest tier it was routed to (true or false)",
        switch=True,
    ),
)
SWITCH_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
POLICY_KEYS = tuple(f.name for f in POLICY_FIELDS)
FIELD = {f.name: f for f in POLICY_FIELDS}


def overlay(base: RoutingPolicy, values: Mapping[str, Any]) -> RoutingPolicy:
    """``base`` with each field in ``values`` (by name) replacing its own: how every door lays
    a request's policy over the server's, the one step they share."""
    return replace(base, **dict(values)) if values else base


# How a call's cost is estimated where only its prompt is known (report, tune, savings, label's
# budget, the live guard): input tokens from the prompt's characters, a fixed output length.
CHARS_PER_TOKEN = 4.0
OUTPUT_TOKENS = 300


def call_costs(
    chars: npt.ArrayLike,
    tiers: Sequence[TierPrices],
    output_tokens: int = OUTPUT_TOKENS,
    chars_per_token: float = CHARS_PER_TOKEN,
) -> npt.NDArray[np.float64]:
    """USD per call, (prompts, tiers): ceil(characters / chars_per_token) input tokens and
    ``output_tokens`` output tokens at each tier's prices per 1M tokens."""
    tokens = np.ceil(np.asarray(chars, dtype=np.float64) / chars_per_token)
    p_in = np.array([t.price_input for t in tiers], dtype=np.float64)
    p_out = np.array([t.price_output for t in tiers], dtype=np.float64)
    cost: npt.NDArray[np.float64] = (tokens[:, None] * p_in + output_tokens * p_out) / 1e6
    return cost


ECHO_CHARS = 200  # a value quoted back in an error is cut to this many characters
MAX_TIERS = 64  # a list of tiers longer than this is not a real one (it comes from clients)


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: errors quote what they were given, never
    all of it (a client or a file can send megabytes)."""
    if isinstance(value, list | tuple) and len(value) > 8:  # never the repr of all of it
        return clip(list(value[:8]), limit)[:-1] + f", ... ({len(value)} items)]"
    text = value if isinstance(value, str) else repr(value)[: 4 * limit]
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


__all__ = [
    "ECHO_CHARS",
    "FIELD",
    "POLICY_FIELDS",
    "POLICY_KEYS",
    "PolicyField",
    "Router",
    "RoutingPolicy",
    "TierPrices",
    "clip",
    "normalized_costs",
    "overlay",
    "platt",
    "rescale",
    "sigmoid",
    "threshold_choice",
    "utility_choice",
    "within_grant",
]
