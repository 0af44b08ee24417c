"""The ``tierpick`` command, in process and as the installed console script."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_CONFIG, REPO
from tierpick.cli import main


def _tiny_config(tmp_path: Path, data_dir: Path) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"""
name: tiny
data_root: {data_dir}
tiers:
  - {{name: local, price_input: 0, price_output: 0,
     models: [LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct, upstage/SOLAR-10.7B-Instruct-v1.0]}}
  - {{name: frontier, price_input: 5, price_output: 15, models: [gpt-4o]}}
sources: [lm-eval-samples]
"""
    )
    return cfg


def test_data_build_then_stats(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _tiny_config(tmp_path, data_dir)
    assert main(["data", "build", "--config", str(cfg), "--out", str(tmp_path / "ds")]) == 0
    built_out = capsys.readouterr().out
    assert "wrote 326 prompts" in built_out
    assert main(["data", "stats", str(tmp_path / "ds"), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "gpt-4o" in out and "winogrande" in out
    assert (tmp_path / "s.json").is_file()


def test_stats_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "stats"]) == 2
    assert "give either a dataset directory or --config" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path)]) == 2
    assert "is not a tierpick dataset directory" in capsys.readouterr().err
    assert (
        main(["data", "build", "--config", str(tmp_path / "no.yaml"), "--out", str(tmp_path)]) == 2
    )
    assert "cannot read config" in capsys.readouterr().err


def test_console_script_runs_default_stats(data_dir: Path) -> None:
    exe = shutil.which("tierpick", path=str(Path(sys.executable).parent))
    assert exe, "the tierpick console script is not installed"
    proc = subprocess.run(
        [exe, "data", "stats", "--config", str(DEFAULT_CONFIG), "--data-root", str(data_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "12032" in proc.stdout and "Per-tier labels" in proc.stdout


def test_version_description_and_every_default_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from tierpick import __version__
    from tierpick.cli import _every_parser, build_parser

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"tierpick {__version__}"
    parser = build_parser()
    assert parser.format_help().split("\n\n")[1].startswith("tierpick routes each prompt")
    missing = []
    for p in _every_parser(parser):
        text = "".join(p.format_help().split())  # help wraps long values at hyphens too
        for a in p._actions:
            shown = a.help and "".join(str(a.default).split()) in text
            if a.option_strings and a.default not in (None, False, argparse.SUPPRESS) and not shown:
                missing.append((p.prog, a.option_strings[0]))
    assert not missing, missing


def test_classify_explains_the_decision(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tierpick import classifier
    from tierpick.classifier import RoutingPolicy

    clf = classifier.load()
    prompts = ["What is 2+2?", "Prove that sqrt(2) is irrational. " * 400]
    assert main(["classify", "--json", "--cost-weight", "0.3", *prompts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = clf.route(prompts, RoutingPolicy(cost_weight=0.3))
    for row, decision in zip(rows, expected, strict=True):
        assert (
            row["tier"] == decision.tier
            and row["rule"] == "utility"
            and row["knob"] == "cost_weight"
        )
        assert row["cost_weight"] == 0.3 and row["model"]["version"] == clf.version
        for t in row["tiers"]:
            assert t["probability"] == pytest.approx(decision.probabilities[t["tier"]], abs=1e-5)
            assert t["utility"] == pytest.approx(t["probability"] - 0.3 * t["normalized_cost"])
        # what it would take to move the decision: the chosen tier's range holds 0.3
        lo, hi = next(t for t in row["tiers"] if t["tier"] == row["tier"])["chosen_when"][
            "cost_weight"
        ]
        assert lo <= 0.3 < (hi if hi is not None else float("inf"))
    assert rows[0]["truncated"] is False and rows[1]["truncated"] is True
    # the human form, under a threshold policy that restricts the tiers
    assert main(["classify", "--min-success", "0.99", "--allowed-tiers", "local,mid", "hi"]) == 0
    out = capsys.readouterr().out
    assert "threshold rule, min_success 0.99" in out and "not allowed" in out
    assert "chosen at min_success" in out
    assert "no allowed tier reached it" in out
    assert main(["classify", "--allowed-tiers", "premium", "hi"]) == 2
    assert "unknown tier" in capsys.readouterr().err


def test_score_exits_2_when_rows_fail_and_missing_files_are_one_line(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = data_dir / "prompt-logs" / "arena-hard-v0.1-question.jsonl"
    out = tmp_path / "scored.jsonl"
    assert main(["score", str(log), str(out), "--prompt-field", "text"]) == 2
    err = capsys.readouterr().err
    assert "500 of 500 rows are error rows (missing prompt (500))" in err
    assert "is --prompt-field 'text' right?" in err
    assert len(out.read_text().splitlines()) == 500  # every row is still written, with its error
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "What is 2+2?"}\n{"prompt": 5}\n{"prompt": "hi"}\n')
    assert main(["score", str(mixed), str(tmp_path / "m.jsonl")]) == 0
    assert main(["score", str(mixed), str(tmp_path / "n.jsonl"), "--max-error-rate", "0.2"]) == 2
    assert "over --max-error-rate 0.2" in capsys.readouterr().err
    assert main(["bench", "--prompts", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such prompt file" in capsys.readouterr().err
    assert main(["bench", "--teacher", str(tmp_path / "nope.onnx")]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
    assert main(["classify", "--model", str(tmp_path / "nomodel"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_log_format_json_and_log_level() -> None:
    import json
    import signal

    cmd = [sys.executable, "-m", "tierpick.cli", "--log-format", "json", "serve", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "tierpick serving on" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"] == "tierpick.serve" and "serving" in r["message"] for r in records)
    assert any(r["message"] == "stopped" for r in records)
    quiet = subprocess.run(
        [sys.executable, "-m", "tierpick.cli", "--log-level", "error", "classify", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert quiet.returncode == 0 and quiet.stderr == "" and "tier:" in quiet.stdout


def test_classify_reads_stdin_and_chats(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io
    import json

    from tierpick import classifier

    clf = classifier.load()
    assert clf.route("What is 2+2?").tier == clf.route(["What is 2+2?"])[0].tier  # one string
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+2?\n"))
    assert main(["classify", "-", "--json"]) == 0
    from_stdin = json.loads(capsys.readouterr().out)
    chat = json.dumps(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    )
    assert main(["classify", chat, "--json"]) == 0
    from_chat = json.loads(capsys.readouterr().out)
    assert from_stdin["tiers"][0]["probability"] == pytest.approx(
        from_chat["tiers"][0]["probability"], abs=1e-6
    )
    assert (
        main(["classify", json.dumps({"messages": [{"role": "assistant", "content": "x"}]})]) == 2
    )
    assert "chat: no user message" in capsys.readouterr().err


def test_a_command_whose_extra_is_missing_says_which_in_one_line(tmp_path: Path) -> None:
    """From the runtime wheel, export/adapt/promote ended in ModuleNotFoundError tracebacks."""
    code = (
        "import sys; sys.modules['onnx'] = None; sys.modules['mlflow'] = None; "  # not installed
        "from tierpick.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    for argv in (
        [
            "export",
            "--model",
            str(REPO / "models" / "default"),
            "--out",
            str(tmp_path / "x"),
            "--int8",
        ],
        ["promote", "--name", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
    ):
        proc = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert "pip install 'tierpick[train]'" in proc.stderr and "Traceback" not in proc.stderr
