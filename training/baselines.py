"""Reference routers computed in the same run as the model, on the same prompts: a random router,
a per-category prior, TF-IDF + logistic regression, and the oracle. (The best prompt-agnostic
tier mix is a curve, see :func:`training.metrics.mix_curve`.)"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


def random_scores(n: int, k: int, seed: int) -> Array:
    return np.random.default_rng(seed).random((n, k))


def category_prior(
    train_tasks: Sequence[str], train_targets: Array, train_mask: Array, tasks: Sequence[str]
) -> Array:
    """Each tier's mean training success in the prompt's task (global mean for unseen tasks)."""
    k = train_targets.shape[1]
    sums: dict[str, Array] = collections.defaultdict(lambda: np.zeros(k))
    counts: dict[str, Array] = collections.defaultdict(lambda: np.zeros(k))
    for task, y, m in zip(train_tasks, train_targets, train_mask, strict=True):
        sums[task] += np.where(m > 0, y, 0.0)
        counts[task] += m
    glob = np.where(train_mask > 0, train_targets, 0).sum(0) / np.maximum(train_mask.sum(0), 1)
    out = np.zeros((len(tasks), k))
    for i, task in enumerate(tasks):
        c = counts.get(task)
        out[i] = glob if c is None else np.where(c > 0, sums[task] / np.maximum(c, 1), glob)
    return out


def tfidf_lr(
    train_prompts: Sequence[str],
    train_targets: Array,
    train_mask: Array,
    prompts: Sequence[str],
    seed: int,
) -> Array:
    """One logistic regression per tier on word 1-2-gram TF-IDF; soft targets as sample weights."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=200_000, sublinear_tf=True)
    x_train = vec.fit_transform(train_prompts)
    x = vec.transform(prompts)
    k = train_targets.shape[1]
    out = np.zeros((len(prompts), k))
    for j in range(k):
        sel = np.flatnonzero(train_mask[:, j] > 0)
        y = train_targets[sel, j]
        # each prompt appears once as a success (weight y) and once as a failure (weight 1 - y)
        xs = x_train[np.concatenate([sel, sel])]
        labels = np.concatenate([np.ones(len(sel)), np.zeros(len(sel))])
        weights = np.concatenate([y, 1 - y])
        keep = weights > 0
        if len(set(labels[keep])) < 2:
            out[:, j] = float(y.mean()) if len(y) else 0.5
            continue
        lr = LogisticRegression(C=4.0, max_iter=2000, random_state=seed)
        lr.fit(xs[keep], labels[keep], sample_weight=weights[keep])
        out[:, j] = lr.predict_proba(x)[:, 1]
    return out


def knn(
    train_emb: Array,
    train_targets: Array,
    train_mask: Array,
    emb: Array,
    k: int,
) -> Array:
    """Each tier's mean success over the ``k`` training prompts nearest by cosine similarity
    (among those with an outcome for the tier; the tier's overall mean when none has)."""
    norm = train_emb / np.maximum(np.linalg.norm(train_emb, axis=1, keepdims=True), 1e-12)
    overall = np.where(train_mask > 0, train_targets, 0).sum(0) / np.maximum(train_mask.sum(0), 1)
    k = max(1, min(k, len(train_emb)))
    out = np.zeros((len(emb), train_targets.shape[1]))
    for s in range(0, len(emb), 1024):
        q = emb[s : s + 1024]
        sim = (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)) @ norm.T
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        m, y = train_mask[idx], train_targets[idx]
        n = m.sum(1)
        out[s : s + 1024] = np.where(n > 0, (y * m).sum(1) / np.maximum(n, 1), overall)
    return out


KNN_K = (5, 10, 25, 50, 100, 200)


def tuned_knn(
    train_emb: Array,
    train_targets: Array,
    train_mask: Array,
    val_emb: Array,
    val_targets: Array,
    val_mask: Array,
) -> int:
    """The k of :func:`knn` with the lowest masked Brier score on the validation prompts."""

    def brier(k: int) -> float:
        p = knn(train_emb, train_targets, train_mask, val_emb, k)
        return float((((p - val_targets) ** 2) * val_mask).sum() / max(val_mask.sum(), 1))

    return min(KNN_K, key=brier)
