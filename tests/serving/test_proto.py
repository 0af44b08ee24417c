"""The committed gRPC stubs are exactly what `make proto` generates from proto/."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

STUBS = ("tierpick_pb2.py", "tierpick_pb2.pyi", "tierpick_pb2_grpc.py")


def test_stubs_match_the_proto(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-Itierpick/serving/_proto={REPO / 'proto'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            "tierpick/serving/_proto/tierpick/v1/tierpick.proto",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for name in STUBS:
        fresh = (
            tmp_path / "tierpick" / "serving" / "_proto" / "tierpick" / "v1" / name
        ).read_text()
        committed = (REPO / "serving" / "_proto" / "tierpick" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"
