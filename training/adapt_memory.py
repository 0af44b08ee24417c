"""Per-prompt adaptation: a small model of a team's own outcomes over the student's prompt
embedding, added to the parent's calibrated logits, and written into the graph.

For tier k and a prompt with parent logit z_k and embedding e (the student's pooled token
vectors, the graph's ``embedding`` output)::

    logit_k = a z_k + b_k  +  f(e) . (w + v_k)

``a z_k + b_k`` is the recalibrated parent (:func:`tierpick.training.adapt._calibrate`: one
slope, an intercept per tier). ``f(e)`` is the one-hot cluster of ``e`` in each of
``CLUSTERINGS`` k-means clusterings of the team's graded prompts (``CLUSTERS`` clusters each:
the kinds of traffic, whose tier success rates the parent may have wrong), then ``e``
standardized (what the prompt says, finer than a cluster). ``w`` is shared by the tiers and
``v_k`` is tier k's own; both are pulled to 0 by an L2 penalty (``CLUSTER_PENALTY`` on the
cluster columns, ``EMBEDDING_PENALTY`` on the embedding's, three times that on ``v_k``), so few
outcomes move the parent little and a tier without outcomes keeps the parent's calibration
exactly.

Measured per family of ../shared/data, each from the model trained without it (leave one
family out), fitted on 500 of its prompts and evaluated on the rest (3 random draws,
``training.adapt_study``): N-tier APGR 0.666 (parent) -> 0.682 (calibration alone) -> 0.706
(this), against 0.675 for a kNN over the same embedding fitted on the same outcomes. Settings
were chosen on those draws in a prototype: pooled token vectors beat the projected embedding
(+0.015), 3 clusterings beat 1 (+0.006), a cluster one-hot beat the embedding alone (+0.012),
penalties 10/600 beat 3/1000, 10/300, 30/300 and 10/1000 by 0.001-0.005; a tier's own weights
costing 1x, 3x or 10x the shared ones, and averaging with a kNN, moved it by less than 0.004.

The graph: the parent's ``logits`` become ``parent_logits``, and new nodes compute the formula
above into a new ``logits`` (the manifest's calibration becomes the identity). Its cost does
not grow with the number of graded prompts: a few small matrix products (a 512 x 48 and a
512 x 3 one). A graph exported before it had an ``embedding`` output gets one first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierpick.classifier.artifact import EMBEDDING_OUTPUT, LOGITS_OUTPUT
from tierpick.classifier.cluster import assign, kmeans, unit_rows
from tierpick.classifier.errors import ArtifactError
from tierpick.classifier.routing import sigmoid

Array = np.ndarray

CLUSTERS = 16
CLUSTERINGS = 3
CLUSTER_PENALTY = 10.0
EMBEDDING_PENALTY = 600.0
TIER_PENALTY_FACTOR = 3.0  # a tier's own weights cost this much more than the shared ones
MIN_PER_CLUSTER = 8  # clusters are at most (graded prompts / this)


@dataclass
class Memory:
    """A fitted per-prompt adaptation (see the module)."""

    centroids: list[Array]  # per clustering, (clusters, width), unit rows
    mean: Array  # (width,) standardization of the embedding
    scale: Array
    weight: Array  # (tiers, sum of clusters + width): w + v_k per tier
    a: Array  # (tiers,) the recalibrated parent's slope per tier (one value, or the parent's)
    b: Array

    def features(self, e: Array) -> Array:
        blocks = [np.eye(len(c))[assign(e, c)] for c in self.centroids]
        return np.hstack([*blocks, (e - self.mean) / self.scale])

    def ambiguous(self, e: Array, tol: float = 1e-4) -> Array:
        """Rows within ``tol`` of a cluster boundary in some clustering: their two nearest
        centroids are about as near, so the graph (float32) may assign them to either one.
        Both are the memory's answer; a check that the graph reproduces it skips these."""
        out: Array = np.zeros(len(e), dtype=bool)
        for c in self.centroids:
            near = np.sort(unit_rows(e) @ c.T, axis=1)
            out |= near[:, -1] - near[:, -2] < tol  # every clustering has 2 clusters or more
        return out

    def logits(self, z: Array, e: Array) -> Array:
        out: Array = z * self.a + self.b + self.features(e) @ self.weight.T
        return out

    def proba(self, z: Array, e: Array) -> Array:
        return sigmoid(self.logits(z, e))

    @property
    def size(self) -> dict[str, int]:
        return {
            "clusters": int(sum(len(c) for c in self.centroids)),
            "width": len(self.mean),
        }


def fit_memory(
    e: Array,
    z: Array,
    targets: Array,
    mask: Array,
    a: Array,
    b: Array,
    tiers: list[int],
    seed: int = 0,
) -> Memory:
    """Fit the residual weights of ``tiers`` (the others stay at 0: the recalibrated parent)
    on the rows given; clusters and standardization come from the same rows."""
    from scipy.optimize import minimize

    k = max(2, min(CLUSTERS, len(e) // MIN_PER_CLUSTER))
    centroids = [kmeans(e, k, seed + i) for i in range(CLUSTERINGS)]
    mean, scale = e.mean(axis=0), e.std(axis=0) + 1e-6
    draft = Memory(centroids, mean, scale, np.zeros((targets.shape[1], 0)), a, b)
    x = draft.features(e)
    base = z * a + b
    n_clusters = x.shape[1] - e.shape[1]
    shared = np.concatenate(
        [np.full(n_clusters, CLUSTER_PENALTY), np.full(e.shape[1], EMBEDDING_PENALTY)]
    )
    own = shared * TIER_PENALTY_FACTOR
    d, t = x.shape[1], targets.shape[1]
    rows = {j: mask[:, j] > 0 for j in tiers}

    def loss(theta: Array) -> tuple[float, Array]:
        w, v = theta[:d], theta[d:].reshape(len(tiers), d)
        value = float(np.sum(shared * w * w) + np.sum(own * v * v))
        gw, gv = 2 * shared * w, 2 * own * v
        for i, j in enumerate(tiers):
            sel = rows[j]
            u = base[sel, j] + x[sel] @ (w + v[i])
            y = targets[sel, j]
            value += float(np.sum(np.logaddexp(0.0, u) - y * u))
            g = x[sel].T @ (sigmoid(u) - y)
            gw += g
            gv[i] += g
        return value, np.concatenate([gw, gv.ravel()])

    theta = minimize(
        loss, np.zeros(d * (len(tiers) + 1)), jac=True, method="L-BFGS-B", options={"maxiter": 300}
    ).x
    weight = np.zeros((t, d))
    w, v = theta[:d], theta[d:].reshape(len(tiers), d)
    for i, j in enumerate(tiers):
        weight[j] = w + v[i]
    return Memory(centroids, mean, scale, weight, a, b)


# ----------------------------------------------------------------------------- the graph


def embedding_tensor(model: Any) -> str:
    """The name of the graph's prompt-embedding tensor: its ``embedding`` output, or, in a
    student exported before it had one, the input of its projection's first Gemm."""
    g = model.graph
    if any(o.name == EMBEDDING_OUTPUT for o in g.output):
        return EMBEDDING_OUTPUT
    for node in g.node:
        if node.op_type == "Gemm" and node.input[1] == "proj.0.weight":
            return str(node.input[0])
    raise ArtifactError(
        "the graph has no embedding output and is not a student tierpick can read one from "
        "(retrain it with this version)"
    )


def with_embedding(model: Any) -> tuple[Any, str]:
    """``model`` with an ``embedding`` output (added when missing), and the tensor's name."""
    import onnx

    name = embedding_tensor(model)
    if name != EMBEDDING_OUTPUT:
        model.graph.node.append(onnx.helper.make_node("Identity", [name], [EMBEDDING_OUTPUT]))
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(
                EMBEDDING_OUTPUT, onnx.TensorProto.FLOAT, ["batch", "width"]
            )
        )
    return model, EMBEDDING_OUTPUT


def read_features(clf: Any, prompts: list[str]) -> tuple[Array, Array]:
    """(parent logits, embedding) of each prompt, computed by ONNX Runtime on the parent's
    exported graph (an embedding output added in memory when it has none)."""
    import onnx
    import onnxruntime as ort

    graph = Path(clf.model_dir) / clf.manifest.graph
    model, _ = with_embedding(onnx.load(str(graph)))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = clf.token_ids(prompts)
    z = clf.infer(ids, session).astype(np.float64)
    e = clf.infer(ids, session, EMBEDDING_OUTPUT).astype(np.float64)
    return z, e


def write_graph(parent_graph: Path, memory: Memory, out: Path) -> None:
    """The parent graph with ``memory`` added (see the module), saved to ``out``."""
    import onnx
    from onnx import helper, numpy_helper

    model, emb = with_embedding(onnx.load(str(parent_graph)))
    g = model.graph
    producer = next(n for n in g.node if LOGITS_OUTPUT in n.output)
    producer.output[list(producer.output).index(LOGITS_OUTPUT)] = "tierpick/parent_logits"
    inits: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, value: Array, dtype: Any = np.float32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"tierpick/{name}"))
        return f"tierpick/{name}"

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [f"tierpick/{name}"], **attrs))
        return f"tierpick/{name}"

    base = node(
        "Add",
        [
            node("Mul", ["tierpick/parent_logits", const("a", memory.a)], "scaled"),
            const("b", memory.b),
        ],
        "base",
    )
    norm = node("ReduceL2", [emb], "norm", axes=[1], keepdims=1)
    unit = node(
        "Div", [emb, node("Max", [norm, const("eps", np.array(1e-9))], "norm_floor")], "unit"
    )
    blocks = []
    onoff = const("onoff", np.array([0.0, 1.0]))
    for i, c in enumerate(memory.centroids):
        sims = node("MatMul", [unit, const(f"centroids{i}", c.T)], f"sims{i}")
        idx = node("ArgMax", [sims], f"cluster{i}", axis=1, keepdims=0)
        blocks.append(
            node(
                "OneHot",
                [idx, const(f"depth{i}", np.array(len(c)), np.int64), onoff],
                f"onehot{i}",
                axis=-1,
            )
        )
    standard = node(
        "Div",
        [node("Sub", [emb, const("mean", memory.mean)], "centred"), const("scale", memory.scale)],
        "standard",
    )
    feats = node("Concat", [*blocks, standard], "features", axis=1)
    residual = node("MatMul", [feats, const("weight", memory.weight.T)], "residual")
    nodes.append(helper.make_node("Add", [base, residual], [LOGITS_OUTPUT]))
    g.node.extend(nodes)
    g.initializer.extend(inits)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


__all__ = ["Memory", "fit_memory", "read_features", "with_embedding", "write_graph"]
