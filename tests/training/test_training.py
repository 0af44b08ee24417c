"""Training on a tiny derived sample of real MMLU-Pro outcomes: the whole pipeline runs, the
artifact is complete and agrees with torch, the report has every reference row."""

import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA, write_tiny_config
from tierpick.classifier import read_manifest
from tierpick.classifier.errors import ConfigError
from tierpick.cli import main
from tierpick.training.config import load_config
from tierpick.training.dataset import build_dataset
from tierpick.training.errors import DatasetError
from tierpick.training.fit import check_trainable
from tierpick.training.pipeline import run_training


def test_pipeline_outputs(tiny_trained) -> None:  # type: ignore[no-untyped-def]
    result = tiny_trained
    manifest = read_manifest(result.model_dir)
    assert manifest.tier_names == ("local", "mid", "frontier")
    assert manifest.calibration["method"] == "platt" and len(manifest.calibration["a"]) == 3
    assert manifest.default_cost_weight >= 0.0
    # the graph, its tokenizer, and the training data's reference for drift
    assert set(manifest.files) == {"student.onnx", "tokenizer.json", "reference.npz"}
    assert manifest.data_fingerprint == result.report["data_fingerprint"]
    assert "test_student_apgr" in manifest.evaluation
    # ONNX and torch agree on real prompts, for the student and the exported teacher
    assert result.report["onnx_parity_max_abs_diff"] <= 1e-4
    assert result.report["teacher_onnx_parity_max_abs_diff"] <= 1e-4
    teacher = read_manifest(Path(result.report["teacher_model_dir"]))
    assert teacher.graph == "teacher.onnx" and teacher.max_tokens == 32
    assert result.report["test_by_family"].keys() == {"tiny-science", "tiny-other"}
    for split in ("test", "ood"):
        res = result.report["splits"][split]
        assert set(res["routing"]) >= {
            "student",
            "student_threshold_rule",
            "teacher",
            "knn",
            "tfidf_lr",
            "category_prior",
            "random",
            "oracle",
            "best_fixed_mix",
        }
        routing = res["routing"]
        assert routing["oracle"]["apgr"] >= routing["random"]["apgr"]
        # the utility rule over prompt-agnostic scores is the best fixed mix: the oracle beats it
        assert routing["oracle"]["apgr"] >= routing["best_fixed_mix"]["apgr"]
        assert set(res["per_tier"]["student"]) == {"local", "mid", "frontier"}
    ece = result.report["calibration_ece"]
    assert set(ece["before"]) == set(ece["after"]) == {"local", "mid", "frontier"}
    for name in ("report.md", "report.json", "routing_test.png", "reliability_ood.png"):
        assert (result.report_dir / name).is_file(), name
    md = (result.report_dir / "report.md").read_text()
    assert "N-tier APGR" in md and "tfidf_lr" in md and "best_fixed_mix" in md


def test_teacher_embeddings_are_cached_and_resume_after_an_interruption(
    tiny_data: Path, tmp_path: Path
) -> None:
    """The teacher's pass is written as it goes: a run that dies midway continues where it
    stopped, computes only what is missing, and ends with the embeddings of a straight run."""
    import json

    from tierpick.training import encoders
    from tierpick.training.config import TeacherConfig

    prompts = [json.loads(line)["prompt"] for line in tiny_data.read_text().splitlines()][:150]
    cfg = TeacherConfig(max_tokens=32, inference_batch=16)
    straight = encoders.EmbeddingCache(tmp_path / "a.npz", cfg, 512).get(prompts)
    assert straight.shape == (150, 384)

    calls = {"n": 0}
    real = encoders.Teacher.pooled

    def dies_on_the_fifth_batch(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    cache = encoders.EmbeddingCache(tmp_path / "b.npz", cfg, 512, flush_every=32)
    encoders.Teacher.pooled = dies_on_the_fifth_batch  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            cache.get(prompts)
    finally:
        encoders.Teacher.pooled = real  # type: ignore[method-assign]
    resumed = encoders.EmbeddingCache(tmp_path / "b.npz", cfg, 512, flush_every=32)
    assert len(resumed) == 64  # four batches of 16 were written before the fifth died
    calls["n"] = 0

    def counting(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(self, *a, **k)

    encoders.Teacher.pooled = counting  # type: ignore[method-assign]
    try:
        again = resumed.get(prompts)
        assert calls["n"] == 6  # the 86 missing texts only, in batches of 16
        calls["n"] = 0
        encoders.EmbeddingCache(tmp_path / "b.npz", cfg, 512).get(prompts[:40])
        assert calls["n"] == 0  # a later run computes nothing
    finally:
        encoders.Teacher.pooled = real  # type: ignore[method-assign]
    np.testing.assert_allclose(again, straight, atol=1e-5)


def test_a_teacher_cache_says_what_made_it_and_another_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cache records the library versions of its embeddings; a cache made with others, or
    before caches said, is reported when a run opens it (a model is rebuilt bit for bit from
    the same cache, not necessarily from embeddings computed afresh)."""
    import json
    import logging

    from tierpick.training import encoders
    from tierpick.training.config import TeacherConfig

    cfg = TeacherConfig(max_tokens=32, inference_batch=16)
    path = tmp_path / "t.npz"
    cache = encoders.EmbeddingCache(path, cfg, 512)
    cache.get(["What is 2+2?", "Name the capital of France."])
    with np.load(path) as saved:
        assert json.loads(str(saved["made_with"])) == [encoders.made_with()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tierpick.train"):
        assert len(encoders.EmbeddingCache(path, cfg, 512)) == 2
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # this run's
        with np.load(path) as saved:  # the same rows, as an older tierpick wrote them
            np.savez(tmp_path / "old.npz", keys=saved["keys"], vectors=saved["vectors"])
        old = encoders.EmbeddingCache(tmp_path / "old.npz", cfg, 512)
    assert len(old) == 2 and "unrecorded" in caplog.text and "computed afresh" in caplog.text
    older = dict(encoders.made_with(), torch="1.0.0")
    np.savez(
        path,
        keys=np.array(["k"]),
        vectors=np.zeros((1, 384), np.float32),
        made_with=np.array(json.dumps([older])),
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tierpick.train"):
        encoders.EmbeddingCache(path, cfg, 512)
    assert "'torch': '1.0.0'" in caplog.text


def test_leave_one_family_out_never_trains_on_the_family(tiny_trained) -> None:  # type: ignore[no-untyped-def]
    """Each family is evaluated on all of its prompts by a fit whose train and val sets are
    the other families' train and val splits only."""
    from tierpick.training.dataset import load_dataset

    ds = load_dataset(tiny_trained.report_dir.parent / "dataset")
    fams = ds.table["family"].to_pylist()
    splits = ds.table["split"].to_pylist()
    loso = tiny_trained.report["loso"]
    assert set(loso["families"]) == {"tiny-science", "tiny-other"}
    for fam, res in loso["families"].items():
        assert res["n"] == fams.count(fam)
        others = [s for f, s in zip(fams, splits, strict=True) if f != fam]
        assert res["train_prompts"] == others.count("train")
        assert res["val_prompts"] == others.count("val")
        assert {"student", "best_fixed_mix", "knn", "teacher", "tfidf_lr"} <= set(res["routing"])
        assert set(res["per_tier"]["student"]) == {"local", "mid", "frontier"}
    assert set(loso["mean_apgr"]) >= {"student", "best_fixed_mix", "knn"}
    md = (tiny_trained.report_dir / "report.md").read_text()
    assert md.index("## Leave one family out") < md.index("## Split `test`")


def test_evaluate_loso_command(tiny_config: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    out = tmp_path / "loso"
    args = ["evaluate", "--loso", "--config", str(tiny_config), "--out", str(out)]
    args += ["--workdir", str(tmp_path / "w"), "--no-mlflow", "--families", "tiny-other"]
    assert main(args) == 0
    assert "Leave one family out" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert list(report["loso"]["families"]) == ["tiny-other"]
    bad = ["evaluate", "--loso", "--config", str(tiny_config), "--out", str(out), "--no-mlflow"]
    assert main([*bad, "--families", "nope"]) == 2
    assert "--families: ['nope'] not in the dataset" in capsys.readouterr().err


def test_untrainable_datasets_fail_before_training(tiny_data: Path, tmp_path: Path) -> None:
    lines = tiny_data.read_text().splitlines()
    # only the local model's outcomes: mid and frontier are masked everywhere
    only_local = tmp_path / "tiny.jsonl"
    only_local.write_text("\n".join(ln for ln in lines if "Llama-3_1-8B" in ln) + "\n")
    cfg = write_tiny_config(tmp_path, only_local)
    with pytest.raises(DatasetError, match="tier 'mid' has no outcome on any prompt"):
        run_training(load_config(cfg), tmp_path / "m", tmp_path / "w")
    # few rows: refused with the counts
    few = tmp_path / "few" / "tiny.jsonl"
    few.parent.mkdir()
    few_lines = [
        ln for m in ("Llama", "Mixtral", "gemini") for ln in [x for x in lines if m in x][:2]
    ]
    few.write_text("\n".join(few_lines) + "\n")
    ds = build_dataset(load_config(write_tiny_config(few.parent, few, holdout=False)))
    with pytest.raises(DatasetError, match="too few prompts to train"):
        check_trainable(ds)


def test_unreachable_tracking_store_is_refused_before_training(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = time.perf_counter()
    code = main(
        [
            "train",
            "--config",
            str(tiny_config),
            "--out",
            str(tmp_path / "m"),
            "--workdir",
            str(tmp_path / "w"),
            "--tracking-uri",
            "http://127.0.0.1:9",
        ]
    )
    assert code == 2
    assert "MLflow tracking store http://127.0.0.1:9 is unreachable" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing was started
    assert time.perf_counter() - t0 < 60


def test_evaluate_command_on_exported_model(
    tiny_trained, tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--model",
            str(tiny_trained.model_dir),
            "--config",
            str(tiny_config),
            "--out",
            str(out),
            "--no-mlflow",
        ]
    )
    assert code == 0
    assert "N-tier APGR" in capsys.readouterr().out
    import json

    report = json.loads((out / "report.json").read_text())
    # the ONNX model evaluated here is the one training evaluated in torch: same figures
    ours = report["splits"]["test"]["routing"]["student"]["apgr"]
    trained = tiny_trained.report["splits"]["test"]["routing"]["student"]["apgr"]
    assert ours == pytest.approx(trained, abs=1e-3)
    assert {"tfidf_lr", "category_prior", "random", "oracle", "best_fixed_mix"} <= set(
        report["splits"]["ood"]["routing"]
    )
    assert (out / "routing_ood.png").is_file()


def test_onnx_matches_torch_on_200_real_prompts(tiny_trained, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The exported graph and the torch student agree within 1e-4 on real prompts of both kinds
    (arena-hard user prompts and MMLU-Pro questions), through the runtime's own tokenization."""
    import json

    from tierpick.training.export import parity

    arena = [
        json.loads(x)["prompt"]
        for x in (data_dir / "prompt-logs" / "arena-hard-v0.1-question.jsonl")
        .read_text()
        .splitlines()
    ]
    alpaca = json.loads((data_dir / "alpaca-eval" / "claude-2" / "annotations.json").read_text())
    prompts = arena[:100] + [r["instruction"] for r in alpaca[:100]]
    assert len(prompts) == 200
    assert parity(tiny_trained.student, tiny_trained.model_dir, prompts) <= 1e-4


def test_int8_export_is_verified_smaller_and_close(
    tiny_trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "int8"
    src = Path(tiny_trained.model_dir)
    before = (sorted(p.name for p in src.iterdir()), src.stat().st_mtime_ns)
    assert (
        main(
            [
                "export",
                "--model",
                str(tiny_trained.model_dir),
                "--out",
                str(out),
                "--int8",
                "--prompts",
                str(DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "int8_same_tier_share" in text
    manifest = read_manifest(out)  # checksums verified
    assert manifest.quantized and manifest.model_version.endswith("-int8")
    assert manifest.evaluation["int8_prompts_measured"] == 500
    assert manifest.evaluation["int8_max_abs_prob_diff"] < 0.1
    assert manifest.evaluation["int8_same_tier_share"] > 0.8
    size = lambda d: (d / "student.onnx").stat().st_size  # noqa: E731
    assert size(out) < size(src)
    # the source model is only read: nothing was written into its directory, even for a moment
    assert (sorted(p.name for p in src.iterdir()), src.stat().st_mtime_ns) == before
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "reference.npz",  # the parent's: the int8 graph's embeddings stay close to it
        "student.onnx",
        "tokenizer.json",
    ]


def test_token_dropout_hides_a_share_of_real_tokens_and_keeps_cls() -> None:
    import torch

    from tierpick.training.static_student import drop_tokens

    mask = torch.ones((400, 50))
    mask[:, 30:] = 0.0  # padding stays padding
    out = drop_tokens(mask, 0.4, torch.Generator().manual_seed(0))
    assert out[:, 30:].sum() == 0 and bool((out[:, 0] == 1).all())
    assert 0.55 < float(out[:, 1:30].mean()) < 0.65  # about 60% of the real tokens kept
    again = drop_tokens(mask, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(drop_tokens(mask, 0.0, torch.Generator()), mask)


def test_student_training_never_writes_into_the_shared_static_table() -> None:
    """Every fit of a run (the model, each leave-one-family-out fold) starts from one static
    table: training a student must not change it (torch.from_numpy once shared its memory, and
    the folds trained after the model wrote into the exported model's embeddings)."""
    from tierpick.training import static_student
    from tierpick.training.config import StudentConfig

    table = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    before = table.copy()
    ids = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]] * 4
    target = np.random.default_rng(1).normal(size=(len(ids), 6)).astype(np.float32)
    cfg = StudentConfig(dim=8, epochs=2, hidden=0, batch_size=4, pooling="mean")
    student, _ = static_student.distill_student(table, ids, target, ids[:3], target[:3], cfg, 0)
    assert not np.array_equal(student.embedding.weight.detach().numpy(), before)  # it trained
    np.testing.assert_array_equal(table, before)  # the caller's table is untouched


def test_crops_are_seeded_runs_of_the_prompts_words() -> None:
    from tierpick.training.encoders import crop_prompts

    prompts = ["short prompt", " ".join(f"w{i}" for i in range(40)), " ".join("abcdefghijklmn")]
    crops = crop_prompts(prompts, 2, seed=3)
    assert crops == crop_prompts(prompts, 2, seed=3) != crop_prompts(prompts, 2, seed=4)
    assert len(crops) == 4  # the 2-word prompt gives none
    for crop in crops[:2]:
        words = crop.split()
        assert 12 <= len(words) <= 28  # 30-70% of 40 words
        start = int(words[0][1:])
        assert words == [f"w{i}" for i in range(start, start + len(words))]  # one contiguous run
    assert crop_prompts(prompts, 0, seed=3) == []


def test_a_new_kind_of_student_is_one_module(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seam: a student kind written in one module (tests/training/bag_student.py) trains
    through the pipeline, exports to the graph contract, and the runtime serves it."""
    import tierpick
    from tests.conftest import write_tiny_config
    from tierpick.training import student
    from tierpick.training.config import load_config
    from tierpick.training.pipeline import run_training

    monkeypatch.setitem(student.KINDS, "bag", "tests.training.bag_student:BagKind")
    path = write_tiny_config(tmp_path, tiny_data, holdout=False)
    path.write_text(
        path.read_text().replace("student: {", "student: {kind: bag, ")
        .replace("seed: 0", "seed: 0\n  loso: false")
    )  # fmt: skip
    result = run_training(load_config(path), tmp_path / "model", tmp_path / "work")
    info = result.report["training"]["student"]  # what the kind said of its training
    assert info["last_loss"] < info["first_loss"]
    clf = tierpick.load(tmp_path / "model")
    assert clf.has_embedding and clf.embed(["What is 2+2?"]).shape == (1, 384)
    proba = clf.predict_proba(["What is 2+2?", "Prove the Riemann hypothesis."])
    assert proba.shape == (2, 3) and np.isfinite(proba).all()
    # an unknown kind is refused before any training, naming the key
    path.write_text(path.read_text().replace("kind: bag", "kind: transformer"))
    with pytest.raises(ConfigError, match=r"train.student.kind: 'transformer' is not one of"):
        run_training(load_config(path), tmp_path / "model2", tmp_path / "work")
