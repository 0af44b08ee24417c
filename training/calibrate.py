"""Per-tier Platt calibration: p = sigmoid(a * logit + b), fitted on the validation split against
soft targets (masked cells left out), so probabilities of different tiers compare to one
threshold."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from tierpick.classifier.routing import sigmoid

Array = npt.NDArray[np.float64]


def _bce(s: Array, y: Array) -> float:
    """Mean binary cross-entropy of logits ``s`` against soft targets, computed stably."""
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def fit_platt(logits: Array, targets: Array, mask: Array) -> tuple[list[float], list[float]]:
    """Fit (a, b) per tier by minimizing binary cross-entropy (damped Newton steps).

    Args:
        logits, targets, mask: (n, k); targets are soft successes in [0, 1].

    Returns:
        Two lists of k floats. A tier with fewer than 20 validation outcomes keeps (1, 0).
    """
    k = logits.shape[1]
    a_out, b_out = [], []
    for j in range(k):
        sel = mask[:, j] > 0
        z, y = logits[sel, j].astype(np.float64), targets[sel, j].astype(np.float64)
        if sel.sum() < 20:
            a_out.append(1.0)
            b_out.append(0.0)
            continue
        a, b = 1.0, 0.0
        for _ in range(100):
            p = sigmoid(a * z + b)
            g = np.array([np.sum((p - y) * z), np.sum(p - y)])
            w = p * (1 - p) + 1e-9
            h = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]])
            h += np.eye(2) * 1e-6
            step = np.linalg.solve(h, g)
            current, t = _bce(a * z + b, y), 1.0
            while _bce((a - t * step[0]) * z + (b - t * step[1]), y) > current and t > 1e-6:
                t /= 2  # backtrack: a full Newton step can overshoot from far away
            a, b = a - t * step[0], b - t * step[1]
            if np.abs(t * step).max() < 1e-8:
                break
        a_out.append(float(a))
        b_out.append(float(b))
    return a_out, b_out


def fit_platt_shared(
    logits: Array,
    targets: Array,
    mask: Array,
    tiers: Array | None = None,
    min_slope: float | None = None,
) -> tuple[float, list[float]]:
    """One slope ``a`` for the given tiers and one intercept ``b`` per tier, minimizing binary
    cross-entropy over every labelled cell (damped Newton steps on the k + 1 parameters).

    A common slope keeps the student's differences between tiers (what the utility rule routes
    on) in proportion while each tier's level moves: refitting a slope per tier on a few hundred
    outcomes re-weighs the tiers against each other by noise (measured in ``tierpick adapt``).

    Args:
        logits, targets, mask: (n, k); targets are soft successes in [0, 1].
        tiers: indices of the tiers to fit (default: all); the others get (1, 0).
        min_slope: when the best slope is below it, the slope is held at ``min_slope`` and only
            the intercepts are fitted.

    Returns:
        The slope, and k intercepts (0 for tiers not fitted).
    """
    k = logits.shape[1]
    cols = np.arange(k) if tiers is None else np.asarray(tiers, dtype=np.int64)
    sel = [mask[:, j] > 0 for j in cols]
    zs = [logits[s, j].astype(np.float64) for s, j in zip(sel, cols, strict=True)]
    ys = [targets[s, j].astype(np.float64) for s, j in zip(sel, cols, strict=True)]
    total = sum(len(z) for z in zs)

    def loss(theta: Array) -> float:
        return (
            sum(
                _bce(theta[0] * z + theta[1 + i], y) * len(z)
                for i, (z, y) in enumerate(zip(zs, ys, strict=True))
            )
            / total
        )

    theta = np.zeros(len(cols) + 1)
    theta[0] = 1.0
    for _ in range(100):
        g = np.zeros_like(theta)
        h = np.eye(len(theta)) * 1e-6
        for i, (z, y) in enumerate(zip(zs, ys, strict=True)):
            p = sigmoid(theta[0] * z + theta[1 + i])
            w = p * (1 - p) + 1e-9
            g[0] += np.sum((p - y) * z)
            g[1 + i] += np.sum(p - y)
            h[0, 0] += np.sum(w * z * z)
            h[0, 1 + i] += np.sum(w * z)
            h[1 + i, 0] += np.sum(w * z)
            h[1 + i, 1 + i] += np.sum(w)
        step = np.linalg.solve(h, g)
        current, t = loss(theta), 1.0
        while loss(theta - t * step) > current and t > 1e-6:
            t /= 2
        theta = theta - t * step
        if np.abs(t * step).max() < 1e-8:
            break
    if min_slope is not None and theta[0] < min_slope:
        theta = _intercepts_at(zs, ys, min_slope)
    b = [0.0] * k
    for i, j in enumerate(cols):
        b[int(j)] = float(theta[1 + i])
    return float(theta[0]), b


def _intercepts_at(zs: list[Array], ys: list[Array], slope: float) -> Array:
    """(slope, b_1..b_k): each tier's intercept fitted alone with the slope held (Newton)."""
    theta = [slope]
    for z, y in zip(zs, ys, strict=True):
        b = 0.0
        for _ in range(100):
            p = sigmoid(slope * z + b)
            step = float(np.clip(np.sum(p - y) / (np.sum(p * (1 - p)) + 1e-9), -5.0, 5.0))
            b -= step
            if abs(step) < 1e-10:
                break
        theta.append(b)
    return np.array(theta)
