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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tierpick.classifier.errors import PolicyError

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
    """

    min_success: float = 0.0
    allowed_tiers: tuple[str, ...] = ()
    max_price: float | None = None
    cost_weight: float | None = None


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

    @classmethod
    def for_tiers(
        cls, policy: RoutingPolicy, tiers: Sequence[TierPrices], default_cost_weight: float
    ) -> Router:
        names = tuple(t.name for t in tiers)
        if not 0.0 <= policy.min_success <= 1.0:  # NaN fails too
            raise PolicyError(f"min_success must be in [0, 1], got {policy.min_success}")
        if policy.cost_weight is not None and not 0 <= policy.cost_weight < math.inf:
            # inf x a zero cost is NaN, which would pick a tier outside allowed_tiers
            raise PolicyError(f"cost_weight must be >= 0 and finite, got {policy.cost_weight}")
        unknown = [t for t in policy.allowed_tiers if t not in names]
        if unknown:
            raise PolicyError(f"unknown tier(s) {unknown}; this model's tiers are {list(names)}")
        allowed = np.array([not policy.allowed_tiers or t in policy.allowed_tiers for t in names])
        if policy.max_price is not None:
            if not policy.max_price >= 0:  # NaN too
                raise PolicyError(f"max_price must be >= 0, got {policy.max_price}")
            allowed &= np.array([t.price_output <= policy.max_price for t in tiers])
        if not allowed.any():
            raise PolicyError("no tier is allowed by allowed_tiers and max_price together")
        costs = normalized_costs([t.price_input for t in tiers], [t.price_output for t in tiers])
        weight = default_cost_weight if policy.cost_weight is None else policy.cost_weight
        return cls(names, costs, allowed, policy.min_success, float(weight))

    @property
    def rule(self) -> str:
        return "threshold" if self.min_success > 0 else "utility"

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


__all__ = [
    "Router",
    "RoutingPolicy",
    "TierPrices",
    "normalized_costs",
    "platt",
    "rescale",
    "sigmoid",
    "threshold_choice",
    "utility_choice",
]
