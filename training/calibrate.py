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
