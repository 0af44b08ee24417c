"""Every reader on the real files in ../shared/data, plus small written fixtures for junk input."""

import gzip
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tierpick.classifier import normalize_prompt
from tierpick.training.config import Source, Success
from tierpick.training.errors import IngestError
from tierpick.training.ingest import (
    IngestReport,
    detect_format,
    lm_eval_prompt,
    read_file,
    read_source,
    unwrap_chat_template,
)

# --------------------------------------------------------------------------- MMLU-Pro


def test_mmlu_pro_zip_counts_and_accuracy(data_dir: Path) -> None:
    report = IngestReport()
    path = data_dir / "mmlu-pro" / "model_outputs_Meta-Llama-3_1-8B-Instruct_5shots.zip"
    rows = read_file(path, "mmlu-pro", report)
    assert len(rows) == 12032
    assert {r.model for r in rows} == {"Meta-Llama-3_1-8B-Instruct"}
    assert round(sum(r.score for r in rows) / len(rows), 3) == 0.442
    first = rows[0]
    assert first.prompt_id.startswith("mmlu-pro:")
    assert "\n\nA. " in first.prompt and "\nB. " in first.prompt
    assert first.origin.endswith("model_outputs_Meta-Llama-3_1-8B-Instruct_5shots.json[0]")
    assert not report.problems


def test_mmlu_pro_junk_rows_are_reported_with_index(data_dir: Path) -> None:
    report = IngestReport()
    path = data_dir / "mmlu-pro" / "model_outputs_DeepSeek-Coder-V2_5shots.zip"
    rows = read_file(path, "mmlu-pro", report)
    assert len(rows) == 10351
    assert len(report.problems) == 43
    assert report.dropped_by_reason() == {"row is not a JSON object": 43}
    assert report.problems[0].origin.endswith("model_outputs_DeepSeek-Coder-V2_5shots.json[143]")
    # null preds are kept and scored 0, and counted
    assert report.notes["mmlu-pro: pred is null (no answer extracted), scored 0"] == 11


def test_mmlu_pro_plain_json_with_bad_fields(tmp_path: Path) -> None:
    rows = [
        {
            "question_id": 1,
            "question": "Q1?",
            "options": ["a", "b"],
            "answer": "A",
            "pred": "A",
            "category": "math",
        },
        {"question_id": 2, "question": "Q2?", "options": "['a', 'b']", "answer": "B", "pred": None},
        {"question_id": 3, "question": "Q3?", "options": None, "answer": "A", "pred": "A"},
        {"question_id": 4, "question": "   ", "options": ["a"], "answer": "A", "pred": "A"},
        {"question_id": 5, "question": "Q5?", "options": ["a"], "pred": "A"},
        "total",
    ]
    path = tmp_path / "model_outputs_tiny-model_5shots.json"
    path.write_text(json.dumps(rows))
    assert detect_format(path) == "mmlu-pro"
    report = IngestReport()
    out = read_file(path, "mmlu-pro", report)
    assert [(o.model, o.score, o.task) for o in out] == [
        ("tiny-model", 1.0, "math"),
        ("tiny-model", 0.0, "unknown"),
    ]
    assert out[1].prompt == "Q2?\n\nA. a\nB. b"
    assert {p.origin.rsplit("[", 1)[1]: p.reason for p in report.problems} == {
        "2]": "options missing or not a list",
        "3]": "empty prompt",
        "4]": "answer missing",
        "5]": "row is not a JSON object",
    }


# --------------------------------------------------------------------------- lm-eval


def test_lm_eval_model_names_from_results_and_folder(data_dir: Path) -> None:
    report = IngestReport()
    rows = read_source(Source(path=str(data_dir / "lm-eval-samples")), None, report)
    by_model: dict[str, int] = {}
    for r in rows:
        by_model[r.model] = by_model.get(r.model, 0) + 1
    winogrande = {m for m in by_model if any(r.task == "winogrande" and r.model == m for r in rows)}
    assert winogrande == {
        "LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct",
        "gpt-4o",
        "upstage/SOLAR-10.7B-Instruct-v1.0",
    }
    for model in winogrande:
        assert sum(1 for r in rows if r.model == model and r.task == "winogrande") == 10
    # SOLAR has no results_<ts>.json: the name comes from its folder, with a warning
    assert any("no sibling results_" in w and "SOLAR" in w for w in report.warnings)
    # math files have no `metrics` list; exact_match is still found
    math = [r for r in rows if r.task == "leaderboard_math_prealgebra_hard"]
    assert len(math) == 193 and {r.score for r in math} <= {0.0, 1.0}
    assert not report.problems


def test_lm_eval_prompts_unwrap_to_the_same_question(data_dir: Path) -> None:
    report = IngestReport()
    rows = read_source(Source(path=str(data_dir / "lm-eval-samples")), None, report)
    firsts = {
        r.model: r.prompt
        for r in rows
        if r.task == "winogrande"
        and r.prompt_id.endswith("62d625e23b0883658b0d294bdd30125e28c9d8ebecb11a21bdd4345c9a7694cf")
    }
    assert len(firsts) == 3
    assert len(set(firsts.values())) == 1, firsts  # chat list, EXAONE and SOLAR templates agree
    assert next(iter(firsts.values())).startswith("Which one of the two options")


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"gen_args_0": {"arg_0": "plain prompt"}}, "plain prompt"),
        ({"gen_args_0": {"arg_0": ['[{"role": "user", "content": "chat"}]']}}, "chat"),
        ({"gen_args_0": {"arg_0": [{"role": "user", "content": "listed"}]}}, "listed"),
        ([["old context", " continuation"]], "old context"),
        (
            {
                "gen_args_0": {
                    "arg_0": "<|im_start|>user\nchatml q<|im_end|>\n<|im_start|>assistant\n"
                }
            },
            "chatml q",
        ),
        ({"gen_args_0": {"arg_0": "[INST] first [/INST] ok [INST] second [/INST]"}}, " second "),
        ({}, None),
    ],
)
def test_lm_eval_prompt_shapes(arguments: object, expected: str | None) -> None:
    assert lm_eval_prompt(arguments) == expected


def test_unwrap_leaves_plain_text_alone() -> None:
    assert unwrap_chat_template("Problem:\nx\n\nSolution:") == "Problem:\nx\n\nSolution:"


def test_lm_eval_junk_lines_reported_with_line_numbers(tmp_path: Path) -> None:
    folder = tmp_path / "org__tiny"
    folder.mkdir()
    path = folder / "samples_mytask_2024-01-01T00-00-00.000001.jsonl"
    good = {"doc_id": 0, "arguments": {"gen_args_0": {"arg_0": "Q?"}}, "metrics": ["acc"], "acc": 1}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({**good, "acc": 7}),
        json.dumps({"doc_id": 4, "arguments": {"gen_args_0": {"arg_0": "Q4"}}}),
        "",
        json.dumps({**good, "arguments": {"gen_args_0": {"arg_0": ""}}}),
    ]
    path.write_text("\n".join(lines) + "\n")
    assert detect_format(path) == "lm-eval"
    report = IngestReport()
    rows = read_file(path, "lm-eval", report)
    assert [(r.model, r.task, r.score) for r in rows] == [("org/tiny", "mytask", 1.0)]
    got = {p.origin.rsplit(":", 1)[1]: p.reason for p in report.problems}
    assert got == {
        "2": "invalid JSON line",
        "3": "row is not a JSON object",
        "4": "metric 'acc' is not a score in [0, 1]",
        "5": "no metric key in row",
        "7": "empty prompt",
    }


# --------------------------------------------------------------------------- AlpacaEval


def test_alpaca_eval_soft_scores(data_dir: Path) -> None:
    report = IngestReport()
    rows = read_source(Source(path=str(data_dir / "alpaca-eval")), None, report)
    models = {r.model for r in rows}
    assert len(models) == 11
    for model in models:
        assert sum(1 for r in rows if r.model == model) == 805
    raw = json.loads((data_dir / "alpaca-eval" / "claude-2" / "annotations.json").read_text())
    claude = [r for r in rows if r.model == "claude-2"]
    assert claude[0].score == pytest.approx(raw[0]["preference"] - 1)
    assert claude[0].task == raw[0]["dataset"]
    assert all(0.0 <= r.score <= 1.0 for r in rows)
    assert not report.problems


def test_alpaca_eval_bad_preferences(tmp_path: Path) -> None:
    rows = [
        {"instruction": "hi", "generator_2": "m", "preference": 1.75},
        {"instruction": "hi", "generator_2": "m", "preference": None},
        {"instruction": "hi", "generator_2": "m", "preference": 2.5},
        {"instruction": "hi", "preference": 1.2},
    ]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(rows))
    assert detect_format(path) == "alpaca-eval"
    report = IngestReport()
    out = read_file(path, "alpaca-eval", report)
    assert [o.score for o in out] == [0.75]
    assert [p.reason for p in report.problems] == [
        "preference missing or outside [1, 2]",
        "preference missing or outside [1, 2]",
        "generator_2 missing",
    ]


# --------------------------------------------------------------------------- wide CSV


def test_wide_csv_routellm(data_dir: Path) -> None:
    path = data_dir / "routellm" / "mmlu_abstract_algebra.csv"
    assert detect_format(path) == "wide-csv"
    report = IngestReport()
    rows = read_file(path, "wide-csv", report)
    assert {r.model for r in rows} == {"mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"}
    assert len(rows) == 200  # 100 multi-line prompts x 2 models
    assert rows[0].source == "routellm" and rows[0].task == "mmlu_abstract_algebra"
    assert rows[0].prompt.endswith("Answer:")
    assert rows[0].origin.endswith("mmlu_abstract_algebra.csv:2")
    assert not report.problems


def test_wide_csv_bad_cells(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_text('prompt,m1,m2\n"multi\nline",True,0.5\n"p2",maybe,\n"p3",1\n,1,0\n')
    report = IngestReport()
    rows = read_file(path, "wide-csv", report)
    assert [(r.model, r.score) for r in rows] == [("m1", 1.0), ("m2", 0.5)]
    got = sorted((p.origin.split(":")[-1], p.reason) for p in report.problems)
    assert got == [
        ("4 (m1)", "column 'm1' is not a score in [0, 1]"),
        ("5", "wrong number of CSV fields"),
        ("6", "empty prompt"),
    ]
    assert report.notes["wide-csv: empty cell (no outcome for that model)"] == 1


# --------------------------------------------------------------------------- generic long format


def _long_rows() -> list[dict[str, object]]:
    return [
        {"prompt": "a", "model": "m", "score": 1, "task": "t"},
        {"prompt": "b", "model": "m", "score": "false"},
        {"prompt": "c", "model": "", "score": 1},
        {"prompt": None, "model": "m", "score": 1},
        {"prompt": "e", "model": "m", "score": "high"},
    ]


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "csv", "parquet"])
def test_long_format_every_container(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"mine.{suffix}"
    rows = _long_rows()
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == "jsonl.gz":
        with gzip.open(path, "wt") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == "csv":
        path.write_text("prompt,model,score,task\na,m,1,t\nb,m,false,\nc,,1,\n,m,1,\ne,m,high,\n")
    else:
        pq.write_table(
            pa.Table.from_pylist(
                [{**r, "score": str(r["score"]), "task": r.get("task")} for r in rows]
            ),
            path,
        )
    assert detect_format(path) == "long"
    report = IngestReport()
    out = read_file(path, "long", report)
    assert [(o.prompt, o.score, o.source) for o in out] == [("a", 1.0, "mine"), ("b", 0.0, "mine")]
    assert out[0].task == "t"
    assert sorted(p.reason for p in report.problems) == sorted(
        [
            "empty prompt" if suffix == "csv" else "prompt missing or not a string",
            "field 'model' missing or not a string",
            "field 'score' is not a score in [0, 1]",
        ]
    )
    assert all(p.origin.startswith(str(path)) for p in report.problems)


# --------------------------------------------------------------------------- whole files


def test_file_with_zero_rows_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"prompt": "", "model": "m", "score": 1}) + "\n")
    with pytest.raises(IngestError, match=r"empty.jsonl: yielded zero outcome rows.*empty prompt"):
        read_file(path, "long", IngestReport())


def test_unreadable_files_are_errors_naming_the_file(tmp_path: Path) -> None:
    bad_zip = tmp_path / "model_outputs_x_5shots.zip"
    bad_zip.write_bytes(b"not a zip")
    with pytest.raises(IngestError, match=r"model_outputs_x_5shots\.zip: cannot be read"):
        read_source(Source(path=str(bad_zip)), None, IngestReport())
    bad_json = tmp_path / "annotations.json"
    bad_json.write_text('[{"generator_2": "m", "preference": 1.5,')
    with pytest.raises(IngestError, match=r"annotations\.json: not valid JSON"):
        read_file(bad_json, "alpaca-eval", IngestReport())
    with pytest.raises(IngestError, match="matches no file"):
        read_source(Source(path=str(tmp_path / "nothing-*.csv")), None, IngestReport())


def test_explicit_file_of_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(IngestError, match="cannot tell its format"):
        read_source(Source(path=str(path)), None, IngestReport())


def test_zip_without_mmlu_rows_in_a_folder_is_skipped_with_warning(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("x.json", "[]")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"prompt": "p", "model": "m", "score": 1}) + "\n")
    report = IngestReport()
    rows = read_source(Source(path=str(tmp_path)), None, report)
    assert len(rows) == 1
    assert any("other.zip: skipped" in w for w in report.warnings)


# --------------------------------------------------------------------------- FastChat llm-judge


ARENA_GRADES = Success(scale=(1, 10), threshold=8)


def test_llm_judge_arena_bench(data_dir: Path) -> None:
    bench = data_dir / "arena-bench-v1"
    judgment = bench / "model_judgment" / "gpt-4-0314.jsonl"
    assert detect_format(judgment) == "llm-judge"
    assert detect_format(bench / "question.jsonl") is None  # read beside the judgments
    report = IngestReport()
    rows = read_source(Source(path=str(bench), family="chat", success=ARENA_GRADES), None, report)
    raw = [json.loads(line) for line in judgment.read_text().splitlines()]
    graded = [r for r in raw if r["score"] is not None]
    gpt4 = [r for r in rows if r.model == "gpt-4-0314"]
    assert len(gpt4) == len(graded) == 296  # 3 rows without a grade are dropped, not lost
    assert [o.score for o in gpt4] == [float(int(r["score"]) >= 8) for r in graded]
    assert {o.family for o in rows} == {"chat"} and gpt4[0].source == "arena-bench-v1"
    questions = {
        json.loads(line)["question_id"]: json.loads(line)["turns"][0]
        for line in (bench / "question.jsonl").read_text().splitlines()
    }
    assert gpt4[0].prompt == normalize_prompt(questions[graded[0]["question_id"]])
    no_grade = [p for p in report.problems if p.reason == "judge gave no grade"]
    assert len(no_grade) == sum(
        1
        for f in (bench / "model_judgment").glob("*.jsonl")
        for line in f.read_text().splitlines()
        if json.loads(line)["score"] is None
    )
    assert all(":" in p.origin and p.origin.split(":")[-1].isdigit() for p in no_grade)
    assert not any("question.jsonl" in w for w in report.warnings)


def test_llm_judge_scale_and_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "question.jsonl").write_text(
        json.dumps({"question_id": 1, "turns": ["Write a haiku.", "Now a limerick."]})
        + "\n"
        + json.dumps({"question_id": 2, "turns": ["Explain TCP."]})
        + "\n"
    )
    judged = tmp_path / "model_judgment"
    judged.mkdir()
    path = judged / "m.jsonl"
    rows = [
        {"question_id": 1, "model": "m", "score": 10, "turn": 1},
        {"question_id": 1, "model": "m", "score": "4", "turn": 2},
        {"question_id": 2, "model": "m", "score": -1},
        {"question_id": 3, "model": "m", "score": 7},
        {"question_id": 2, "model": "m", "score": 11},
        {"question_id": 2, "score": 5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    report = IngestReport()
    out = read_file(path, "llm-judge", report, success=Success(scale=(1, 10)))
    # a multi-turn question is classified on its first user turn; grades scale to [0, 1]
    assert [(o.prompt, o.score) for o in out] == [
        ("Write a haiku.", 1.0),
        ("Write a haiku.", pytest.approx(3 / 9)),
    ]
    assert [(p.origin.rsplit(":", 1)[1], p.reason) for p in report.problems] == [
        ("3", "judge gave no grade"),
        ("4", "question_id not in the questions file"),
        ("5", "score is not a score in [1, 10]"),
        ("6", "model missing"),
        ("7", "invalid JSON line"),
    ]
    with pytest.raises(IngestError, match=r"m\.jsonl: judge grades need a success rule"):
        read_file(path, "llm-judge", IngestReport())
    (tmp_path / "question.jsonl").unlink()
    with pytest.raises(IngestError, match=r"no question\.jsonl beside or above"):
        read_file(judged / "m.jsonl", "llm-judge", IngestReport(), success=ARENA_GRADES)


def test_success_rule_maps_graded_long_rows(tmp_path: Path) -> None:
    path = tmp_path / "graded.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"p{i}", "model": "m", "score": s}) + "\n"
            for i, s in enumerate([1, 5, 8, 10, 0, "9"])
        )
    )
    report = IngestReport()
    out = read_file(path, "long", report, success=Success(scale=(1, 10), threshold=8))
    assert [o.score for o in out] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert [p.reason for p in report.problems] == ["field 'score' is not a score in [1, 10]"]


def test_optional_source_is_reported_and_skipped(tmp_path: Path) -> None:
    report = IngestReport()
    missing = Source(path=str(tmp_path / "not-there"), optional=True)
    assert read_source(missing, None, report) == []
    assert any("optional source" in w and "not-there" in w for w in report.warnings)
    with pytest.raises(IngestError, match="matches no file"):
        read_source(Source(path=str(tmp_path / "not-there")), None, IngestReport())
