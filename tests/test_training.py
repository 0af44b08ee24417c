"""Training on a tiny derived sample of real MMLU-Pro outcomes: the whole pipeline runs, the
artifact is complete and agrees with torch, the report has every reference row."""

import time
from pathlib import Path

import numpy as np
import pytest

from classifier import read_manifest
from classifier.cli import main
from classifier.errors import DatasetError
from tests.conftest import DATA, write_tiny_config
from training.config import load_config
from training.dataset import build_dataset
from training.pipeline import check_trainable, run_training


def test_pipeline_outputs(tiny_trained) -> None:  # type: ignore[no-untyped-def]
    result = tiny_trained
    manifest = read_manifest(result.model_dir)
    assert manifest.tier_names == ("local", "mid", "frontier")
    assert manifest.calibration["method"] == "platt" and len(manifest.calibration["a"]) == 3
    assert manifest.default_cost_weight >= 0.0
    assert set(manifest.files) == {"student.onnx", "tokenizer.json"}
    assert manifest.data_fingerprint == result.report["data_fingerprint"]
    assert "test_student_apgr" in manifest.evaluation
    # ONNX and torch agree on real prompts, for the student and the exported teacher
    assert result.report["onnx_parity_max_abs_diff"] <= 1e-4
    assert result.report["teacher_onnx_parity_max_abs_diff"] <= 1e-4
    teacher = read_manifest(Path(result.report["teacher_model_dir"]))
    assert teacher.graph == "teacher.onnx" and teacher.max_tokens == 32
    for split in ("test", "ood"):
        res = result.report["splits"][split]
        assert set(res["routing"]) >= {
            "student",
            "student_threshold_rule",
            "teacher",
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


def test_teacher_resumes_from_checkpoint(tiny_config: Path, tmp_path: Path) -> None:
    """A run stopped mid-fine-tune continues from its checkpoint and ends where an
    uninterrupted run ends."""
    import torch

    from training import encoders

    cfg = load_config(tiny_config)
    ds = build_dataset(cfg)
    from training.pipeline import split_arrays

    train = split_arrays(ds, "train")
    y, m = train.targets.astype(np.float32), train.mask.astype(np.float32)
    tcfg = cfg.train.teacher
    straight = encoders.train_teacher(train.prompts, y, m, tcfg, 0, tmp_path / "a", 512)

    class Stop(Exception):
        pass

    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def failing_step(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:  # dies after two steps; the checkpoint is from step 2
            raise Stop
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = failing_step  # type: ignore[method-assign]
    try:
        with pytest.raises(Stop):
            encoders.train_teacher(train.prompts, y, m, tcfg, 0, tmp_path / "b", 512)
    finally:
        torch.optim.AdamW.step = real_step  # type: ignore[method-assign]
    assert (tmp_path / "b" / "teacher.ckpt").exists()
    resumed = encoders.train_teacher(train.prompts, y, m, tcfg, 0, tmp_path / "b", 512)
    for (k, v1), v2 in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.allclose(v1, v2, atol=1e-5), k
    t0 = time.perf_counter()
    encoders.train_teacher(train.prompts, y, m, tcfg, 0, tmp_path / "b", 512)  # finished: reused
    assert time.perf_counter() - t0 < 30


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

    from training.export import parity

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
        "student.onnx",
        "tokenizer.json",
    ]


def test_token_dropout_hides_a_share_of_real_tokens_and_keeps_cls() -> None:
    import torch

    from training.encoders import drop_tokens

    mask = torch.ones((400, 50))
    mask[:, 30:] = 0.0  # padding stays padding
    out = drop_tokens(mask, 0.4, torch.Generator().manual_seed(0))
    assert out[:, 30:].sum() == 0 and bool((out[:, 0] == 1).all())
    assert 0.55 < float(out[:, 1:30].mean()) < 0.65  # about 60% of the real tokens kept
    again = drop_tokens(mask, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(drop_tokens(mask, 0.0, torch.Generator()), mask)


def test_crops_are_seeded_runs_of_the_prompts_words() -> None:
    from training.encoders import crop_prompts

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
