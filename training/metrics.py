"""Evaluation metrics: per-tier discrimination and calibration, and routing quality against cost.

Routing model: tiers are ordered cheapest first; a router gives each prompt a score per tier,
and the rules that serve (:mod:`classifier.routing`) turn scores into tiers: the utility rule
(the headline) sends a prompt to the tier maximizing score - w x cost; the threshold rule sends
it to the cheapest tier whose score reaches ``t``. Sweeping ``w`` (or ``t``)
traces quality (the chosen tier's observed success on that prompt) against cost. Cost per call is
:func:`classifier.routing.normalized_costs`: input + output price per 1M tokens (equal input and
output token counts assumed), cheapest tier 0, dearest 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tierpick.classifier.routing import threshold_choice, utility_choice

Array = npt.NDArray[np.float64]
# Below this quality gap between two tiers, PGR divides by noise and APGR is not reported.
MIN_GAP = 0.02
THRESHOLDS = np.concatenate([np.linspace(0.0, 1.0, 201), [1.0 + 1e-9]])
# Cost weights swept by the utility rule: 0 picks the best score, 1e9 the cheapest tier.
COST_WEIGHTS = np.concatenate([[0.0], np.geomspace(1e-4, 1e2, 300), [1e9]])


def roc_auc(y_soft: Array, p: Array) -> float | None:
    """ROC AUC against the binarized target (success if >= 0.5); None with one class only."""
    from sklearn.metrics import roc_auc_score

    y = (np.asarray(y_soft) >= 0.5).astype(int)
    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, p))


def brier(y_soft: Array, p: Array) -> float:
    return float(np.mean((np.asarray(p) - np.asarray(y_soft)) ** 2))


def reliability(y_soft: Array, p: Array, bins: int = 10) -> list[dict[str, float]]:
    """Equal-width probability bins: count, mean predicted probability, mean observed success."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y_soft, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out.append(
                {
                    "lo": b / bins,
                    "hi": (b + 1) / bins,
                    "count": int(sel.sum()),
                    "mean_p": float(p[sel].mean()),
                    "mean_y": float(y[sel].mean()),
                }
            )
    return out


def ece(y_soft: Array, p: Array, bins: int = 10) -> float:
    """Expected calibration error: the count-weighted mean |mean p - mean y| over bins."""
    rel = reliability(y_soft, p, bins)
    n = sum(r["count"] for r in rel)
    return float(sum(r["count"] * abs(r["mean_p"] - r["mean_y"]) for r in rel) / max(n, 1))


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Curve:
    """A router's operating points, sorted by cost: normalized cost, quality, tier shares."""

    params: Array  # the cost weight (utility rule) or threshold (threshold rule) of each point
    cost: Array  # normalized, 0 = cheapest tier only, 1 = dearest only
    quality: Array
    shares: Array  # (points, n_tiers)


def sweep(scores: Array, quality: Array, costs: Array, rule: str = "utility") -> Curve:
    """Trace the cost-quality curve of a router.

    Args:
        scores: (n, k) router scores, tiers cheapest first.
        quality: (n, k) observed success of each tier on each prompt.
        costs: (k,) normalized cost per call of each tier (see ``normalized_costs``).
        rule: "utility" (sweep the cost weight) or "threshold" (sweep the threshold).
    """
    n, k = quality.shape
    norm = costs
    rows = np.arange(n)
    params = COST_WEIGHTS if rule == "utility" else THRESHOLDS
    pts = []
    for value in params:
        choice = (
            utility_choice(scores, norm, value)
            if rule == "utility"
            else threshold_choice(scores, value)[0]
        )
        pts.append(
            (
                value,
                float(norm[choice].mean()),
                float(quality[rows, choice].mean()),
                np.bincount(choice, minlength=k) / n,
            )
        )
    pts.sort(key=lambda r: (r[1], r[2]))
    return Curve(
        params=np.array([p[0] for p in pts]),
        cost=np.array([p[1] for p in pts]),
        quality=np.array([p[2] for p in pts]),
        shares=np.array([p[3] for p in pts]),
    )


def mix_curve(quality: Array, costs: Array) -> Curve:
    """The best prompt-agnostic tier mix: the upper concave hull of the single-tier points
    (a fixed share of traffic to each tier achieves any point on it)."""
    q = quality.mean(axis=0)
    x = costs
    order = np.argsort(x, kind="stable")
    hull: list[int] = []
    for i in order:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or below the segment a -> i
            if (q[b] - q[a]) * (x[i] - x[a]) <= (q[i] - q[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(int(i))
    # tiers dearer than the best-quality hull point add nothing; keep the curve monotone
    best = int(np.argmax([q[i] for i in hull]))
    hull = hull[: best + 1] + ([int(order[-1])] if hull[best] != order[-1] else [])
    xs = np.array([x[i] for i in hull])
    qs = np.array([q[i] if j <= best else q[hull[best]] for j, i in enumerate(hull)])
    shares = np.eye(len(costs))[hull]
    return Curve(np.full(len(hull), np.nan), xs, qs, shares)


def _interp_at(curve_x: Array, curve_y: Array, x: Array) -> Array:
    return np.interp(x, curve_x, curve_y)


def pgr(quality: Array, q_weak: float, q_strong: float) -> Array:
    gap = q_strong - q_weak
    return (quality - q_weak) / gap if abs(gap) > 1e-12 else np.zeros_like(quality)


def area(curve_x: Array, curve_y: Array) -> float:
    """Area under a piecewise-linear curve over x in [0, 1] (extended flat at the ends)."""
    grid = np.linspace(0.0, 1.0, 1001)
    ys = _interp_at(curve_x, curve_y, grid)
    return float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(grid)))


def cost_to_reach(curve_x: Array, curve_y: Array, target: float) -> float | None:
    """The smallest x at which the curve reaches ``target`` (linear between points), or None."""
    for i, (x, y) in enumerate(zip(curve_x, curve_y, strict=True)):
        if y >= target - 1e-12:
            if i == 0:
                return float(x)
            x0, y0 = curve_x[i - 1], curve_y[i - 1]
            return float(x0 + (x - x0) * (target - y0) / (y - y0)) if y > y0 else float(x)
    return None


def routing_summary(curve: Curve, quality: Array) -> dict[str, float | None]:
    """N-tier figures of one router's curve: APGR over normalized cost, CPT(50%), CPT(80%), and
    the normalized cost at 95% and 100% of the top tier's quality."""
    q_each = quality.mean(axis=0)
    q_cheap, q_top = float(q_each[0]), float(q_each[-1])
    g = pgr(curve.quality, q_cheap, q_top)
    return {
        "apgr": area(curve.cost, g),
        "cpt50": cost_to_reach(curve.cost, g, 0.5),
        "cpt80": cost_to_reach(curve.cost, g, 0.8),
        "cost_at_95pct_top": cost_to_reach(curve.cost, curve.quality, 0.95 * q_top),
        "cost_at_100pct_top": cost_to_reach(curve.cost, curve.quality, q_top),
        "max_quality": float(curve.quality.max()),
    }


def pair_apgr(scores: Array, quality: Array, weak: int, strong: int) -> dict[str, float | None]:
    """RouteLLM's two-model APGR between ``weak`` and ``strong`` only: a prompt goes to ``strong``
    when its score advantage (score_strong - score_weak) exceeds a threshold, swept over all
    values; PGR is integrated over the share of calls to ``strong``."""
    q_w, q_s = quality[:, weak], quality[:, strong]
    if q_s.mean() - q_w.mean() < MIN_GAP:
        return {"apgr": None, "cpt50": None, "cpt80": None}  # no gap to recover
    d = scores[:, strong] - scores[:, weak]
    cuts = np.concatenate([[-np.inf], np.unique(np.quantile(d, np.linspace(0, 1, 201))), [np.inf]])
    xs, ys = [], []
    for c in cuts:
        to_strong = d > c
        xs.append(float(to_strong.mean()))
        ys.append(float(np.where(to_strong, q_s, q_w).mean()))
    order = np.lexsort((np.array(ys), np.array(xs)))
    x, q = np.array(xs)[order], np.array(ys)[order]
    g = pgr(q, float(q_w.mean()), float(q_s.mean()))
    return {
        "apgr": area(x, g),
        "cpt50": cost_to_reach(x, g, 0.5),
        "cpt80": cost_to_reach(x, g, 0.8),
    }


def pick_cost_weight(curve: Curve, quality: Array, target_quality: float) -> float:
    """The cost weight of the cheapest utility-rule operating point reaching ``target_quality``
    x the top tier's quality (the highest-quality point when none does)."""
    q_top = float(quality.mean(axis=0)[-1])
    ok = np.flatnonzero(curve.quality >= target_quality * q_top)
    i = int(ok[np.argmin(curve.cost[ok])]) if ok.size else int(np.argmax(curve.quality))
    return float(curve.params[i])
