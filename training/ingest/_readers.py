"""One reader per eval-outcome format. Each yields :class:`Outcome` rows and records every row it
cannot use in the :class:`IngestReport`, with file, line (or index) and reason."""

from __future__ import annotations

import ast
import contextlib
import csv
import json
import math
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tierpick.classifier.files import csv_records, open_text
from tierpick.classifier.text import messages_to_prompt, normalize_prompt
from tierpick.training.config import IDENTITY, Success
from tierpick.training.ingest._report import IngestReport, Outcome

# (file, report, source label, options, success rule) -> outcome rows
Reader = Callable[[Path, IngestReport, "str | None", Mapping[str, Any], Success], Iterator[Outcome]]

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# --------------------------------------------------------------------------- shared helpers


def _prompt_or_drop(raw: object, origin: str, report: IngestReport) -> str | None:
    if not isinstance(raw, str):
        report.drop(origin, "prompt missing or not a string", type(raw).__name__)
        return None
    prompt = normalize_prompt(raw)
    if not prompt:
        report.drop(origin, "empty prompt")
        return None
    return prompt


_TRUE = {"true", "t", "yes", "y"}
_FALSE = {"false", "f", "no", "n"}


def parse_score(value: object, success: Success = IDENTITY) -> float | None:
    """Turn a bool, a number or a True/False/number string into a success in [0, 1] by the
    source's ``success`` rule (default: a number in [0, 1] as it is); None when it is not one."""
    if isinstance(value, bool):
        raw = 1.0 if value else 0.0
    elif isinstance(value, int | float):
        raw = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE or text in _FALSE:
            raw = 1.0 if text in _TRUE else 0.0
        else:
            try:
                raw = float(text)
            except ValueError:
                return None
    else:
        return None
    if math.isnan(raw):
        return None
    return success(raw)


def _score_or_drop(
    value: object, origin: str, report: IngestReport, what: str, success: Success = IDENTITY
) -> float | None:
    score = parse_score(value, success)
    if score is None:
        lo, hi = (f"{v:g}" for v in success.scale)
        report.drop(origin, f"{what} is not a score in [{lo}, {hi}]", repr(value)[:80])
    return score


def _csv_records(
    reader: Any, path: Path, report: IngestReport, width: int | None = None
) -> Iterator[tuple[str, Any]]:
    """(origin, row) for each well-formed row of a csv.reader (rows of ``width`` fields) or a
    DictReader; a row that cannot be parsed or has another number of fields is reported."""
    for line, row, problem, detail in csv_records(reader):
        origin = f"{path}:{line}"
        if problem is None and width is not None and len(row) != width:
            problem = "wrong number of CSV fields"
        if problem is not None:
            report.drop(origin, problem, detail)
            continue
        yield origin, row


def _jsonl(path: Path, report: IngestReport) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (origin, object) per line; bad lines are reported, blank lines skipped."""
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                report.drop(origin, "invalid JSON line", exc.msg)
                continue
            if not isinstance(obj, dict):
                report.drop(origin, "row is not a JSON object", type(obj).__name__)
                continue
            yield origin, obj


# --------------------------------------------------------------------------- MMLU-Pro


def format_multiple_choice(question: str, options: list[str]) -> str:
    """Present a multiple-choice question the way eval harnesses do: stem, then lettered options."""
    lines = [question.strip(), ""]
    lines += [f"{_LETTERS[i]}. {str(opt).strip()}" for i, opt in enumerate(options)]
    return "\n".join(lines)


def read_mmlu_pro(
    path: Path,
    report: IngestReport,
    source: str | None,
    options: Mapping[str, Any],
    success: Success = IDENTITY,
) -> Iterator[Outcome]:
    """MMLU-Pro `model_outputs_<model>_5shots.zip` (or its `.json`): correct = pred == answer."""
    model = options.get("model") or _mmlu_pro_model(path.name)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.endswith(".json")]
            if not members:
                report.warn(f"{path}: zip holds no .json member")
            for member in members:
                rows = json.loads(zf.read(member))
                yield from _mmlu_pro_rows(rows, f"{path}!{member}", model, report, source, success)
    else:
        rows = json.loads(path.read_text(encoding="utf-8"))
        yield from _mmlu_pro_rows(rows, str(path), model, report, source, success)


def _mmlu_pro_model(filename: str) -> str:
    m = re.match(r"model_outputs_(.+?)(?:_\d+shots?)?\.(?:zip|json)$", filename)
    return m.group(1) if m else Path(filename).stem


def _mmlu_pro_rows(
    rows: object,
    where: str,
    model: str,
    report: IngestReport,
    source: str | None,
    success: Success,
) -> Iterator[Outcome]:
    if not isinstance(rows, list):
        report.drop(where, "file is not a JSON list of rows", type(rows).__name__)
        return
    src = source or "mmlu-pro"
    for index, row in enumerate(rows):
        origin = f"{where}[{index}]"
        if not isinstance(row, dict):
            report.drop(origin, "row is not a JSON object", repr(row)[:40])
            continue
        question, opts, answer = row.get("question"), row.get("options"), row.get("answer")
        if isinstance(opts, str):  # some dumps hold the list as its Python repr
            with contextlib.suppress(ValueError, SyntaxError):
                opts = ast.literal_eval(opts)
        if not isinstance(opts, list) or not opts:
            report.drop(origin, "options missing or not a list")
            continue
        if not isinstance(answer, str) or not answer.strip():
            report.drop(origin, "answer missing")
            continue
        if not isinstance(question, str):
            report.drop(origin, "prompt missing or not a string", type(question).__name__)
            continue
        if not question.strip():
            report.drop(origin, "empty prompt")
            continue
        prompt = _prompt_or_drop(format_multiple_choice(question, opts), origin, report)
        if prompt is None:
            continue
        pred = row.get("pred")
        if pred is None:
            report.note("mmlu-pro: pred is null (no answer extracted), scored 0")
        qid = row.get("question_id")
        correct = pred is not None and str(pred).strip() == answer.strip()
        score = _score_or_drop(correct, origin, report, "correctness", success)
        if score is None:
            continue
        yield Outcome(
            prompt_id=f"{src}:{qid}" if qid is not None else f"{src}:{where}[{index}]",
            prompt=prompt,
            model=model,
            score=score,
            source=src,
            task=str(row.get("category") or "unknown"),
            origin=origin,
        )


# --------------------------------------------------------------------------- lm-evaluation-harness

_SAMPLES = re.compile(r"^samples_(?P<task>.+)_(?P<ts>\d{4}-\d{2}-\d{2}T[\d\-.]+)\.jsonl(?:\.gz)?$")
# Metric keys in the order they are preferred when a row does not list its own ``metrics``.
METRIC_KEYS = ("exact_match", "acc", "acc_norm", "em", "pass@1", "f1", "mc2", "mc1")

# Chat templates seen in --log_samples output. The user turn is kept so that the same question
# asked through different chat templates dedupes to one prompt.
_TEMPLATES = [
    re.compile(r"\[\|user\|\](.*?)(?:\[\|endofturn\|\]|\[\|assistant\|\]|$)", re.S),  # EXAONE
    re.compile(r"### User:\n(.*?)(?:\n### Assistant:|$)", re.S),  # SOLAR, Orca
    re.compile(r"<\|im_start\|>user\n(.*?)(?:<\|im_end\|>|$)", re.S),  # ChatML
    re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)", re.S),
    re.compile(r"<start_of_turn>user\n(.*?)(?:<end_of_turn>|$)", re.S),  # Gemma
    re.compile(r"<\|user\|>\n?(.*?)(?:<\|end\|>|<\|assistant\|>|$)", re.S),  # Phi-3, Zephyr
    re.compile(r"\[INST\](.*?)\[/INST\]", re.S),  # Llama-2, Mistral
]


def unwrap_chat_template(text: str) -> str:
    """Return the last user turn of a prompt in a known chat template, else ``text``."""
    for pattern in _TEMPLATES:
        turns = [t for t in pattern.findall(text) if t.strip()]
        if turns:
            return str(turns[-1])
    return text


def lm_eval_prompt(arguments: object) -> str | None:
    """The prompt of an lm-eval sample: ``gen_args_0.arg_0`` (new) or ``arguments[0][0]`` (old),
    a string, a one-element list, or a JSON chat-message list (API models)."""
    arg: object = None
    if isinstance(arguments, dict):
        first = arguments.get("gen_args_0")
        arg = first.get("arg_0") if isinstance(first, dict) else None
    elif isinstance(arguments, list) and arguments and isinstance(arguments[0], list):
        arg = arguments[0][0] if arguments[0] else None
    if isinstance(arg, list) and len(arg) == 1 and isinstance(arg[0], str):
        arg = arg[0]
    if isinstance(arg, list):
        return messages_to_prompt(arg)
    if not isinstance(arg, str):
        return None
    stripped = arg.lstrip()
    if stripped.startswith("[{"):
        try:
            messages = json.loads(stripped)
        except json.JSONDecodeError:
            messages = None
        if isinstance(messages, list):
            return messages_to_prompt(messages)
    return unwrap_chat_template(arg)


def _lm_eval_model(path: Path, ts: str, report: IngestReport) -> str:
    results = path.with_name(f"results_{ts}.json")
    if results.exists():
        try:
            meta = json.loads(results.read_text(encoding="utf-8"))
            name = meta.get("model_name") or (meta.get("config") or {}).get("model_args")
            if isinstance(name, str) and name:
                return name
            report.warn(f"{results}: no model_name; model taken from the folder name")
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            report.warn(f"{results}: unreadable ({exc}); model taken from the folder name")
    else:
        report.warn(f"{path}: no sibling {results.name}; model taken from the folder name")
    # lm-eval sanitizes "org/model" to "org__model" for folder names.
    return path.parent.name.replace("__", "/")


def read_lm_eval(
    path: Path,
    report: IngestReport,
    source: str | None,
    options: Mapping[str, Any],
    success: Success = IDENTITY,
) -> Iterator[Outcome]:
    """lm-evaluation-harness ``samples_<task>_<timestamp>.jsonl`` from ``--log_samples``."""
    m = _SAMPLES.match(path.name)
    task = options.get("task") or (m.group("task") if m else path.stem)
    model = options.get("model") or (_lm_eval_model(path, m.group("ts"), report) if m else None)
    if model is None:
        model = path.parent.name.replace("__", "/")
        report.warn(f"{path}: not named samples_<task>_<timestamp>.jsonl; model from folder name")
    metric_option = options.get("metric")
    src = source or "lm-eval"
    for origin, row in _jsonl(path, report):
        try:
            raw_prompt = lm_eval_prompt(row.get("arguments"))
        except ValueError as exc:
            report.drop(origin, "chat prompt has no user message", str(exc))
            continue
        prompt = _prompt_or_drop(raw_prompt, origin, report)
        if prompt is None:
            continue
        metrics = row.get("metrics")
        listed = metrics if isinstance(metrics, list) else []
        candidates = [metric_option] if metric_option else [*listed, *METRIC_KEYS]
        metric = next((k for k in candidates if k in row), None)
        if metric is None:
            report.drop(origin, "no metric key in row", f"looked for {candidates[:6]}")
            continue
        score = _score_or_drop(row[metric], origin, report, f"metric {metric!r}", success)
        if score is None:
            continue
        doc = row.get("doc_hash") or row.get("doc_id")
        yield Outcome(
            prompt_id=f"{src}:{task}:{doc}",
            prompt=prompt,
            model=str(model),
            score=score,
            source=src,
            task=str(task),
            origin=origin,
        )


# --------------------------------------------------------------------------- AlpacaEval


def read_alpaca_eval(
    path: Path,
    report: IngestReport,
    source: str | None,
    options: Mapping[str, Any],
    success: Success = IDENTITY,
) -> Iterator[Outcome]:
    """AlpacaEval ``annotations.json``: model = ``generator_2``, soft score = ``preference - 1``."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        report.drop(str(path), "file is not a JSON list of rows", type(rows).__name__)
        return
    src = source or "alpaca-eval"
    for index, row in enumerate(rows):
        origin = f"{path}[{index}]"
        if not isinstance(row, dict):
            report.drop(origin, "row is not a JSON object", repr(row)[:40])
            continue
        prompt = _prompt_or_drop(row.get("instruction"), origin, report)
        if prompt is None:
            continue
        model = row.get("generator_2")
        if not isinstance(model, str) or not model:
            report.drop(origin, "generator_2 missing")
            continue
        pref = row.get("preference")
        pref_f = (
            float(pref) if isinstance(pref, int | float) and not isinstance(pref, bool) else None
        )
        if pref_f is None or math.isnan(pref_f) or not 1.0 <= pref_f <= 2.0:
            report.drop(origin, "preference missing or outside [1, 2]", repr(pref)[:40])
            continue
        score = _score_or_drop(pref_f - 1.0, origin, report, "preference - 1", success)
        if score is None:
            continue
        yield Outcome(
            prompt_id=f"{src}:{index}",
            prompt=prompt,
            model=model,
            score=score,
            source=src,
            task=str(row.get("dataset") or "alpaca-eval"),
            origin=origin,
        )


# --------------------------------------------------------------------------- wide CSV


def read_wide_csv(
    path: Path,
    report: IngestReport,
    source: str | None,
    options: Mapping[str, Any],
    success: Success = IDENTITY,
) -> Iterator[Outcome]:
    """A prompt column plus one True/False or numeric column per model (RouteLLM's layout)."""
    prompt_col = options.get("prompt_column", "prompt")
    id_col = options.get("id_column", "id")  # an `id` column names the prompt, not a model
    src = source or path.parent.name or "wide-csv"
    task = options.get("task") or path.stem
    with open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return
        if prompt_col not in header:
            raise ValueError(f"no prompt column {prompt_col!r} in header {header}")
        p_idx = header.index(prompt_col)
        skip = {p_idx} | ({header.index(id_col)} if id_col in header else set())
        wanted = options.get("models")
        model_cols = [
            (i, name)
            for i, name in enumerate(header)
            if i not in skip and (not wanted or name in wanted)
        ]
        records = _csv_records(reader, path, report, width=len(header))
        for row_no, (origin, row) in enumerate(records, start=1):
            prompt = _prompt_or_drop(row[p_idx], origin, report)
            if prompt is None:
                continue
            pid = row[header.index(id_col)] if id_col in header else str(row_no)
            for i, model in model_cols:
                cell = row[i]
                if not cell.strip():
                    report.note("wide-csv: empty cell (no outcome for that model)")
                    continue
                score = _score_or_drop(
                    cell, f"{origin} ({model})", report, f"column {model!r}", success
                )
                if score is None:
                    continue
                yield Outcome(f"{src}:{task}:{pid}", prompt, model, score, src, str(task), origin)


# --------------------------------------------------------------------------- FastChat llm-judge

QUESTION_FILES = ("question.jsonl", "questions.jsonl")


def is_questions_file(path: Path) -> bool:
    """A FastChat ``question.jsonl``: read beside its judgments, not an outcome file itself."""
    return path.name.lower() in QUESTION_FILES


def _questions_for(path: Path, options: Mapping[str, Any]) -> Path:
    named = options.get("questions")
    if named:
        return Path(str(named))
    # FastChat's layout: data/<bench>/question.jsonl beside data/<bench>/model_judgment/
    for folder in (path.parent, path.parent.parent):
        for name in QUESTION_FILES:
            if (folder / name).is_file():
                return folder / name
    raise ValueError(
        "no question.jsonl beside or above this judgment file; name it with "
        "options: {questions: PATH}"
    )


def _read_questions(path: Path) -> dict[str, tuple[object, str]]:
    """question_id -> (first user turn, category), from a FastChat questions file. Bad rows are
    not outcomes; they surface as judgments whose question cannot be found."""
    out: dict[str, tuple[object, str]] = {}
    scratch = IngestReport()
    for _, row in _jsonl(path, scratch):
        turns = row.get("turns")
        first = turns[0] if isinstance(turns, list) and turns else row.get("prompt")
        out[str(row.get("question_id"))] = (first, str(row.get("category") or ""))
    return out


def read_llm_judge(
    path: Path,
    report: IngestReport,
    source: str | None,
    options: Mapping[str, Any],
    success: Success = IDENTITY,
) -> Iterator[Outcome]:
    """FastChat llm-judge single-answer grading (MT-Bench, arena-bench): a judgment JSONL of
    ``question_id, model, score`` rows (``score`` a 1-10 grade; None or -1 when the judge gave
    none) beside the bench's ``question.jsonl`` (``question_id, turns[, category]``).

    A multi-turn question is classified on its first user turn (every turn's grade of a model
    is averaged into one outcome by the dataset builder). Grades need the source's ``success``
    rule, declared in the config: there is no one right mapping of a 1-10 grade to success.
    """
    if success == IDENTITY:
        raise ValueError(
            "judge grades need a success rule in the source's config, e.g. "
            "success: {scale: [1, 10], threshold: 8}"
        )
    qpath = _questions_for(path, options)
    questions = _read_questions(qpath)
    bench = qpath.parent.name or "llm-judge"
    src = source or bench
    for origin, row in _jsonl(path, report):
        qid = row.get("question_id")
        question = questions.get(str(qid))
        if question is None:
            report.drop(origin, "question_id not in the questions file", f"{qid!r} ({qpath})")
            continue
        prompt = _prompt_or_drop(question[0], origin, report)
        if prompt is None:
            continue
        model = row.get("model") or options.get("model")
        if not isinstance(model, str) or not model:
            report.drop(origin, "model missing")
            continue
        raw = row.get("score")
        if raw is None or raw == -1 or raw == "-1":
            report.drop(origin, "judge gave no grade", repr(raw))
            continue
        score = _score_or_drop(raw, origin, report, "score", success)
        if score is None:
            continue
        yield Outcome(
            prompt_id=f"{src}:{qid}",
            prompt=prompt,
            model=model,
            score=score,
            source=src,
            task=question[1] or bench,
            origin=origin,
        )


# --------------------------------------------------------------------------- generic long format


def read_long(
    path: Path,
    report: IngestReport,
    source: str | None,
    options: Mapping[str, Any],
    success: Success = IDENTITY,
) -> Iterator[Outcome]:
    """JSONL, CSV or Parquet rows: prompt, model, score (optional prompt_id, task, source)."""
    pf = options.get("prompt_field", "prompt")
    mf = options.get("model_field", "model")
    sf = options.get("score_field", "score")
    default_source = source or path.name.split(".")[0]
    for origin, row in _long_rows(path, report):
        prompt = _prompt_or_drop(row.get(pf), origin, report)
        if prompt is None:
            continue
        model = row.get(mf)
        if not isinstance(model, str) or not model.strip():
            report.drop(origin, f"field {mf!r} missing or not a string")
            continue
        score = _score_or_drop(row.get(sf), origin, report, f"field {sf!r}", success)
        if score is None:
            continue
        src = source or str(row.get("source") or default_source)
        pid = row.get("prompt_id")
        yield Outcome(
            prompt_id=f"{src}:{pid}" if pid is not None else f"{src}:{origin.rsplit(':', 1)[-1]}",
            prompt=prompt,
            model=model.strip(),
            score=score,
            source=src,
            task=str(row.get("task") or src),
            origin=origin,
        )


def _long_rows(path: Path, report: IngestReport) -> Iterator[tuple[str, dict[str, Any]]]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        offset = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
            for i, row in enumerate(batch.to_pylist()):
                yield f"{path}:row {offset + i + 1}", row
            offset += batch.num_rows
    elif name.endswith(".csv") or name.endswith(".csv.gz"):
        with open_text(path) as fh:
            yield from _csv_records(csv.DictReader(fh), path, report)
    else:
        yield from _jsonl(path, report)


READERS: dict[str, Reader] = {
    "mmlu-pro": read_mmlu_pro,
    "lm-eval": read_lm_eval,
    "alpaca-eval": read_alpaca_eval,
    "wide-csv": read_wide_csv,
    "llm-judge": read_llm_judge,
    "long": read_long,
}
