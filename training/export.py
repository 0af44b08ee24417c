"""Export a trained student to a verified, self-describing model directory (see
:mod:`classifier.artifact`): ``student.onnx`` + ``tokenizer.json`` + ``manifest.json``."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tierpick.classifier.artifact import (
    GRAPH_INPUTS,
    GRAPH_OUTPUTS,
    SCHEMA_VERSION,
    Manifest,
    TierSpec,
    sha256_file,
    write_manifest,
)
from tierpick.training.config import TierConfig
from tierpick.training.encoders import minilm_dir
from tierpick.training.student import Student

GRAPH = "student.onnx"
TOKENIZER = "tokenizer.json"


class _Graph(torch.nn.Module):
    """A student's (or the teacher's) :meth:`~tierpick.training.student.Student.outputs` as the
    module ONNX export traces."""

    def __init__(self, model: Student) -> None:
        super().__init__()
        self.model: Any = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out: tuple[torch.Tensor, torch.Tensor] = self.model.outputs(input_ids, attention_mask)
        return out


def export_onnx(model: Student, path: Path) -> None:
    """Export a student (or the teacher) with dynamic batch and length: the graph contract of
    :mod:`classifier.artifact` (inputs ``GRAPH_INPUTS``, outputs ``GRAPH_OUTPUTS``)."""
    graph = _Graph(model).eval()
    outputs = list(GRAPH_OUTPUTS)
    x = torch.full((1, 4), 1000, dtype=torch.long)
    m = torch.ones((1, 4), dtype=torch.float32)
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated but is the one that works beside transformers 5
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (x, m),
            str(path),
            input_names=list(GRAPH_INPUTS),
            output_names=outputs,
            dynamic_axes={
                **{name: {0: "batch", 1: "tokens"} for name in GRAPH_INPUTS},
                **{name: {0: "batch"} for name in outputs},
            },
            opset_version=17,
            dynamo=False,
        )


def write_tokenizer(path: Path, max_tokens: int) -> None:
    """The teacher's tokenizer.json with padding off and truncation at ``max_tokens``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_tokens)
    tok.save(str(path))


def export_model(
    model: Student,
    config: TierConfig,
    out_dir: Path,
    *,
    version: str,
    calibration: dict[str, Any],
    default_cost_weight: float,
    data_fingerprint: str,
    evaluation: dict[str, Any],
    graph: str = GRAPH,
    max_tokens: int | None = None,
) -> Manifest:
    """Write a model directory and its manifest (replacing ``out_dir`` atomically).

    The student is the served model; the teacher exports to the same contract (``graph`` =
    ``teacher.onnx``, its own ``max_tokens``) for GPU or offline use through the same runtime.
    """
    scfg = config.train.student
    max_tokens = max_tokens or scfg.max_tokens
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_onnx(model, tmp / graph)
    write_tokenizer(tmp / TOKENIZER, max_tokens)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model_name=config.train.model_name,
        model_version=version,
        tiers=tuple(TierSpec(t.name, t.price_input, t.price_output) for t in config.tiers),
        graph=graph,
        tokenizer=TOKENIZER,
        calibration=calibration,
        default_cost_weight=round(float(default_cost_weight), 6),
        max_chars=scfg.max_chars,
        max_tokens=max_tokens,
        files={name: sha256_file(tmp / name) for name in (graph, TOKENIZER)},
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        data_fingerprint=data_fingerprint,
        evaluation=json.loads(json.dumps(evaluation, default=float)),
    )
    write_manifest(tmp, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return manifest


def parity(model: torch.nn.Module, model_dir: Path, prompts: list[str]) -> float:
    """Max |ONNX - torch| logit difference on ``prompts`` through the exported artifact."""
    from tierpick import classifier
    from tierpick.training.encoders import pad_ids

    clf = classifier.load(model_dir)
    worst = 0.0
    for s in range(0, len(prompts), 64):
        batch = prompts[s : s + 64]
        ids, mask = clf.encode(batch)
        onnx_logits = clf.predict_logits(batch)
        x, m = pad_ids([list(r[: int(k.sum())]) for r, k in zip(ids, mask, strict=True)])
        with torch.no_grad():
            torch_logits = model(x, m).numpy()
        worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
    return worst


def quantize_artifact(src: Path, out_dir: Path, prompts: list[str]) -> dict[str, float]:
    """Write an int8 copy of a model directory (the embedding table, which is ~95% of the
    student's weights, stored as int8 and dequantized on lookup) and measure its drift from the
    fp32 model on ``prompts``.

    The matrix products stay fp32 on purpose: onnxruntime's dynamic-quantized u8s8 MatMul
    kernels saturate on x86-64 CPUs without VNNI, so a copy with int8 matrix products drifts
    by CPU (measured on an AVX2-only CPU: max probability drift 0.161 on a small model, 0.02
    on the shipped one). An int8 Gather is exact dequantization arithmetic on any CPU, and
    the drift recorded here is the drift every user gets.

    Returns:
        The drift figures, also recorded in the new manifest's ``evaluation``: max and mean
        absolute difference of calibrated probabilities, and the share of prompts routed to the
        same tier under the default policy.
    """
    import dataclasses

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tierpick import classifier
    from tierpick.classifier.artifact import read_manifest

    manifest = read_manifest(src)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # quantize_dynamic writes a shape-inferred copy next to its input: quantize a copy in tmp, so
    # the source directory (perhaps read-only, perhaps the shipped model) is only read
    fp32_copy = tmp / ("fp32-" + manifest.graph)
    shutil.copy(src / manifest.graph, fp32_copy)
    quantize_dynamic(
        str(fp32_copy),
        str(tmp / manifest.graph),
        op_types_to_quantize=["Gather"],
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    fp32_copy.unlink()
    for name in manifest.files:  # the tokenizer, the drift reference: as they are
        if name != manifest.graph:
            shutil.copy(src / name, tmp / name)
    files = {name: sha256_file(tmp / name) for name in manifest.files}
    quantized = dataclasses.replace(
        manifest, files=files, quantized=True, model_version=manifest.model_version + "-int8"
    )
    write_manifest(tmp, quantized)  # loadable (and verified) before the drift is measured
    fp32, int8 = classifier.load(src), classifier.load(tmp)
    p32, p8 = fp32.predict_proba(prompts), int8.predict_proba(prompts)
    drift = {
        "int8_max_abs_prob_diff": float(np.abs(p32 - p8).max()),
        "int8_mean_abs_prob_diff": float(np.abs(p32 - p8).mean()),
        "int8_same_tier_share": float(
            np.mean(fp32.router().choose(p32)[0] == int8.router().choose(p8)[0])
        ),
        "int8_prompts_measured": float(len(prompts)),
    }
    evaluation = {**manifest.evaluation, **{k: round(v, 6) for k, v in drift.items()}}
    write_manifest(tmp, dataclasses.replace(quantized, evaluation=evaluation))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return drift
