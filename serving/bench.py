"""In-process latency benchmark: tokenization alone, the student single-prompt and in batches,
optionally the teacher, on real prompts; every figure is measured in the same run and compared
with the tokenization floor."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from classifier._table import format_table


def load_prompts(path: Path, field: str = "prompt") -> list[str]:
    prompts = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                value = json.loads(line).get(field)
                if isinstance(value, str) and value.strip():
                    prompts.append(value)
    if not prompts:
        raise ValueError(f"{path}: no prompts in field {field!r}")
    return prompts


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    a = np.array(samples) * 1e6
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.mean())


def run_inprocess_bench(
    model: str | None, prompts_path: Path, repeat: int = 3, teacher: str | None = None
) -> str:
    import classifier
    from classifier._runtime import prepare_prompt

    clf = classifier.load(model)
    prompts = load_prompts(prompts_path)
    tok = clf._tokenizer
    max_chars = clf.manifest.max_chars
    clf.predict_proba(prompts[:8])  # warm-up

    def timed(fn: object) -> list[float]:
        out = []
        for _ in range(repeat):
            for p in prompts:
                t0 = time.perf_counter()
                fn(p)  # type: ignore[operator]
                out.append(time.perf_counter() - t0)
        return out

    rows = []
    tok_s = timed(lambda p: tok.encode(prepare_prompt(p, max_chars)))
    tok_p50 = _percentiles(tok_s)[0]
    rows.append(["tokenize (normalize + cut + encode)", *_percentiles(tok_s), 1.0])
    full = timed(lambda p: clf.predict_proba([p]))
    rows.append(
        ["student predict_proba, 1 prompt", *_percentiles(full), _percentiles(full)[0] / tok_p50]
    )
    route = timed(lambda p: clf.route([p]))
    rows.append(["student route, 1 prompt", *_percentiles(route), _percentiles(route)[0] / tok_p50])
    if teacher:
        import onnxruntime as ort

        sess = ort.InferenceSession(teacher, providers=["CPUExecutionProvider"])

        def run_teacher(p: str) -> None:
            ids, mask = clf.encode([p])
            sess.run(None, {"input_ids": ids[:, :128], "attention_mask": mask[:, :128]})

        t = timed(run_teacher)
        rows.append(
            [
                "teacher ONNX, 1 prompt (128 tokens max)",
                *_percentiles(t),
                _percentiles(t)[0] / tok_p50,
            ]
        )
    table = format_table(
        ["what", "p50 us", "p99 us", "mean us", "p50 / tokenize p50"],
        rows,
        f"In-process latency on {len(prompts)} real prompts x {repeat} (model {clf.version})",
    )
    batch_rows = []
    for size in (1, 32, 256, 1024):
        batch = (prompts * (size // len(prompts) + 1))[:size]
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 1.0:
            clf.predict_proba(batch)
            n += len(batch)
        batch_rows.append([size, n / (time.perf_counter() - t0)])
    table2 = format_table(["batch size", "prompts/s"], batch_rows, "Batch throughput (1 s each)")
    return table + "\n\n" + table2 + "\n"
