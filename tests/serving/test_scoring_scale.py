"""`tierpick score` at scale: parts over a process pool, directories and globs, resume after a
kill, the Ray engine on a real local Ray, and the savings report."""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from tests.conftest import DATA, REPO
from tierpick import classifier
from tierpick.classifier.errors import ConfigError
from tierpick.cli import main
from tierpick.serving.report import write_report
from tierpick.serving.scoring import ScoreOptions, score

ARENA = DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl"
JUNK = ["{junk", json.dumps({"uid": 7, "prompt": 5}), json.dumps(["a", "list"])]


@pytest.fixture(scope="module")
def clf(tiny_trained):  # type: ignore[no-untyped-def]
    return classifier.load(tiny_trained.model_dir)


def _log(path: Path, copies: int = 1, junk_every: int = 97) -> list[str]:
    """Arena-hard prompts (x copies) with junk lines mixed in; returns the lines written."""
    base = ARENA.read_text(encoding="utf-8").splitlines()
    lines = []
    for i, line in enumerate(base * copies):
        lines.append(line)
        if i % junk_every == 3:
            lines.append(JUNK[i % len(JUNK)])
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:  # type: ignore[operator]
        fh.write("\n".join(lines) + "\n")
    return lines


def _bad_lines(lines: list[str]) -> list[int]:
    return [n for n, line in enumerate(lines, start=1) if line in JUNK]


def test_parts_over_a_process_pool_match_one_process(clf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "log.jsonl"
    lines = _log(src)
    opts = ScoreOptions(part_bytes=20_000, batch_size=64)
    pooled = score([src], tmp_path / "pool.parquet", clf, opts, workers=2, progress=False)
    single = score([src], tmp_path / "one.parquet", clf, opts, workers=1, progress=False)
    assert pooled.parts == single.parts > 5 and pooled.workers == 2
    a = pq.read_table(tmp_path / "pool.parquet")
    b = pq.read_table(tmp_path / "one.parquet")
    assert a.num_rows == len(lines) == pooled.rows  # row count out == in, junk included
    assert a.equals(b)  # same rows in the same (input) order, same probabilities
    # junk rows are kept at their place, with the line they came from
    bad = [i for i, e in enumerate(a["error"].to_pylist()) if e is not None]
    assert [i + 1 for i in bad] == _bad_lines(lines)
    assert sum(pooled.errors.values()) == len(bad)
    assert a["line"].to_pylist()[bad[0]] == bad[0] + 1  # invalid JSON: the line is stored
    assert pooled.examples[0].startswith(f"{src}:{bad[0] + 1}: ")
    assert not (tmp_path / ".pool.parquet.parts").exists()  # the work directory is cleaned up


def test_directory_and_glob_inputs_write_a_directory_of_parts(clf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    logs = tmp_path / "logs"
    (logs / "2026-10").mkdir(parents=True)
    n_a = len(_log(logs / "2026-10" / "a.jsonl"))
    n_b = len(_log(logs / "b.jsonl.gz", junk_every=50))
    rows = [json.loads(x) for x in ARENA.read_text().splitlines()[:30]]
    with (logs / "c.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), logs / "d.parquet")
    (logs / "_ignored.jsonl").write_text("not a log\n")
    out = tmp_path / "scored"
    opts = ScoreOptions(part_bytes=50_000)
    summary = score([logs], out, clf, opts, workers=2, progress=False)
    assert summary.rows == n_a + n_b + 30 + 30
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert "b.parquet" in names and "c.parquet" in names and "d.parquet" in names
    assert [n for n in names if n.startswith("2026-10/a-")]  # a big file: several parts
    assert not any("_ignored" in n for n in names)
    table = pads.dataset(out, format="parquet").to_table()  # _tierpick/ is skipped by readers
    assert table.num_rows == summary.rows
    assert json.loads((out / "_tierpick" / "summary.json").read_text())["rows"] == summary.rows

    # a glob, written as JSONL
    out2 = tmp_path / "scored-glob"
    s2 = score(
        [str(logs / "**" / "*.jsonl")],
        out2,
        clf,
        ScoreOptions(out_kind=".jsonl"),
        workers=1,
        progress=False,
    )
    # a glob is explicit: it takes _ignored.jsonl too (one line, invalid JSON, kept)
    assert s2.rows == n_a + 1 and (out2 / "2026-10" / "a.jsonl").is_file()

    with pytest.raises(ConfigError, match="a directory of parts"):
        score([logs], tmp_path / "x.parquet", clf, opts, progress=False)
    with pytest.raises(ConfigError, match="is inside the input"):
        score([logs], logs / "2026-10", clf, opts, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("someone else's file")
    with pytest.raises(ConfigError, match="not empty and holds no tierpick run"):
        score([logs], tmp_path / "busy", clf, opts, progress=False)
    with pytest.raises(ConfigError, match="matches no"):
        score([str(tmp_path / "*.nothing")], out2, clf, opts, progress=False)


def test_a_killed_run_resumes_without_rescoring_finished_parts(
    tiny_trained, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "log.jsonl"
    lines = _log(src, copies=30)
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "tierpick.cli",
        "score",
        str(src),
        str(out),
        "--model",
        str(tiny_trained.model_dir),
        "--workers",
        "1",
        "--part-mb",
        "0.05",
        "--cache-size",
        "0",
    ]
    done = tmp_path / ".out.jsonl.parts" / "_tierpick" / "done"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(done.glob("*.json"))) < 3:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    finished = len(list(done.glob("*.json")))
    assert finished >= 3 and not out.exists()

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert "finished by an earlier run" in resumed.stdout
    n_resumed = int(resumed.stdout.split("parts: ")[1].split(" (")[1].split()[0])
    assert n_resumed >= finished
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(scored) == len(lines)
    assert [r.get("uid") for r in scored] == [
        json.loads(x).get("uid") if x.startswith('{"') else None for x in lines
    ]
    # the resumed output equals an uninterrupted run
    fresh = tmp_path / "fresh.jsonl"
    subprocess.run(
        [*cmd[:4], str(src), str(fresh), *cmd[6:]], cwd=REPO, check=True, capture_output=True
    )
    assert out.read_text() == fresh.read_text()

    # a different input leaves parts that are refused, then discarded with --restart
    work = tmp_path / ".out.jsonl.parts"
    (work / "_tierpick").mkdir(parents=True)
    (work / "_tierpick" / "plan.json").write_text("{}")
    assert main(cmd[3:]) == 2
    assert main([*cmd[3:], "--restart"]) == 0 and not work.exists()


@pytest.fixture(scope="session")
def ray_session():  # type: ignore[no-untyped-def]
    """One local Ray for the whole test run (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow  # a local Ray
def test_ray_engine_scores_like_the_local_path(clf, ray_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    logs = tmp_path / "logs"
    logs.mkdir()
    n = len(_log(logs / "a.jsonl")) + len(_log(logs / "b.jsonl.gz", junk_every=13))
    opts = ScoreOptions(part_bytes=40_000)
    on_ray = score([logs], tmp_path / "ray", clf, opts, workers=2, engine="ray", progress=False)
    local = score([logs], tmp_path / "local", clf, opts, workers=1, progress=False)
    assert on_ray.rows == local.rows == n
    assert on_ray.errors == local.errors and sum(on_ray.errors.values()) > 0
    assert on_ray.parts == local.parts > 2
    for part in sorted((tmp_path / "local").glob("*.parquet")):
        assert pq.read_table(part).equals(pq.read_table(tmp_path / "ray" / part.name))


def test_savings_report(clf, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "log.jsonl"
    _log(src)
    scored = tmp_path / "scored.parquet"
    summary = score([src], scored, clf, ScoreOptions(), workers=1, progress=False)
    report, md, note = write_report(scored, tmp_path / "rep", clf, output_tokens=200)
    assert note is None and (tmp_path / "rep" / "cost_curve.png").stat().st_size > 10_000
    assert report["rows"] == summary.rows
    assert report["error_rows"] == sum(summary.errors.values())
    # recompute "always frontier" and "as scored" from the scored rows themselves
    t = pq.read_table(scored).to_pylist()
    prices = {x.name: (x.price_input, x.price_output) for x in clf.manifest.tiers}

    def cost(row: dict[str, object], tier: str) -> float:
        p_in, p_out = prices[tier]
        return (math.ceil(len(row["prompt"]) / 4) * p_in + 200 * p_out) / 1e6  # type: ignore[arg-type]

    ok = [r for r in t if r["error"] is None]
    frontier = report["routings"]["always frontier"]
    assert frontier["cost_usd"] == pytest.approx(sum(cost(r, "frontier") for r in ok))
    routed = report["routings"]["as scored"]
    assert routed["cost_usd"] == pytest.approx(sum(cost(r, r["tier"]) for r in ok))
    assert routed["saving_vs"]["always frontier"] == pytest.approx(
        1 - routed["cost_usd"] / frontier["cost_usd"]
    )
    assert sum(routed["mix"].values()) == pytest.approx(1.0)
    curve = report["threshold_curve"]
    assert curve[0]["mix"]["local"] == 1.0  # t = 0: everything to the cheapest tier
    assert curve[-1]["cost_usd"] >= curve[0]["cost_usd"]
    assert "| as scored |" in md and "saving vs always frontier" in md

    # the command, on a directory of JSONL parts
    out_dir = tmp_path / "parts"
    score(
        [str(tmp_path / "*.jsonl")],
        out_dir,
        clf,
        ScoreOptions(out_kind=".jsonl"),
        workers=1,
        progress=False,
    )
    assert main(["report", str(out_dir), "--model", str(clf.model_dir)]) == 0
    assert "| always mid |" in capsys.readouterr().out
    assert (tmp_path / "parts-report" / "report.json").is_file()
    assert main(["report", str(src), "--model", str(clf.model_dir)]) == 2
    assert "not a scored row" in capsys.readouterr().err


def test_dollar_amounts_keep_the_digits_that_matter() -> None:
    from tierpick.serving.report import usd

    assert [usd(x) for x in (0.0, 0.25, 0.0042, 12.5, 1234.4)] == [
        "$0.00",
        "$0.25",
        "$0.0042",
        "$12.50",
        "$1,234",
    ]
