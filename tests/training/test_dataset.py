"""Dataset building: real-data counts, masks, dedupe, decontamination, splits and fingerprints."""

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tierpick.classifier import prompt_key
from tierpick.training.config import parse_config
from tierpick.training.dataset import BuiltDataset, build_dataset, load_dataset, write_dataset
from tierpick.training.errors import DatasetError
from tierpick.training.stats import stats_report, tier_order_warnings


def _write_long(path: Path, rows: list[tuple[str, str, float]], **extra: str) -> None:
    path.write_text(
        "".join(
            json.dumps({"prompt": p, "model": m, "score": s, **extra}) + "\n" for p, m, s in rows
        )
    )


def _config(tmp_path: Path, **overrides: object):  # type: ignore[no-untyped-def]
    raw = {
        "name": "tiny",
        "data_root": str(tmp_path),
        "tiers": [
            {"name": "small", "price_input": 0, "price_output": 0, "models": ["s1", "s2"]},
            {"name": "big", "price_input": 3, "price_output": 9, "models": ["b1"]},
        ],
        "sources": ["*.jsonl"],
        **overrides,
    }
    return parse_config(raw, base_dir=tmp_path)


# --------------------------------------------------------------------------- real data


def test_default_dataset_counts(default_built: BuiltDataset) -> None:
    rep = default_built.report
    assert rep["dropped_by_reason"] == {
        "row is not a JSON object": 43,  # MMLU-Pro DeepSeek-Coder-V2's junk rows
        "judge gave no grade": 39,  # arena-bench scores of None
        "preference missing or outside [1, 2]": 249,  # AlpacaEval-davinci003 0 or null
    }
    where = {
        "row is not a JSON object": "DeepSeek-Coder-V2",
        "judge gave no grade": "arena-bench-v1/model_judgment/",
        "preference missing or outside [1, 2]": "alpaca-eval-davinci003/",
    }
    assert all(where[p["reason"]] in p["origin"] for p in rep["dropped_rows"])
    # every dropped row names its file and line (or index)
    assert all(
        p["origin"].rsplit(":", 1)[-1].isdigit() or p["origin"].endswith("]")
        for p in rep["dropped_rows"]
    )
    assert rep["families"] == {
        "mmlu-pro": 11816,
        "easy-qa": 2068,
        "chat": 1102,
        "reasoning": 848,
        "code": 964,
        "math": 2047,
    }
    out = default_built.outcomes
    llama8 = pc.sum(pc.equal(out["model"], "Meta-Llama-3_1-8B-Instruct")).as_py()
    assert llama8 == 12032
    assert rep["outcome_rows"] == out.num_rows
    assert set(default_built.tiers) == {"local", "mid", "frontier"}
    # every dataset row has at least one tier outcome, and targets are null exactly where masked
    t = default_built.table
    for tier in default_built.tiers:
        targets, masks = t[f"target_{tier}"].to_pylist(), t[f"mask_{tier}"].to_pylist()
        assert all((y is not None) == m for y, m in zip(targets, masks, strict=True))
        assert all(y is None or 0.0 <= y <= 1.0 for y in targets)
    # the 74 RouteLLM abstract-algebra questions that MMLU-Pro reuses are removed
    assert rep["decontamination"][0]["matched"] == 74
    assert sum(rep["splits"].values()) == t.num_rows == rep["rows"]


def test_default_dataset_masks_follow_model_sets(default_built: BuiltDataset) -> None:
    t = default_built.table
    math = t.filter(pc.equal(t["task"], "leaderboard_math_prealgebra_hard"))
    # only SOLAR (local) answered the math tasks: mid and frontier are masked there
    assert math.num_rows == 193
    assert all(math["mask_local"].to_pylist())
    assert not any(math["mask_mid"].to_pylist()) and not any(math["mask_frontier"].to_pylist())
    # winogrande: three models with three chat templates dedupe to 10 prompts (local + frontier)
    wino = t.filter(pc.equal(t["task"], "winogrande"))
    assert wino.num_rows == 10
    assert all(n == 2 for n in wino["n_local"].to_pylist())
    assert all(n == 1 for n in wino["n_frontier"].to_pylist())


def test_default_stats_table(default_built: BuiltDataset) -> None:
    text, data = stats_report(default_built)
    assert "Outcome rows per source and model" in text
    row = next(r for r in data["per_model"] if r["model"] == "Meta-Llama-3_1-8B-Instruct")
    assert row["rows"] == 12032 and round(row["mean_score"], 3) == 0.442
    deepseek = next(r for r in data["per_model"] if r["model"] == "DeepSeek-Coder-V2")
    assert deepseek["rows"] == 10351
    assert data["dropped_by_reason"]["row is not a JSON object"] == 43
    arena = [r for r in data["per_model"] if r["source"] == "arena-bench-v1"]
    assert len(arena) == 15 and sum(r["rows"] for r in arena) == 15 * 299 - 39
    # the shipped tiers are ordered by measured success on every source and on every task but
    # lm-eval's 10 winogrande questions (gpt-4o 3 of 10, the local models 7 of 20)
    warnings = tier_order_warnings(default_built.table, default_built.tiers)
    assert len(warnings) == 1 and "lm-eval/winogrande (10 prompts)" in warnings[0]
    # models left out on purpose are said so
    assert "'llama3-chatqa-1.5-8b' (3569 outcomes) is in no tier" in " ".join(data["warnings"])


# --------------------------------------------------------------------------- mechanics


def test_dedupe_merges_sources_and_averages_repeats(tmp_path: Path) -> None:
    _write_long(tmp_path / "a.jsonl", [("Hello  world", "s1", 1.0), ("other", "s1", 0.0)])
    _write_long(
        tmp_path / "b.jsonl",
        [("hello world\n", "s2", 0.0), ("hello world", "b1", 1.0), ("Hello world", "s1", 0.0)],
        source="b",
    )
    built = build_dataset(_config(tmp_path))
    t = built.table
    row = t.filter(pc.equal(t["prompt_key"], prompt_key("hello world"))).to_pylist()[0]
    # s1 answered twice (1.0 and 0.0 -> 0.5), s2 once (0.0): small = mean(0.5, 0.0)
    assert row["target_small"] == pytest.approx(0.25)
    assert row["n_small"] == 2 and row["target_big"] == 1.0 and row["mask_big"]
    assert row["sources"] == ["a", "b"]
    other = t.filter(pc.equal(t["prompt_key"], prompt_key("other"))).to_pylist()[0]
    assert other["mask_big"] is False and other["target_big"] is None
    assert built.report["repeated_model_outcomes_averaged"] == 1


def test_model_in_no_tier_is_counted_and_unknown_config_model_warned(tmp_path: Path) -> None:
    _write_long(tmp_path / "a.jsonl", [("q", "s1", 1.0), ("q", "b1", 1.0), ("q", "stranger", 1.0)])
    cfg = _config(
        tmp_path,
        tiers=[
            {"name": "small", "price_input": 0, "price_output": 0, "models": ["s1", "s_1x"]},
            {"name": "big", "price_input": 3, "price_output": 9, "models": ["b1"]},
        ],
    )
    built = build_dataset(cfg)
    assert built.report["outcomes_of_models_in_no_tier"] == {"stranger": 1}
    warnings = " ".join(built.report["warnings"])
    assert "'stranger' (1 outcomes) is in no tier" in warnings
    assert (
        "names model 's_1x', which no source contains; close matches in the sources: ['s1']"
        in warnings
    )


def test_tier_without_any_outcome_is_an_error(tmp_path: Path) -> None:
    _write_long(tmp_path / "a.jsonl", [("q", "s1", 1.0)])
    with pytest.raises(DatasetError, match=r"tier 'big' has no outcome on any prompt.*\['b1'\]"):
        build_dataset(_config(tmp_path))


def test_decontamination_exact_and_ngram(tmp_path: Path) -> None:
    long_q = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing"
    _write_long(
        tmp_path / "a.jsonl",
        [
            ("Exact Match Prompt", "s1", 1.0),
            ("Exact Match Prompt", "b1", 1.0),
            (f"Question: {long_q}?\nA. yes", "s1", 0.0),
            (f"Question: {long_q}?\nA. yes", "b1", 1.0),
            ("clean prompt", "s1", 1.0),
            ("clean prompt", "b1", 1.0),
        ],
    )
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "set.txt").write_text(f"exact   match prompt\n{long_q.upper()}\n")
    decon = {"paths": [{"path": "evals/set.txt", "format": "prompts"}]}
    built = build_dataset(_config(tmp_path, decontaminate={**decon, "method": "ngram"}))
    assert built.table["prompt"].to_pylist() == ["clean prompt"]
    assert built.report["decontamination"][0]["matched"] == 2
    exact_only = build_dataset(_config(tmp_path, decontaminate={**decon, "method": "exact"}))
    assert exact_only.table.num_rows == 2
    assert exact_only.report["decontamination"][0]["matched"] == 1


def test_split_is_deterministic_and_holds_out_groups(tmp_path: Path) -> None:
    rows = [(f"prompt number {i}", m, float(i % 2)) for i in range(600) for m in ("s1", "b1")]
    _write_long(tmp_path / "a.jsonl", rows[:600], task="alpha")
    _write_long(tmp_path / "b.jsonl", rows[600:], task="beta")
    split = {
        "val_fraction": 0.2,
        "test_fraction": 0.1,
        "holdout": {"column": "task", "values": ["beta"]},
    }
    first = build_dataset(_config(tmp_path, split=split))
    again = build_dataset(_config(tmp_path, split=split))
    assert first.fingerprint == again.fingerprint
    assert first.table["split"].to_pylist() == again.table["split"].to_pylist()
    counts = first.report["splits"]
    assert counts["ood"] == 300
    assert 0.05 < counts["test"] / 300 < 0.17 and 0.12 < counts["val"] / 300 < 0.28
    assert set(first.split("ood")["task"].to_pylist()) == {"beta"}
    resalted = build_dataset(_config(tmp_path, split={**split, "salt": "other"}))
    assert resalted.fingerprint != first.fingerprint
    with pytest.raises(DatasetError, match=r"holdout: task value\(s\) \['gamma'\] match no prompt"):
        build_dataset(_config(tmp_path, split={"holdout": {"column": "task", "values": ["gamma"]}}))


def test_write_load_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    _write_long(tmp_path / "a.jsonl", [("q1", "s1", 1.0), ("q1", "b1", 0.0), ("q2", "b1", 1.0)])
    built = build_dataset(_config(tmp_path))
    out = write_dataset(built, tmp_path / "ds")
    loaded = load_dataset(out)
    assert loaded.fingerprint == built.fingerprint
    assert loaded.table.equals(built.table.replace_schema_metadata(loaded.table.schema.metadata))
    report = json.loads((out / "report.json").read_text())
    assert report["fingerprint"] == built.fingerprint
    # change one target: the recorded fingerprint no longer matches
    table = pq.read_table(out / "dataset.parquet")
    idx = table.schema.get_field_index("target_big")
    flipped = [1.0 - v if v is not None else None for v in table["target_big"].to_pylist()]
    import pyarrow as pa

    pq.write_table(
        table.set_column(idx, "target_big", pa.array(flipped, pa.float64())),
        out / "dataset.parquet",
    )
    with pytest.raises(DatasetError, match="content fingerprint"):
        load_dataset(out)
    (out / "outcomes.parquet").unlink()
    with pytest.raises(DatasetError, match=r"missing \['outcomes.parquet'\]"):
        load_dataset(out)
