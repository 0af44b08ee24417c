"""k-means over prompt embeddings, shared by ``tierpick label`` (strata of a log) and
``tierpick adapt`` (the memory's clusters): numpy only, deterministic for a seed."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


def unit_rows(x: npt.ArrayLike) -> Array:
    """Rows scaled to unit length (a zero row stays near zero)."""
    a = np.asarray(x, dtype=np.float64)
    out: Array = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-9)
    return out


def kmeans(x: npt.ArrayLike, k: int, seed: int, iterations: int = 25) -> Array:
    """Centroids of a k-means of the rows of ``x`` scaled to unit length (k-means++ seeding;
    empty clusters dropped): each the mean of its unit rows, so a row's cluster is the centroid
    with the largest dot product (:func:`assign`; a tight cluster's centroid is longer)."""
    u = unit_rows(x)
    n = len(u)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centers = [u[rng.integers(n)]]
    dist = np.full(n, np.inf)
    for _ in range(1, k):
        dist = np.minimum(dist, ((u - centers[-1]) ** 2).sum(axis=1))
        total = dist.sum()
        centers.append(u[rng.choice(n, p=dist / total)] if total > 0 else u[rng.integers(n)])
    c = np.stack(centers)
    for _ in range(iterations):
        labels = np.argmax(u @ c.T, axis=1)
        new = np.stack(
            [u[labels == j].mean(axis=0) if (labels == j).any() else c[j] for j in range(k)]
        )
        if np.allclose(new, c):
            break
        c = new
    labels = np.argmax(u @ c.T, axis=1)
    return np.stack([u[labels == j].mean(axis=0) for j in np.unique(labels)])


def assign(x: npt.ArrayLike, centroids: Array) -> npt.NDArray[np.int64]:
    """Each row's cluster: the centroid with the largest dot product with its unit row."""
    labels: npt.NDArray[np.int64] = np.argmax(unit_rows(x) @ centroids.T, axis=1)
    return labels
