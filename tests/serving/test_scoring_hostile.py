"""`tierpick score` against hostile input: one bad row never stops a run, the user's fields are
never overwritten, nothing outlives a killed run, every refusal is one line and exit code 2."""

from __future__ import annotations

import csv
import gzip
import json
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
from tierpick.cli import main

ARENA = DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl"


def _arena(n: int) -> list[dict[str, object]]:
    return [json.loads(line) for line in ARENA.read_text().splitlines()[:n]]


def _score(model: Path, *args: str) -> int:
    return main(["score", *args, "--model", str(model)])


@pytest.fixture(scope="module")
def model(tiny_trained) -> Path:  # type: ignore[no-untyped-def]
    return Path(tiny_trained.model_dir)


def test_deep_json_and_huge_csv_fields_are_error_rows(model: Path, tmp_path: Path) -> None:
    rows = _arena(6)
    lines = [json.dumps(r) for r in rows]
    lines[2] = '{"prompt": "x", "deep": ' + "[" * 1200 + "]" * 1200 + "}"
    lines[4] = json.dumps({"uid": "zw", "prompt": "\u200b\u200d\x00\u2060"})
    src = tmp_path / "deep.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "deep-out.jsonl"
    assert _score(model, str(src), str(out)) == 0
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(scored) == 6
    assert scored[2]["error"] == "invalid JSON (nested too deeply)" and scored[2]["line"] == 3
    assert scored[4]["error"].startswith("empty prompt once normalized") and not scored[4]["tier"]
    assert all(r["error"] is None for i, r in enumerate(scored) if i not in (2, 4))

    big = tmp_path / "big.csv"
    with big.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uid", "prompt"])
        w.writerow(["a", "What is 2 + 2?"])
        w.writerow(["b", "long " * 40_000])  # 200,000 characters: over csv's 131,072 default
        w.writerow(["c", "x" * (70 << 20)])  # over the 64 MiB limit: an error row
        w.writerow(["d", "Name three primes."])
    out_csv = tmp_path / "big-out.jsonl"
    assert _score(model, str(big), str(out_csv)) == 0
    scored = [json.loads(x) for x in out_csv.read_text().splitlines()]
    assert [r.get("uid") for r in scored] == ["a", "b", None, "d"]
    assert scored[1]["error"] is None and scored[1]["tier"]  # a long prompt is scored, cut
    assert scored[2]["error"].startswith("malformed CSV row (field larger than field limit")
    assert scored[2]["line"] == 4


def test_input_fields_named_like_output_columns_are_kept(
    model: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    rows = [
        {**r, "tier": "gold", "error": "none", "p_local": 7, "extra_fields": "mine"}
        for r in _arena(5)
    ]
    src = tmp_path / "clash.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "clash-out.parquet"
    assert _score(model, str(src), str(out)) == 2
    err = capsys.readouterr().err
    assert "['error', 'extra_fields', 'p_local', 'tier']" in err and "--output-prefix" in err
    assert not out.exists()
    assert _score(model, str(src), str(out), "--output-prefix", "tp_") == 0
    table = pq.read_table(out)  # one column per name: readable
    assert table["tier"].to_pylist() == ["gold"] * 5 and table["p_local"].to_pylist() == [7] * 5
    assert set(table["tp_tier"].to_pylist()) <= {"local", "mid", "frontier"}
    assert table["tp_error"].to_pylist() == [None] * 5
    # JSONL: a clash in a later row is refused with its line
    jsonl = tmp_path / "late.jsonl"
    jsonl.write_text(
        "".join(json.dumps(r) + "\n" for r in _arena(500) * 3) + json.dumps(rows[0]) + "\n"
    )
    assert _score(model, str(jsonl), str(tmp_path / "late-out.jsonl")) == 2
    assert f"{jsonl}:1501: input field(s)" in capsys.readouterr().err
    # the report reads the prefixed columns
    assert main(["report", str(out), "--model", str(model), "--output-prefix", "tp_"]) == 0


def test_output_equal_to_an_input_is_refused(model: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "log.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _arena(3)))
    before = src.read_bytes()
    assert _score(model, str(src), str(src)) == 2
    assert "is also an input" in capsys.readouterr().err
    assert src.read_bytes() == before
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(before)
    assert _score(model, str(folder), str(folder / "scored")) == 2
    assert "inside the input directory" in capsys.readouterr().err


def test_empty_inputs_write_valid_empty_files(model: Path, tmp_path: Path) -> None:
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    for kind in ("parquet", "csv", "jsonl"):
        out = tmp_path / f"empty-out.{kind}"
        assert _score(model, str(src), str(out)) == 0
        if kind == "parquet":
            table = pads.dataset(out).to_table()
            assert table.num_rows == 0
            assert {"tier", "p_local", "p_mid", "p_frontier", "error"} <= set(table.column_names)
        elif kind == "csv":
            assert out.read_text().strip().split(",")[0] == "tier"
    empty_pq = tmp_path / "empty.parquet"
    pq.write_table(
        pa.table({"uid": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), empty_pq
    )
    out = tmp_path / "empty-pq-out.parquet"
    assert _score(model, str(empty_pq), str(out)) == 0
    assert set(pq.read_table(out).column_names) >= {"uid", "prompt", "tier", "error"}


def test_a_byte_order_mark_is_not_part_of_the_first_row(model: Path, tmp_path: Path) -> None:
    rows = _arena(4)
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    with (tmp_path / "bom.csv").open("w", newline="", encoding="utf-8-sig") as fh:
        w = csv.DictWriter(fh, fieldnames=["uid", "prompt"])
        w.writeheader()
        w.writerows({"uid": r["uid"], "prompt": r["prompt"]} for r in rows)
    for src in (jsonl, tmp_path / "bom.csv"):
        out = tmp_path / f"{src.name}-out.jsonl"
        assert _score(model, str(src), str(out)) == 0
        scored = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["error"] for r in scored] == [None] * 4
        assert [r["uid"] for r in scored] == [r["uid"] for r in rows]


def test_unreadable_inputs_and_outputs_are_one_line_errors(
    model: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    good = "".join(json.dumps(r) + "\n" for r in _arena(50)).encode()
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(good)[:-200])
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b"this is not gzip at all\n")
    for src in (truncated, fake):
        assert _score(model, str(src), str(tmp_path / "o.jsonl")) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tierpick: error: {src}: not a complete gzip file")
        assert "Traceback" not in err and err.count("\n") == 1
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_bytes(b"uid,prompt\na,hello\nb,caf\xe9 au lait\nc,ok\n")
    assert _score(model, str(bad_csv), str(tmp_path / "o.jsonl")) == 2
    assert "bad.csv: line 3 is not UTF-8" in capsys.readouterr().err
    src = tmp_path / "ok.jsonl"
    src.write_bytes(good)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _score(model, str(src), str(blocker / "out.jsonl")) == 2
    err = capsys.readouterr().err
    assert err.startswith("tierpick: error: ") and "Traceback" not in err and err.count("\n") == 1


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_workers_die_with_a_killed_run_and_a_second_run_is_refused(
    model: Path, tmp_path: Path
) -> None:
    src = tmp_path / "log.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _arena(500)) * 40)
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "tierpick.cli",
        "score",
        str(src),
        str(out),
        "--model",
        str(model),
    ]
    # rows one at a time: slow enough that the second run starts while the first is running
    cmd += ["--workers", "2", "--part-mb", "0.5", "--cache-size", "0", "--batch-size", "1"]
    done = tmp_path / ".out.jsonl.parts" / "_tierpick" / "done"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(done.glob("*.json")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    workers = _children(proc.pid)
    assert len(workers) >= 2
    # a second run on the same output is refused at once, naming the running one
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert f"another tierpick score (pid {proc.pid}) is writing {out}" in second.stderr
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "workers outlived their killed parent"
    fast = cmd[:-2]  # the batch size only changes speed: the run resumes with another one
    resumed = subprocess.run(fast, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "finished by an earlier run" in resumed.stdout
    fresh = tmp_path / "fresh.jsonl"
    subprocess.run(
        [*fast[:5], str(fresh), *fast[6:]], cwd=REPO, check=True, capture_output=True, timeout=300
    )
    got = [json.loads(x) for x in out.read_text().splitlines()]
    want = [json.loads(x) for x in fresh.read_text().splitlines()]
    assert len(got) == len(want) == 20_000
    for a, b in zip(got, want, strict=True):  # batch sizes differ: floats within rounding
        assert {k: v for k, v in a.items() if not k.startswith("p_")} == {
            k: v for k, v in b.items() if not k.startswith("p_")
        }
        assert [a[k] for k in a if k.startswith("p_")] == pytest.approx(
            [b[k] for k in b if k.startswith("p_")], abs=1e-5
        )
