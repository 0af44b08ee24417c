"""The live budget guard: hold a tier's share of live traffic at a target by adjusting the
utility rule's cost weight.

``tierpick serve --hold-share frontier=0.2`` keeps the share of requests routed to ``frontier``
(and any dearer tier) at 20% of the traffic the server's own policy routes: every ``every``
decisions, the cost weight that would have met the target on the last ``window`` of them is
solved for (their probabilities are kept), and the guard moves toward it by at most a factor of
``max_step``. A shift in the prompt mix is followed within about one window; a request that
sets its own cost weight or rule is routed as it asks and not counted.

State (the cost weight, the window's share, the target) is exported as metrics.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tierpick.classifier.errors import ConfigError
from tierpick.classifier.routing import utility_choice

LOWEST_WEIGHT, HIGHEST_WEIGHT = 1e-4, 1e3  # the cost weights the guard may use


@dataclass(frozen=True)
class ShareTarget:
    """At most ``share`` of the guarded traffic to ``tier`` and the tiers dearer than it."""

    tier: str
    share: float
    window: int = 1000
    every: int = 50
    max_step: float = 2.0

    @classmethod
    def parse(cls, text: str, window: int = 1000) -> ShareTarget:
        """``TIER=SHARE``, as ``--hold-share`` takes it."""
        tier, sep, value = text.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = float("nan")
        if not sep or not tier.strip() or not 0.0 <= share <= 1.0:
            raise ConfigError(
                f"--hold-share: expected TIER=SHARE with SHARE in [0, 1], got {text[:100]!r}"
            )
        if window < 100:
            raise ConfigError(f"--guard-window: at least 100 decisions, got {window}")
        return cls(tier.strip(), share, window, max(10, window // 20))


class BudgetGuard:
    """The cost weight the server's policy routes with, held to a :class:`ShareTarget`;
    thread-safe."""

    def __init__(self, target: ShareTarget, tiers: tuple[str, ...], start_weight: float) -> None:
        if target.tier not in tiers:
            raise ConfigError(f"--hold-share: no tier {target.tier!r}; the model's: {list(tiers)}")
        self.target, self.tiers = target, tiers
        self.first = tiers.index(target.tier)
        if self.first == 0 and target.share < 1.0:  # the cheapest tier and dearer: everything
            raise ConfigError(
                f"--hold-share {target.tier}={target.share:g}: {target.tier} and the tiers "
                "dearer than it take all the traffic at any cost weight (share 1.0); hold a "
                "dearer tier's share instead"
            )
        self.weight = min(max(start_weight, LOWEST_WEIGHT), HIGHEST_WEIGHT)
        self._proba = np.zeros((target.window, len(tiers)), dtype=np.float32)
        self._seen = 0  # decisions observed, all time
        self._since = 0  # since the last adjustment
        self._lock = threading.Lock()
        self.window_share = float("nan")  # of the last window, at the weights then in force
        self._chosen = np.zeros(target.window, dtype=np.int64)

    @property
    def filled(self) -> int:
        return min(self._seen, self.target.window)

    def observe(
        self,
        proba: npt.NDArray[np.floating],
        chosen: npt.NDArray[np.int64],
        costs: npt.NDArray[np.float64],
    ) -> None:
        """Decisions made at the current weight: their probabilities and tiers."""
        n = self.target.window
        with self._lock:
            for row, tier in zip(proba, chosen, strict=True):
                self._proba[self._seen % n] = row
                self._chosen[self._seen % n] = tier
                self._seen += 1
            self._since += len(proba)
            k = self.filled
            self.window_share = float((self._chosen[:k] >= self.first).mean())
            if self._since >= self.target.every and k >= min(n, 100):
                self._since = 0
                solved = self.solve(self._proba[:k], costs)
                step = self.target.max_step
                self.weight = float(np.clip(solved, self.weight / step, self.weight * step))

    def solve(self, proba: npt.NDArray[np.floating], costs: npt.NDArray[np.float64]) -> float:
        """The smallest cost weight whose routing of ``proba`` sends at most the target share
        to the target tier and dearer (bisection: the share falls as the weight rises)."""
        p = np.asarray(proba, dtype=np.float64)

        def share(w: float) -> float:
            return float((utility_choice(p, costs, w) >= self.first).mean())

        lo, hi = np.log(LOWEST_WEIGHT), np.log(HIGHEST_WEIGHT)
        if share(LOWEST_WEIGHT) <= self.target.share:
            return LOWEST_WEIGHT
        if share(HIGHEST_WEIGHT) > self.target.share:
            return HIGHEST_WEIGHT
        for _ in range(40):
            mid = (lo + hi) / 2
            if share(float(np.exp(mid))) <= self.target.share:
                hi = mid
            else:
                lo = mid
        return float(np.exp(hi))
