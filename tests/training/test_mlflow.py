"""MLflow tracking and the registry against a real `mlflow server` process (sqlite backend)
started by the test, and against a plain sqlite store with no server."""

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write_tiny_config
from tierpick import classifier
from tierpick.cli import main


@pytest.fixture(autouse=True)
def _isolated_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri/set_experiment export env vars; keep them inside each test."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(exe),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            log.close()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def _train(cfg: Path, out: Path, uri: str, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(
        [
            "train",
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--workdir",
            str(out) + "-work",
            "--tracking-uri",
            uri,
            "--register-name",
            "tiny-router",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "registered tiny-router version" in text
    return text.rsplit("version ", 1)[1].split()[0]


@pytest.mark.slow  # an MLflow server process
def test_train_register_promote_against_server(
    mlflow_server: str,
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server, mlflow_server)
    v1 = _train(
        write_tiny_config(tmp_path, tiny_data, seed=0), tmp_path / "a", mlflow_server, capsys
    )
    assert client.get_model_version_by_alias("tiny-router", "challenger").version == v1
    run = client.get_run(client.get_model_version("tiny-router", v1).tags["run_id"])
    assert run.data.params["data_fingerprint"] and run.data.params["train.seed"] == "0"
    assert "test/student/apgr" in run.data.metrics  # grouped in MLflow
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert "report/report.md" in arts and "report/routing_test.png" in arts

    # no champion yet: the challenger is promoted
    assert main(["promote", "--name", "tiny-router", "--tracking-uri", mlflow_server]) == 0
    assert "promoted version 1 to champion" in capsys.readouterr().out
    assert client.get_model_version_by_alias("tiny-router", "champion").version == v1

    v2 = _train(
        write_tiny_config(tmp_path, tiny_data, seed=1), tmp_path / "b", mlflow_server, capsys
    )
    new = float(client.get_model_version("tiny-router", v2).tags["test_student_apgr"])
    old = float(client.get_model_version("tiny-router", v1).tags["test_student_apgr"])
    code = main(["promote", "--name", "tiny-router", "--tracking-uri", mlflow_server])
    out = capsys.readouterr().out
    assert "test_student_apgr" in out and "champion v1" in out and "candidate v2" in out
    if new >= old:
        assert code == 0 and "promoted version 2" in out
    else:
        assert code == 1 and "refused" in out
        assert client.get_model_version_by_alias("tiny-router", "champion").version == v1
        assert (
            main(["promote", "--name", "tiny-router", "--force", "--tracking-uri", mlflow_server])
            == 0
        )
        assert "(forced)" in capsys.readouterr().out
    assert client.get_model_version_by_alias("tiny-router", "champion").version == v2
    # promoting the champion again holds already: success, said so (a deploy script reruns it)
    assert main(["promote", "--name", "tiny-router", "--version", v2, "--tracking-uri",
                 mlflow_server]) == 0  # fmt: skip
    assert "already the champion: nothing to do" in capsys.readouterr().out

    # the runtime loads a registered model by alias
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    clf = classifier.load("models:/tiny-router@champion")
    assert clf.tiers == ("local", "mid", "frontier")
    assert clf.predict_proba(["What is 2 + 2?"]).shape == (1, 3)
    # and MLflow's own pyfunc API serves it too: probabilities and the routed tier
    import mlflow.pyfunc

    frame = mlflow.pyfunc.load_model("models:/tiny-router@champion").predict(["What is 2 + 2?"])
    assert list(frame.columns) == ["p_local", "p_mid", "p_frontier", "tier"]
    assert frame["p_mid"][0] == pytest.approx(float(clf.predict_proba(["What is 2 + 2?"])[0, 1]))
    assert frame["tier"][0] == clf.route(["What is 2 + 2?"])[0].tier

    # an evaluation of a registered version is linked both ways: the run names the version,
    # the version names the run (one tag per evaluated dataset)
    cfg = write_tiny_config(tmp_path, tiny_data, seed=0)
    uri = "models:/tiny-router@champion"
    args = ["evaluate", "--model", uri, "--config", str(cfg), "--out", str(tmp_path / "ev")]
    assert main([*args, "--tracking-uri", mlflow_server]) == 0
    run_id = capsys.readouterr().out.rsplit("MLflow run ", 1)[1].split()[0]
    run = client.get_run(run_id)
    assert run.data.tags["registered_model"] == "tiny-router"
    assert run.data.tags["registered_version"] == v2
    assert run.info.run_name.startswith("evaluate ") and "test/student/apgr" in run.data.metrics
    tags = client.get_model_version("tiny-router", v2).tags
    assert run_id in {v for k, v in tags.items() if k.startswith("evaluate_run_")}

    # `mlflow models serve` builds a fresh virtualenv from the model's requirements (tierpick is
    # not installed there: its runtime goes with the model) and answers as the runtime does
    _serve_in_fresh_env(mlflow_server, uri, clf, tmp_path)


def _serve_in_fresh_env(
    tracking: str, uri: str, clf: classifier.TierClassifier, tmp_path: Path
) -> None:
    import json
    import os
    import signal

    port = _free_port()
    bin_dir = Path(sys.executable).parent
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "bin"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking,
        "PATH": f"{bin_dir}:{pyenv}:{os.environ.get('PATH', '')}",
    }
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                *(str(bin_dir / "mlflow"), "models", "serve", "-m", uri, "-p", str(port)),
                *("--env-manager", "virtualenv"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 900  # the first run installs the environment
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(2)
        prompts = ["What is 2 + 2?", "Prove that there are infinitely many primes."]
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": prompts}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            got = json.loads(resp.read())["predictions"]
        expected = clf.predict_proba(prompts)
        for row, p, d in zip(got, expected, clf.route(prompts), strict=True):
            assert [row[f"p_{t}"] for t in clf.tiers] == pytest.approx(p.tolist(), abs=1e-5)
            assert row["tier"] == d.tier
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_sqlite_store_without_server(
    tiny_config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(
        [
            "train",
            "--config",
            str(tiny_config),
            "--out",
            str(tmp_path / "m"),
            "--workdir",
            str(tmp_path / "w"),
        ]
    )
    assert code == 0
    assert "registered tierpick-tiny version 1 as @challenger" in capsys.readouterr().out
    assert (tmp_path / "mlflow.db").is_file()  # the default store: a sqlite file in the cwd
    assert (tmp_path / "m" / "REPORT.md").is_file()
