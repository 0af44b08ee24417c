"""`tierpick score`: every input kind, every bad row kept and counted, row count out == in."""

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import DATA
from tierpick import classifier
from tierpick.cli import main
from tierpick.serving.scoring import score_file


@pytest.fixture(scope="module")
def clf(tiny_trained):  # type: ignore[no-untyped-def]
    return classifier.load(tiny_trained.model_dir)


def _arena(n: int = 40) -> list[dict[str, object]]:
    with (DATA / "prompt-logs" / "arena-hard-v0.1-question.jsonl").open() as fh:
        return [json.loads(line) for line in fh][:n]


def test_jsonl_with_junk_keeps_every_row(clf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = _arena()
    lines = [json.dumps(r) for r in rows]
    lines[3] = "{not json"
    lines[5] = json.dumps({"uid": "x", "prompt": 42})
    lines[7] = json.dumps({"uid": "y", "prompt": "   "})
    lines[9] = json.dumps({"uid": "z"})
    lines[11] = json.dumps(["a", "list"])
    src = tmp_path / "log.jsonl.gz"
    with gzip.open(src, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    summary = score_file(clf, src, tmp_path / "out.jsonl", batch_size=8, progress=False)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == len(rows) == summary.rows
    assert out[0]["uid"] == rows[0]["uid"] and out[0]["cluster"] == rows[0]["cluster"]
    assert out[0]["tier"] in ("local", "mid", "frontier") and out[0]["error"] is None
    assert 0 < out[0]["p_local"] < 1
    assert out[3]["error"].startswith("invalid JSON") and out[3]["raw"] == "{not json"
    assert out[3]["line"] == 4
    assert out[5]["error"] == "prompt is not a string (int)" and out[5]["p_mid"] is None
    assert out[7]["error"] == "empty prompt"
    assert out[9]["error"] == "missing prompt"
    assert out[11]["error"] == "row is not a JSON object"
    assert sum(summary.errors.values()) == 5
    assert sum(summary.tiers.values()) == len(rows) - 5
    # the same prompts scored in batches and one by one agree
    direct = clf.predict_proba([rows[0]["prompt"]])[0]
    assert out[0]["p_frontier"] == pytest.approx(float(direct[2]), abs=1e-6)


def test_csv_and_parquet_round_trips(clf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = _arena(25)
    src_csv = tmp_path / "log.csv"
    with src_csv.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["uid", "category", "cluster", "prompt"])
        w.writeheader()
        w.writerows(rows)
        fh.write('"only-two",fields\n')
    summary = score_file(clf, src_csv, tmp_path / "out.parquet", progress=False)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == 26 == summary.rows
    assert {"uid", "cluster", "prompt", "tier", "p_local", "p_mid", "p_frontier", "error"} <= set(
        table.column_names
    )
    assert table["error"].to_pylist()[-1] == "wrong number of CSV fields"

    src_pq = tmp_path / "log.parquet"
    pq.write_table(pa.Table.from_pylist([*rows, {**rows[0], "prompt": None}]), src_pq)
    score_file(clf, src_pq, tmp_path / "out.csv", progress=False)
    with (tmp_path / "out.csv").open(newline="") as fh:
        out = list(csv.DictReader(fh))
    assert len(out) == 26
    assert out[0]["uid"] == rows[0]["uid"] and out[-1]["error"] == "missing prompt"


def test_score_command_and_errors(tiny_trained, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "log.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _arena(10)))
    out = tmp_path / "scored.jsonl"
    assert main(["score", str(src), str(out), "--model", str(tiny_trained.model_dir)]) == 0
    text = capsys.readouterr().out
    assert "rows: 10" in text and "tier mix:" in text
    assert len(out.read_text().splitlines()) == 10
    assert (
        main(["score", str(src), str(tmp_path / "x.txt"), "--model", str(tiny_trained.model_dir)])
        == 2
    )
    assert "unsupported file type" in capsys.readouterr().err
    bad = tmp_path / "log.parquet"
    pq.write_table(pa.table({"text": ["a"]}), bad)
    assert main(["score", str(bad), str(out), "--model", str(tiny_trained.model_dir)]) == 2
    assert "no column 'prompt'" in capsys.readouterr().err


def test_repeated_prompts_use_the_cache_and_agree(clf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = _arena(20) * 5
    src = tmp_path / "log.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cached = score_file(clf, src, tmp_path / "a.jsonl", batch_size=16, progress=False)
    plain = score_file(clf, src, tmp_path / "b.jsonl", batch_size=16, progress=False, cache_size=0)
    assert (cached.cache_hits, cached.cache_misses) == (80, 20)
    assert plain.cache_hits == 0
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["tier"] for r in a] == [r["tier"] for r in b]
    assert [r["p_mid"] for r in a] == pytest.approx([r["p_mid"] for r in b], abs=1e-6)


def test_scored_rows_record_their_model_and_report_refuses_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    clf = classifier.load()
    src = tmp_path / "log.jsonl"
    src.write_text('{"prompt": "What is 2+2?"}\n{"prompt": 7}\n')
    for out in (tmp_path / "s.jsonl", tmp_path / "s.csv", tmp_path / "s.parquet"):
        assert main(["score", str(src), str(out)]) == 0
        assert main(["report", str(out), "--out", str(tmp_path / f"r{out.suffix}")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["model_version"] for r in rows] == [clf.version, clf.version]  # error rows too
    # another model (a copy with another version) is refused by report and tune
    other = tmp_path / "other"
    shutil.copytree(clf.model_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model_version"] = "other-version"
    (other / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["report", str(tmp_path / "s.parquet"), "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"was scored by model version ['{clf.version}'], not by other-version" in err
    tune = ["tune", str(tmp_path / "s.csv"), "--scored", "--max-share", "frontier=0.5"]
    assert main([*tune, "--model", str(other)]) == 2


def test_progress_within_a_part_with_an_eta(  # type: ignore[no-untyped-def]
    clf, tmp_path: Path, capsys, monkeypatch
) -> None:
    """One part scored in this process reports every batch: rows, out of an estimate of the
    rows (the file's bytes over its mean line length), and the time left."""
    import re

    from tierpick.serving.scoring import run
    from tierpick.serving.scoring.options import Part

    monkeypatch.setattr(run, "PROGRESS_EVERY", 0.0)
    rows = _arena(500)
    src = tmp_path / "log.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    score_file(clf, src, tmp_path / "out.parquet", batch_size=50, progress=True)
    lines = [x.strip() for x in capsys.readouterr().err.split("\r") if x.strip()]
    done = [int(m.group(1).replace(",", "")) for x in lines if (m := re.match(r"([\d,]+) of", x))]
    assert len(done) >= 10 and done == sorted(done) and done[-1] == 500  # within the part
    assert all("ETA" in x and "rows/s" in x for x in lines)
    total = int(re.search(r"of ~([\d,]+)", lines[0]).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert 0.8 * 500 <= total <= 1.25 * 500  # the estimate, made before any row was read
    # Parquet: the estimate is the row groups' row count
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "log.parquet", row_group_size=128)
    part = Part(0, str(tmp_path / "log.parquet"), 1, 4, 0, "p")
    assert run.estimate_rows([part]) == 500 - 128
    # gzip: lines of the decompressed head per compressed byte; an empty file: none
    import gzip

    with gzip.open(tmp_path / "log.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "empty.jsonl").write_text("")
    whole = [Part(0, str(tmp_path / "log.jsonl.gz"), 0, -1, 1, "g")]
    assert 0.8 * 500 <= (run.estimate_rows(whole) or 0) <= 1.25 * 500
    assert run.estimate_rows([Part(0, str(tmp_path / "empty.jsonl"), 0, -1, 1, "e")]) == 0
