"""A reload while the served symlink is swapped between two models, over and over: every answer
must carry the version of the graph that computed it (the hostile-input round two finding: the
files were checksummed through the path, then loaded again through it, so a swap in between
served one model's graph under the other's version)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tierpick import classifier
from tierpick.classifier.artifact import read_manifest, sha256_file, write_manifest
from tierpick.serving.client import TierpickClient
from tierpick.serving.lifecycle import ServerConfig
from tierpick.serving.service import create_server

PROMPT = "Explain why the sky is blue."


def _other_model(src: Path, dst: Path) -> None:
    """``src`` with its head's biases moved (other logits) under another version."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    graph = onnx.load(str(dst / m.graph))
    for init in graph.graph.initializer:
        if "head." in init.name and init.name.endswith("bias"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 2.0, init.name))
    onnx.save(graph, str(dst / m.graph))
    files = {**m.files, m.graph: sha256_file(dst / m.graph)}
    write_manifest(dst, dataclasses.replace(m, model_version="the-other-one", files=files))


def test_answers_never_mix_two_models_while_the_symlink_is_swapped(
    tiny_trained,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_trained.model_dir, a)
    _other_model(a, b)
    expected = {
        clf.version: clf.predict_proba([PROMPT])[0]
        for clf in (classifier.load(a), classifier.load(b))
    }
    assert len(expected) == 2
    assert not np.allclose(*expected.values(), atol=1e-3)
    current = tmp_path / "current"
    current.symlink_to(a)
    app = create_server("127.0.0.1:0", str(current), ServerConfig(watch_seconds=0))
    stop = threading.Event()

    def swap() -> None:  # ln -sfn X next && mv -T next current, as fast as it goes
        i = 0
        while not stop.is_set():
            nxt = tmp_path / "next"
            nxt.unlink(missing_ok=True)
            nxt.symlink_to(b if i % 2 == 0 else a)
            os.replace(nxt, current)
            i += 1

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    mixed, served = [], set()
    try:
        with TierpickClient(f"127.0.0.1:{app.port}", timeout=10) as c:
            for _ in range(80):
                app.holder.reload()  # what SIGHUP does
                r = c.classify(PROMPT)
                got = np.array([s.success_probability for s in r.scores])
                served.add(r.model_version)
                if not np.allclose(got, expected[r.model_version], atol=1e-5):
                    mixed.append(r.model_version)
    finally:
        stop.set()
        swapper.join(5)
        app.shutdown(0)
    assert served == set(expected)  # both models were served in turn
    assert not mixed, f"{len(mixed)} of 80 answers computed by a graph not of their version"
