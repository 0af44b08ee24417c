"""The student's head, refitted on a user's outcomes (``tierpick adapt`` with enough of them).

The student ends in one ``Gemm``: logits = h W^T + b, with h the 256-wide features of the layer
before. The refit reads h for the user's prompts from the exported graph itself (the same ONNX
Runtime path that serves), fits each tier's row of W and b by logistic regression on the
user's outcomes, pulled towards the parent's row (an L2 penalty on the difference, so a few
thousand outcomes move the head without forgetting it), and writes the graph back with the new
initializers; nothing else in the graph changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tierpick.classifier.artifact import LOGITS_OUTPUT
from tierpick.classifier.errors import ArtifactError
from tierpick.classifier.routing import sigmoid

Array = np.ndarray


class Head:
    """The student graph's last ``Gemm`` (logits = feature W^T + b), and a way to read its
    input features."""

    def __init__(self, graph_path: Path) -> None:
        import onnx
        from onnx import numpy_helper

        self.model = onnx.load(str(graph_path))
        g = self.model.graph
        last = next(n for n in g.node if LOGITS_OUTPUT in n.output)
        inits = {i.name: i for i in g.initializer}
        trans_b = {a.name: a.i for a in last.attribute}.get("transB", 0)
        if (
            last.op_type != "Gemm"
            or last.output[0] != LOGITS_OUTPUT
            or last.input[1] not in inits
            or len(last.input) < 3
            or last.input[2] not in inits
            or trans_b != 1
        ):
            raise ArtifactError(
                f"{graph_path}: the graph does not end in a float Gemm head (an int8 export?); "
                "the head can only be refitted on an fp32 student"
            )
        self.feature = last.input[0]
        self.weight_name, self.bias_name = last.input[1], last.input[2]
        self.weight = numpy_helper.to_array(inits[self.weight_name]).astype(np.float64)  # (T, H)
        self.bias = numpy_helper.to_array(inits[self.bias_name]).astype(np.float64)

    def features(self, clf: Any, prompts: list[str]) -> Array:
        """The head's input for each prompt, computed by ONNX Runtime on the exported graph."""
        import onnx
        import onnxruntime as ort

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(self.feature, onnx.TensorProto.FLOAT, None)
        )
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        feats: Array = clf.infer(clf.token_ids(prompts), session, self.feature)
        return feats.astype(np.float64)

    def write(self, weight: Array, bias: Array, path: Path) -> None:
        """The graph with the head's initializers replaced, saved to ``path``."""
        import onnx
        from onnx import numpy_helper

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for init in model.graph.initializer:
            if init.name == self.weight_name:
                init.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), init.name))
            elif init.name == self.bias_name:
                init.CopyFrom(numpy_helper.from_array(bias.astype(np.float32), init.name))
        onnx.save(model, str(path))


def fit_head(
    feats: Array,
    targets: Array,
    mask: Array,
    weight: Array,
    bias: Array,
    tiers: list[int],
    penalty: float,
) -> tuple[Array, Array]:
    """Each tier in ``tiers``: minimize the summed binary cross-entropy of sigmoid(h w + c)
    against its soft targets, plus ``penalty`` x ||w - w_parent||^2 (L-BFGS); the other rows
    stay the parent's."""
    from scipy.optimize import minimize

    new_w, new_b = weight.copy(), bias.copy()
    for k in tiers:
        sel = mask[:, k] > 0
        h, y = feats[sel], targets[sel, k]
        w0 = np.concatenate([weight[k], [bias[k]]])

        def loss(theta: Array, h: Array = h, y: Array = y, w0: Array = w0) -> tuple[float, Array]:
            s = h @ theta[:-1] + theta[-1]
            p = sigmoid(s)
            value = float(np.sum(np.logaddexp(0.0, s) - y * s))
            diff = theta[:-1] - w0[:-1]
            value += penalty * float(diff @ diff)
            grad = np.concatenate([h.T @ (p - y) + 2 * penalty * diff, [np.sum(p - y)]])
            return value, grad

        res = minimize(loss, w0, jac=True, method="L-BFGS-B", options={"maxiter": 200})
        new_w[k], new_b[k] = res.x[:-1], res.x[-1]
    return new_w, new_b
