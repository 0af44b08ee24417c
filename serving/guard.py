"""The live budget guard: a policy stated in plain terms, held on live traffic by adjusting the
utility rule's cost weight.

A target is one of (``tierpick serve --hold ...``):

- ``share``: at most SHARE of the traffic to a tier and the tiers dearer than it
  (``--hold frontier=0.2``: "at most 20% frontier");
- ``spend``: at most USD per 1,000 requests (``--hold spend=2``: "at most $2 per 1k requests"),
  each request's cost estimated as tune and report estimate it (input tokens from the prompt's
  characters, :data:`~tierpick.classifier.routing.OUTPUT_TOKENS` output tokens, the model's
  prices);
- ``quality``: a predicted success of at least Q times always-the-dearest-tier's
  (``--hold quality=0.95``: "quality at least 95% of always-frontier"), by the model's own
  calibrated probabilities.

Every ``every`` decisions, the cost weight that would have met the target on the last
``window`` of them is solved for (their probabilities and costs are kept), and the guard moves
toward it by at most a factor of ``max_step``, so a shift in the prompt mix is followed within
about one window. A request that sets its own cost weight or rule is routed as it asks and not
counted. State (the weight, the window's figure, the target) is exported as metrics.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import Field, ValidationInfo, field_validator

from tierpick.classifier import RoutingPolicy, TierClassifier
from tierpick.classifier.errors import ConfigError
from tierpick.classifier.routing import Router, TierPrices, call_costs, clip, utility_choice
from tierpick.classifier.settings import Settings, StrictInt

LOWEST_WEIGHT, HIGHEST_WEIGHT = 1e-4, 1e3  # the cost weights the guard may use
KINDS = ("share", "spend", "quality")
Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Target:
    """What the guard holds: ``kind`` (:data:`KINDS`), its ``value``, and for a share the
    ``tier`` (its share and that of the tiers dearer than it)."""

    kind: str
    value: float
    tier: str = ""
    window: int = 1000
    every: int = 50
    max_step: float = 2.0

    @classmethod
    def parse(cls, text: str, window: int = 1000) -> Target:
        """``TIER=SHARE``, ``spend=USD_PER_1K`` or ``quality=FRACTION``, as ``--hold`` takes
        it."""
        name, sep, raw = text.partition("=")
        name = name.strip()
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        kind = name if name in ("spend", "quality") else "share"
        ok = {
            "share": 0.0 <= value <= 1.0,
            "spend": 0.0 <= value < math.inf,
            "quality": 0.0 < value <= 1.0,
        }[kind]
        if not sep or not name or not ok:
            raise ConfigError(
                "--hold: expected TIER=SHARE (a share in [0, 1]), spend=USD per 1k requests "
                f"(>= 0) or quality=FRACTION of always-the-dearest-tier (in (0, 1]), got "
                f"{text[:100]!r}"
            )
        if window < 100:
            raise ConfigError(f"--guard-window: at least 100 decisions, got {window}")
        return cls(kind, value, name if kind == "share" else "", window, max(10, window // 20))

    def describe(self) -> str:
        return {
            "share": f"{self.tier} and dearer at {self.value:.0%} of the traffic",
            "spend": f"spend at ${self.value:g} per 1k requests",
            "quality": f"predicted quality at {self.value:.0%} of always-the-dearest-tier",
        }[self.kind] + f" (window {self.window})"


class BudgetGuard:
    """The cost weight the server's policy routes with, held to a :class:`Target`;
    thread-safe."""

    def __init__(self, target: Target, tiers: tuple[str, ...], start_weight: float) -> None:
        self.target, self.tiers = target, tiers
        if target.kind == "share":
            if target.tier not in tiers:
                raise ConfigError(f"--hold: no tier {target.tier!r}; the model's: {list(tiers)}")
            if tiers.index(target.tier) == 0 and target.value < 1.0:
                raise ConfigError(
                    f"--hold {target.tier}={target.value:g}: {target.tier} and the tiers dearer "
                    "than it take all the traffic at any cost weight (share 1.0); hold a dearer "
                    "tier's share instead"
                )
        self.first = tiers.index(target.tier) if target.kind == "share" else 0
        self.weight = min(max(start_weight, LOWEST_WEIGHT), HIGHEST_WEIGHT)
        n, k = target.window, len(tiers)
        self._proba = np.zeros((n, k), dtype=np.float64)
        self._usd = np.zeros((n, k), dtype=np.float64)  # each tier's estimated cost per call
        self._chosen = np.zeros(n, dtype=np.int64)
        self._seen = 0  # decisions observed, all time
        self._since = 0  # since the last adjustment
        self._lock = threading.Lock()

    def policy(self, base: RoutingPolicy) -> RoutingPolicy:
        """``base`` at the cost weight the guard holds now."""
        return replace(base, cost_weight=self.weight)

    def record(
        self,
        chars: npt.ArrayLike,
        proba: npt.ArrayLike,
        chosen: npt.ArrayLike,
        router: Router,
        prices: Sequence[TierPrices],
    ) -> None:
        """Decisions ``router`` made on prompts of ``chars`` characters: :meth:`observe`, each
        call's cost estimated as report and tune estimate it (the tiers' ``prices``)."""
        usd = call_costs(chars, prices)
        self.observe(proba, chosen, usd, router.costs, router.allowed)

    def observe(
        self,
        proba: npt.ArrayLike,
        chosen: npt.ArrayLike,
        usd: npt.ArrayLike,
        norm_costs: Floats,
        allowed: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        """Decisions made at the current weight: their probabilities, tiers, and each tier's
        estimated cost per call (USD); ``norm_costs`` and ``allowed``, the router's normalized
        tier costs and the tiers its policy allows."""
        n = self.target.window
        proba, chosen, usd = np.asarray(proba), np.asarray(chosen), np.asarray(usd)
        with self._lock:
            for row, tier, cost in zip(proba, chosen, usd, strict=True):
                at = self._seen % n
                self._proba[at], self._chosen[at], self._usd[at] = row, tier, cost
                self._seen += 1
            self._since += len(proba)
            k = min(self._seen, n)
            if self._since >= self.target.every and k >= min(n, 100):
                self._since = 0
                solved = self.solve(self._proba[:k], self._usd[:k], norm_costs, allowed)
                step = self.target.max_step
                self.weight = float(np.clip(solved, self.weight / step, self.weight * step))

    @property
    def window_value(self) -> float:
        """The target's figure over the last window, as routed (computed when read: the
        metric's scrape, not every request, pays for it)."""
        with self._lock:
            k = min(self._seen, self.target.window)
            if not k:
                return math.nan
            return self.figure(self._chosen[:k], self._proba[:k], self._usd[:k])

    def figure(self, chosen: npt.NDArray[np.int64], proba: Floats, usd: Floats) -> float:
        """The target's figure for decisions ``chosen``: the share, USD per 1k requests, or the
        predicted success over always-the-dearest-tier's."""
        rows = np.arange(len(chosen))
        if self.target.kind == "share":
            return float((chosen >= self.first).mean())
        if self.target.kind == "spend":
            return float(usd[rows, chosen].mean() * 1000)
        top = float(proba[:, -1].mean())
        return float(proba[rows, chosen].mean() / top) if top > 0 else math.nan

    def meets(self, figure: float) -> bool:
        if self.target.kind == "quality":
            return figure >= self.target.value
        return figure <= self.target.value

    def check_reachable(
        self,
        proba: npt.ArrayLike,
        usd: npt.ArrayLike,
        norm_costs: Floats,
        allowed: npt.NDArray[np.bool_] | None,
        what: str,
    ) -> None:
        """Refuse a target no cost weight meets on these prompts (``what`` names them), saying
        how close the best weight comes: a spend under always-the-cheapest-tier's, say. (A
        share of a dearer tier can always be met, and so can a quality, since the cheapest
        weight routes each prompt to its likeliest tier.)"""
        p, u = np.asarray(proba, dtype=np.float64), np.asarray(usd, dtype=np.float64)
        best = LOWEST_WEIGHT if self.target.kind == "quality" else HIGHEST_WEIGHT
        figure = self.figure(utility_choice(p, norm_costs, best, allowed), p, u)
        if not self.meets(figure):
            unit = {"share": "", "spend": " USD per 1k requests", "quality": ""}[self.target.kind]
            raise ConfigError(
                f"--hold {self.target.kind}={self.target.value:g}: no cost weight meets it; on "
                f"{what} the closest is {figure:.4g}{unit}"
            )

    def solve(
        self,
        proba: Floats,
        usd: Floats,
        norm_costs: Floats,
        allowed: npt.NDArray[np.bool_] | None = None,
    ) -> float:
        """The cost weight that meets the target on these decisions at the least cost pressure
        the target allows: the smallest weight that keeps a share or a spend under it, the
        largest that keeps quality above it (bisection over the weight's logarithm; each
        figure moves one way as the weight rises)."""

        def ok(w: float) -> bool:
            chosen = utility_choice(proba, norm_costs, w, allowed)
            return self.meets(self.figure(chosen, proba, usd))

        rising = self.target.kind != "quality"  # met above the boundary, else below it
        lo, hi = math.log(LOWEST_WEIGHT), math.log(HIGHEST_WEIGHT)
        if (rising and ok(LOWEST_WEIGHT)) or (not rising and ok(HIGHEST_WEIGHT)):
            return LOWEST_WEIGHT if rising else HIGHEST_WEIGHT
        if (rising and not ok(HIGHEST_WEIGHT)) or (not rising and not ok(LOWEST_WEIGHT)):
            return HIGHEST_WEIGHT if rising else LOWEST_WEIGHT  # as near as it gets
        for _ in range(40):
            mid = (lo + hi) / 2
            if ok(math.exp(mid)) == rising:
                hi = mid
            else:
                lo = mid
        return math.exp(hi if rising else lo)


class Hold(Settings):
    """The ``hold:`` mapping of the gateway's config and the LiteLLM plug-in's: a target held
    on the traffic the config's policy routes."""

    window: Annotated[StrictInt, Field(ge=100, le=10_000_000)] = 1000
    target: Annotated[
        Target, Field(description="frontier=0.2, spend=2 or quality=0.95")
    ]  # parsed with the window above

    @field_validator("target", mode="before")
    @classmethod
    def _target(cls, value: object, info: ValidationInfo) -> Target:
        if not isinstance(value, str):
            raise ValueError(
                f"must be a string such as frontier=0.2, spend=2 or quality=0.95, got {clip(value)}"
            )
        return Target.parse(value, info.data.get("window", 1000))

    def conflicts(self, policy: RoutingPolicy, tiers: list[str]) -> Iterator[tuple[str, str]]:
        """(key, problem) for what keeps this target from being held with ``policy``."""
        if self.target.kind == "share" and tiers and self.target.tier not in tiers:
            yield "hold.target", f"no tier {self.target.tier!r} in {tiers}"
        if policy.min_success > 0:
            yield "hold", "adjusts the utility rule's cost weight: policy.min_success must be 0"


def describe_policy(router: Router, hold: Target | None = None) -> str:
    """The active policy in one line: every door's start-up log and ``tierpick_policy``
    metric, and the service's ``GetModelInfo``."""
    if router.rule == "threshold":
        what = f"threshold rule, min_success {router.min_success:g}"
    elif hold is not None:
        what = (
            f"utility rule, cost weight adjusted to hold {hold.describe()}; now "
            f"{router.cost_weight:.4g}"
        )
    else:
        what = f"utility rule, cost_weight {router.cost_weight:g}"
    allowed = [t for t, ok in zip(router.tiers, router.allowed, strict=True) if ok]
    return (
        what
        + (f"; tiers {allowed}" if len(allowed) < len(router.tiers) else "")
        + ("; sticky conversations" if router.sticky else "")
    )


def guard_gauges(guard: Callable[[], BudgetGuard | None], registry: Any) -> None:
    """Export a guard's state on ``registry`` (``tierpick_guard_*``): the one ``guard()``
    returns when scraped (0 while there is none)."""
    from prometheus_client import Gauge

    def read(field: Callable[[BudgetGuard], float]) -> Callable[[], float]:
        return lambda: field(g) if (g := guard()) is not None else 0.0

    for name, what, field in (
        ("cost_weight", "The cost weight the budget guard routes with", lambda g: g.weight),
        ("window_value", "The guard's figure over its last window", lambda g: g.window_value),
        ("target_value", "The guard's target", lambda g: g.target.value),
    ):
        Gauge(f"tierpick_guard_{name}", what, registry=registry).set_function(read(field))


def guard_for(target: Target, clf: TierClassifier, policy: RoutingPolicy) -> BudgetGuard:
    """The guard of ``target`` (``--hold``, a config's ``hold``) for ``clf`` and the base
    ``policy``, refused at start when no weight meets it, else started at the weight that meets
    it on the model's reference prompts (:func:`check_reachable`)."""
    start = policy.cost_weight
    guard = BudgetGuard(
        target, clf.tiers, clf.manifest.default_cost_weight if start is None else start
    )
    check_reachable(guard, clf, policy)
    return guard


def check_reachable(guard: BudgetGuard, clf: TierClassifier, policy: RoutingPolicy) -> None:
    """Before any traffic, on the model's reference prompts (training prompts near its
    centroids, in the artifact), when it has them: refuse a live target no weight meets, and
    start the guard at the weight that meets it there. The plain target is so translated into
    the rule's knob by the model itself, and the first window is routed near the target rather
    than at the policy's weight."""
    texts = clf.reference.prompts if clf.reference is not None else []
    if not texts:
        return
    router = clf.router(policy)
    usd = call_costs([len(t) for t in texts], clf.manifest.tiers)
    what = f"{len(texts)} of the model's reference training prompts"
    proba = clf.predict_proba(texts).astype(np.float64)
    guard.check_reachable(proba, usd, router.costs, router.allowed, what)
    guard.weight = guard.solve(proba, usd, router.costs, router.allowed)
