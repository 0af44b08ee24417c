"""The gRPC service on a real port: contract, bad input, health, reload, drain, load."""

import dataclasses
import json
import shutil
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from tests.serving.conftest import FOLLOW_UP_CHAT, HARD_REQUEST
from tierpick.serving._proto.tierpick.v1 import tierpick_pb2 as pb
from tierpick.serving.client import TierpickClient, policy, request
from tierpick.serving.lifecycle import ServerConfig
from tierpick.serving.service import SERVICE_NAME, create_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# batches of thousands of long prompts, larger than the default message size, for the drain
# tests: allowed here on purpose
BIG_BATCHES = ServerConfig(max_batch=4000, max_message_bytes=64 << 20, max_request_bytes=1 << 30)


@pytest.fixture(scope="module")
def model_copy(tiny_trained, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    dst = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(tiny_trained.model_dir, dst)
    return dst


@pytest.fixture(scope="module")
def app(model_copy: Path):  # type: ignore[no-untyped-def]
    app = create_server("127.0.0.1:0", str(model_copy), ServerConfig(max_batch=8))
    yield app
    app.shutdown(grace=1)


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    with TierpickClient(f"127.0.0.1:{app.port}", timeout=5) as c:
        c.wait_ready()
        yield c


def test_contract(client: TierpickClient) -> None:
    info = client.model_info()
    assert [t.name for t in info.tiers] == ["local", "mid", "frontier"]
    assert info.max_batch == 8 and info.model_version and info.max_prompt_chars > 0
    assert "test_student_apgr" in info.evaluation
    # the headline figures unless asked for all of them (a model records a few hundred)
    everything = client.model_info(with_evaluation=True).evaluation
    assert len(info.evaluation) <= 11 < len(everything)
    assert set(info.evaluation) <= set(everything)
    resp = client.classify("What is 2 + 2?", request_id="r-1")
    assert resp.tier in ("local", "mid", "frontier") and resp.request_id == "r-1"
    assert [s.tier for s in resp.scores] == ["local", "mid", "frontier"]
    assert all(0 < s.success_probability < 1 for s in resp.scores)
    assert resp.scores[2].price_output == 15.0
    assert resp.model_version == info.model_version
    # chat: the last user turn is classified, with the user turns before it after it
    chat = client.classify(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "What is 2 + 2?"},
        ]
    )
    read = client.classify("What is 2 + 2?\n\nhello")
    assert [s.success_probability for s in chat.scores] == pytest.approx(
        [s.success_probability for s in read.scores]
    )
    forced = client.classify("What is 2 + 2?", routing=policy(min_success=1.0))
    assert forced.tier == "frontier" and not forced.met_threshold
    cheap = client.classify("What is 2 + 2?", routing=policy(cost_weight=1e9))
    assert cheap.tier == "local"
    capped = client.classify("x", routing=policy(min_success=1.0, max_price=0.0))
    assert capped.tier == "local"
    batch = client.classify_batch(["a", "b", "What is 2 + 2?"], routing=policy(min_success=1.0))
    assert [r.tier for r in batch.responses] == ["frontier"] * 3
    assert batch.responses[2].scores[0].success_probability == pytest.approx(
        resp.scores[0].success_probability
    )
    # a long prompt is cut and classified, not rejected
    assert client.classify("word " * 200_000).tier


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (request(""), "prompt is empty"),
        (request("   \n "), "prompt is empty"),
        (request("\u200b\u200c\x00\ufeff"), "no text once normalized"),
        (request("x", routing=policy(cost_weight=float("inf"))), "cost_weight must be >= 0"),
        (request("x", routing=policy(min_success=1.5)), "min_success must be in [0, 1]"),
        (request("x", routing=policy(min_success=-0.1)), "min_success must be in [0, 1]"),
        (request("x", routing=policy(allowed_tiers=["gold"])), "unknown tier(s) ['gold']"),
        (request("x", routing=policy(cost_weight=-1)), "cost_weight must be >= 0"),
        (request("x", messages=[{"role": "user", "content": "y"}]), "not both"),
        (request(messages=[{"role": "system", "content": "y"}]), "no user message"),
    ],
)
def test_bad_requests_are_invalid_argument(
    client: TierpickClient, req: pb.ClassifyRequest, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Classify(req, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_batch_limit_and_bad_member(client: TierpickClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.classify_batch(["p"] * 9)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the maximum of 8" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.classify_batch(["fine", ""])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.classify_batch([]).responses == []


def test_health_and_reflection(client: TierpickClient) -> None:
    assert client.health_status() == SERVING
    assert client.health_status(SERVICE_NAME) == SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


def test_reflection_v1_lists_and_describes_the_service(client: TierpickClient) -> None:
    """v1, which grpcurl and most tools ask first, answers as v1alpha does: the services, and
    the file that defines each (the reflection services' own included)."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2 as r  # v1's messages, same wire format

    info = client.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=r.ServerReflectionRequest.SerializeToString,
        response_deserializer=r.ServerReflectionResponse.FromString,
    )
    asks = [
        r.ServerReflectionRequest(list_services=""),
        r.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        r.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
        r.ServerReflectionRequest(file_containing_symbol="tierpick.v1.NoSuchThing"),
    ]
    listed, mine, v1, missing = list(info(iter(asks), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.reflection.v1.ServerReflection"} <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in mine.file_descriptor_response.file_descriptor_proto
    ]
    assert "TierRouter" in [s.name for f in files for s in f.service]
    (v1_file,) = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in v1.file_descriptor_response.file_descriptor_proto
    ]
    assert v1_file.package == "grpc.reflection.v1"
    assert v1_file.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_concurrent_load_has_no_errors(client: TierpickClient) -> None:
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(250)]

    def worker(k: int) -> int:
        errors = 0
        with TierpickClient(client.channel._channel.target().decode(), timeout=10) as c:  # type: ignore[attr-defined]
            for p in prompts:
                try:
                    c.classify(p, request_id=str(k))
                except grpc.RpcError:
                    errors += 1
        return errors

    with futures.ThreadPoolExecutor(16) as pool:
        errors = sum(pool.map(worker, range(16)))
    assert errors == 0  # 16 clients x 250 calls


def test_hot_reload_good_and_bad_artifacts_under_load(
    app,
    client: TierpickClient,  # type: ignore[no-untyped-def]
    model_copy: Path,
) -> None:
    before = client.model_info().model_version
    stop = threading.Event()
    failures: list[str] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                client.classify("keep serving while reloading", timeout=5)
            except grpc.RpcError as exc:
                failures.append(str(exc.code()))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        # a tampered graph: refused, the old model keeps serving
        onnx = model_copy / "student.onnx"
        good = onnx.read_bytes()
        onnx.write_bytes(good + b"\0")
        assert app.holder.reload() is False
        assert client.model_info().model_version == before
        onnx.write_bytes(good)
        # a good new version (same graph, new version string and checksums): swapped in
        manifest = json.loads((model_copy / "manifest.json").read_text())
        (model_copy / "manifest.json").write_text(
            json.dumps({**manifest, "model_version": "v-next"})
        )
        assert app.holder.reload() is True
        assert client.model_info().model_version == "v-next"
    finally:
        stop.set()
        for t in threads:
            t.join()
        (model_copy / "manifest.json").write_text(json.dumps(manifest))
        app.holder.reload()
    assert failures == []
    text = _metrics_text(app)
    assert 'tierpick_reloads_total{outcome="refused"}' in text
    assert 'tierpick_reloads_total{outcome="ok"}' in text


def test_watch_reloads_on_manifest_change(model_copy: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(model_copy, model)
    app = create_server("127.0.0.1:0", str(model), ServerConfig(watch_seconds=0.05))
    try:
        with TierpickClient(f"127.0.0.1:{app.port}", timeout=5) as c:
            manifest = json.loads((model / "manifest.json").read_text())
            (model / "manifest.json").write_text(json.dumps({**manifest, "model_version": "w2"}))
            deadline = time.monotonic() + 10
            while c.model_info().model_version != "w2":
                assert time.monotonic() < deadline, "watch did not reload"
                time.sleep(0.02)
    finally:
        app.shutdown(grace=1)


def test_graceful_shutdown_finishes_in_flight(model_copy: Path) -> None:
    app = create_server("127.0.0.1:0", str(model_copy), BIG_BATCHES)
    c = TierpickClient(
        f"127.0.0.1:{app.port}", timeout=60, options=[("grpc.max_send_message_length", 64 << 20)]
    )
    c.wait_ready()
    # a batch long enough (about a second) to still be running when the drain starts
    big = pb.ClassifyBatchRequest(requests=[request(f"{i} " + "word " * 2000) for i in range(4000)])
    call = c.stub.ClassifyBatch.future(big, timeout=60)
    deadline = time.monotonic() + 30
    while app.calls.open < 1:  # poll until the server is handling it
        assert time.monotonic() < deadline and not call.done(), "the batch never arrived"
        time.sleep(0.001)
    stopping = threading.Thread(target=app.shutdown, kwargs={"grace": 30})
    stopping.start()
    while not app.calls.draining:
        assert time.monotonic() < deadline and stopping.is_alive(), "the stop never began"
        time.sleep(0.001)
    # a call that arrives while the batch drains is refused, and says why
    with pytest.raises(grpc.RpcError) as info:
        c.classify("during the drain", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopping" in (info.value.details() or "")
    assert not call.done()  # the refusal came while the batch was still being answered
    assert len(call.result().responses) == 4000  # finished, not cut off
    stopping.join(30)
    with pytest.raises(grpc.RpcError) as info:
        c.classify("after stop", timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    c.close()


@pytest.mark.slow  # ten stops, each during a 30,000-prompt answer (about 30 s)
def test_a_stop_during_a_large_answer_delivers_it(model_copy: Path) -> None:
    """gRPC closes a stopping server's connection as soon as its last call ends, and that close
    can reset the connection before the client has read a large answer: before the app drained
    its own calls first, about 1 stop in 18 during a 3.7 MB answer left the client with
    UNAVAILABLE instead."""
    outcomes = []
    for _ in range(10):
        app = create_server(
            "127.0.0.1:0",
            str(model_copy),
            dataclasses.replace(BIG_BATCHES, max_batch=30000, drain_timeout=60),
        )
        # a 30,000-prompt answer (each tier's utility and the basis included) is over the 4 MB
        # a gRPC client receives by default
        with TierpickClient(
            f"127.0.0.1:{app.port}",
            timeout=60,
            options=[("grpc.max_receive_message_length", 64 << 20)],
        ) as c:
            c.wait_ready()
            big = pb.ClassifyBatchRequest(
                requests=[request(f"{i} " + "word " * 100) for i in range(30000)]
            )
            call = c.stub.ClassifyBatch.future(big, timeout=60)
            while app.calls.open < 1:
                assert not call.done(), call.exception()
                time.sleep(0.001)
            app.shutdown()
            try:
                outcomes.append(len(call.result().responses))
            except grpc.RpcError as exc:
                outcomes.append(exc.code())
    assert outcomes == [30000] * 10


def test_resource_exhausted_over_concurrency_limit(model_copy: Path) -> None:
    app = create_server("127.0.0.1:0", str(model_copy), ServerConfig(max_concurrency=1, workers=4))
    try:
        with TierpickClient(f"127.0.0.1:{app.port}", timeout=30) as c:
            c.wait_ready()
            big = pb.ClassifyBatchRequest(requests=[request("word " * 5000)] * 256)
            calls = [c.stub.ClassifyBatch.future(big, timeout=30) for _ in range(4)]
            codes = []
            for f in calls:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            assert grpc.StatusCode.OK in codes
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        # every refusal is counted (they once never reached the handled counter)
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert _handled(app, "ClassifyBatch", "RESOURCE_EXHAUSTED") == refused
    finally:
        app.shutdown(grace=1)


def _metrics_text(app) -> str:  # type: ignore[no-untyped-def]
    from prometheus_client import generate_latest

    return generate_latest(app.metrics.registry).decode()


def _handled(app, method: str, code: str) -> float:  # type: ignore[no-untyped-def]
    """``grpc_server_handled_total`` of one TierRouter method and status code."""
    labels = {
        "grpc_type": "unary",
        "grpc_service": SERVICE_NAME,
        "grpc_method": method,
        "grpc_code": code,
    }
    value = app.metrics.registry.get_sample_value("grpc_server_handled_total", labels)
    assert value is not None, labels
    return float(value)


def test_metrics_count_requests_and_tiers(app, client: TierpickClient) -> None:  # type: ignore[no-untyped-def]
    ok, bad = _handled(app, "Classify", "OK"), _handled(app, "Classify", "INVALID_ARGUMENT")
    health = client.health_status()
    client.classify("count me")
    with pytest.raises(grpc.RpcError):
        client.classify("")
    assert _handled(app, "Classify", "OK") == ok + 1
    assert _handled(app, "Classify", "INVALID_ARGUMENT") == bad + 1
    assert (
        health is not None and _handled(app, "GetModelInfo", "UNAVAILABLE") == 0
    )  # at 0 from start
    text = _metrics_text(app)
    assert "grpc.health" not in text  # health checks are not counted with TierRouter's calls
    assert "tierpick_routed_total{tier=" in text
    assert "grpc_server_handling_seconds_bucket" in text and "grpc_server_started_total" in text
    assert "tierpick_model_info{name=" in text
    assert "process_resident_memory_bytes" in text and "python_gc_objects_collected_total" in text
    port = app.metrics.serve_http(0)
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert b"grpc_server_handled_total" in r.read()


def _self_signed(tmp_path: Path) -> tuple[bytes, bytes]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem_cert, pem_key


def test_tls(model_copy: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    app = create_server("127.0.0.1:0", str(model_copy), ServerConfig(), tls=(cert, key))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        with TierpickClient(f"localhost:{app.port}", timeout=5, credentials=creds) as c:
            c.wait_ready()
            assert c.classify("over TLS").tier in ("local", "mid", "frontier")
        with (
            TierpickClient(f"127.0.0.1:{app.port}", timeout=2) as plain,
            pytest.raises(grpc.RpcError),
        ):
            plain.classify("plaintext to a TLS port")
    finally:
        app.shutdown(grace=1)


def test_health_goes_not_serving_before_the_server_stops(model_copy: Path) -> None:
    app = create_server("127.0.0.1:0", str(model_copy), ServerConfig(drain_seconds=1.0))
    with TierpickClient(f"127.0.0.1:{app.port}", timeout=5) as c:
        c.wait_ready()
        stopper = threading.Thread(target=app.shutdown)
        stopper.start()
        deadline = time.monotonic() + 10
        while c.health_status() != NOT_SERVING:
            assert time.monotonic() < deadline, "health never went NOT_SERVING"
        assert c.health_status(SERVICE_NAME) == NOT_SERVING
        assert c.classify("still answered while draining").tier  # calls still served
        stopper.join()
        with pytest.raises(grpc.RpcError):
            c.health_status()


# --------------------------------------------------------------------------- hostile clients


def test_stalled_streams_hold_no_handler_and_health_stays_answerable(model_copy: Path) -> None:
    """HEADERS without DATA on many streams (the requests never arrive): every other client's
    Classify and health check is still answered at once."""
    from tests.serving.h2raw import StalledStreams

    config = ServerConfig(workers=2, max_concurrency=8, max_streams_per_connection=32)
    app = create_server("127.0.0.1:0", str(model_copy), config)
    held = []
    try:
        for _ in range(8):  # 8 connections x 32 streams: far over workers and concurrency
            held.append(
                StalledStreams("127.0.0.1", app.port, f"/{SERVICE_NAME}/Classify", streams=32)
            )
        deadline = time.monotonic() + 5
        while app.calls.open != 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with TierpickClient(f"127.0.0.1:{app.port}", timeout=5) as c:
            for _ in range(20):
                t0 = time.monotonic()
                assert c.classify("still answered?").tier
                assert c.health_status() == SERVING
                assert time.monotonic() - t0 < 2.0
            batch = c.classify_batch(["a", "b"])
            assert len(batch.responses) == 2
        # one connection cannot open more than its stream limit: the extra streams are refused
        extra = StalledStreams("127.0.0.1", app.port, f"/{SERVICE_NAME}/Classify", streams=40)
        held.append(extra)
        assert app.calls.open == 0  # stalled calls hold no handler
    finally:
        for h in held:
            h.close()
        app.shutdown(grace=1)


def test_corrupt_messages_are_invalid_argument_and_counted(app, client: TierpickClient) -> None:  # type: ignore[no-untyped-def]
    raw = client.channel.unary_unary(f"/{SERVICE_NAME}/Classify")
    for body in (
        b"\x0a\x02\xff\xfe",  # prompt = invalid UTF-8
        b"\x0a\x7fshort",  # a length longer than the message
        b"\xff\xff\xff\xff\xff",  # not protobuf at all
    ):
        with pytest.raises(grpc.RpcError) as info:
            raw(body, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, body
        assert "not a valid Classify message" in info.value.details()
    assert _handled(app, "Classify", "INVALID_ARGUMENT") >= 3
    assert client.classify("the server is fine").tier


def test_watch_retries_a_deploy_copied_manifest_first(model_copy: Path, tmp_path: Path) -> None:
    """A deploy that copies manifest.json before student.onnx is refused while inconsistent and
    picked up when the graph arrives, with no SIGHUP."""
    model = tmp_path / "m"
    shutil.copytree(model_copy, model)
    app = create_server("127.0.0.1:0", str(model), ServerConfig(watch_seconds=0.05))
    try:
        with TierpickClient(f"127.0.0.1:{app.port}", timeout=5) as c:
            before = c.model_info().model_version
            graph = (model / "student.onnx").read_bytes()
            new_graph = graph + b""  # the same graph under a new checksum entry below
            manifest = json.loads((model / "manifest.json").read_text())
            import hashlib

            # step 1: the new manifest lands first; it names a graph that is not there yet
            (model / "student.onnx").rename(model / "old.onnx")
            (model / "manifest.json").write_text(
                json.dumps({**manifest, "model_version": "deployed"})
            )
            deadline = time.monotonic() + 5
            while app.holder._pending is None:
                assert time.monotonic() < deadline, "the inconsistent directory was not noticed"
                time.sleep(0.02)
            assert c.model_info().model_version == before  # the old model keeps serving
            time.sleep(0.3)  # several watch checks: still refused, still serving
            assert c.model_info().model_version == before
            # step 2: the graph arrives; the next checks pick the deploy up
            (model / "student.onnx").write_bytes(new_graph)
            assert hashlib.sha256(new_graph).hexdigest() == manifest["files"]["student.onnx"]
            deadline = time.monotonic() + 10
            while c.model_info().model_version != "deployed":
                assert time.monotonic() < deadline, "the consistent deploy was never picked up"
                time.sleep(0.02)
        text = _metrics_text(app)
        refused = next(
            ln
            for ln in text.splitlines()
            if ln.startswith('tierpick_reloads_total{outcome="refused"}')
        )
        assert float(refused.split()[-1]) == 1.0  # retries of the same refusal are not recounted
    finally:
        app.shutdown(grace=1)


def _ca_signed(tmp_path: Path) -> dict[str, bytes]:
    """A CA, a server certificate for localhost and a client certificate, both signed by it."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("tierpick test CA"))
        .issuer_name(name("tierpick test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": ca.public_bytes(serialization.Encoding.PEM)}
    for who, san in (("server", "localhost"), ("client", "a-gateway")):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(san))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        out[f"{who}_cert"] = cert.public_bytes(serialization.Encoding.PEM)
        out[f"{who}_key"] = pem_key(key)
    return out


def test_mutual_tls_requires_a_client_certificate(model_copy: Path, tmp_path: Path) -> None:
    from tierpick.serving.lifecycle import TLS

    pki = _ca_signed(tmp_path)
    tls = TLS(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    app = create_server("127.0.0.1:0", str(model_copy), ServerConfig(), tls=tls)
    try:
        good = grpc.ssl_channel_credentials(pki["ca"], pki["client_key"], pki["client_cert"])
        with TierpickClient(f"localhost:{app.port}", timeout=5, credentials=good) as c:
            assert c.classify("with a client certificate").tier
        anonymous = grpc.ssl_channel_credentials(root_certificates=pki["ca"])
        with (
            TierpickClient(f"localhost:{app.port}", timeout=3, credentials=anonymous) as c,
            pytest.raises(grpc.RpcError) as info,
        ):
            c.classify("without one")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        app.shutdown(grace=1)


def test_serve_command_refuses_bad_tls_and_busy_ports_in_one_line(
    model_copy: Path, tmp_path: Path
) -> None:
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO

    a, b = _self_signed(tmp_path), _self_signed(tmp_path)
    (tmp_path / "cert.pem").write_bytes(a[0])
    (tmp_path / "other-key.pem").write_bytes(b[1])
    base = [sys.executable, "-m", "tierpick.cli", "serve", "--model", str(model_copy)]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        runs = {
            "mismatched key": [
                *base,
                "--port",
                "0",
                "--tls-cert",
                str(tmp_path / "cert.pem"),
                "--tls-key",
                str(tmp_path / "other-key.pem"),
            ],
            "port in use": [*base, "--port", str(port)],
        }
        for what, cmd in runs.items():
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
            assert done.returncode == 2, what
            last = done.stderr.strip().splitlines()[-1]
            assert last.startswith("tierpick: error: "), (what, done.stderr)
            assert "Traceback" not in done.stderr, what
            assert ("does not match" in last) if what == "mismatched key" else ("in use" in last)


@pytest.mark.slow  # two 4,000-prompt batches of long prompts (about 35 s)
def test_drain_timeout_is_the_grace_in_flight_calls_get(model_copy: Path) -> None:
    """A call still running when the server stops finishes within the drain timeout, and is
    cancelled past it."""
    results = {}
    # the generous drain first: the batch the short drain cancels goes on computing in its
    # worker thread for a while, and would compete with the next server's batch
    for drain in (60.0, 0.05):
        app = create_server(
            "127.0.0.1:0", str(model_copy), dataclasses.replace(BIG_BATCHES, drain_timeout=drain)
        )
        c = TierpickClient(
            f"127.0.0.1:{app.port}",
            timeout=60,
            options=[("grpc.max_send_message_length", 64 << 20)],
        )
        c.wait_ready()
        big = pb.ClassifyBatchRequest(
            requests=[request(f"{i} " + "word " * 2000) for i in range(4000)]
        )
        call = c.stub.ClassifyBatch.future(big, timeout=60)
        deadline = time.monotonic() + 30
        while app.calls.open < 1:
            assert time.monotonic() < deadline and not call.done(), "the batch never arrived"
            time.sleep(0.001)
        app.shutdown()  # the configured drain timeout
        try:
            results[drain] = len(call.result().responses)
        except grpc.RpcError as exc:
            results[drain] = exc.code()
        c.close()
    assert results[60.0] == 4000
    assert results[0.05] in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


def test_a_huge_tag_dense_request_does_not_hold_up_other_calls(model_copy: Path) -> None:
    """60 MB of agent-harness tags cost 3.6 s on the event loop before: every other call and
    health check waited. Now a turn is read up to text.MAX_TURN_CHARS and a large request is
    worked on a thread: health checks sent meanwhile are answered within their deadline."""
    from tierpick.classifier.text import MAX_TURN_CHARS, last_user_text

    block = "<system-reminder>x</system-reminder>"
    big = block * (20_000_000 // len(block)) + "What is the capital of France?"
    # the text work reads the first MAX_TURN_CHARS of a turn, whatever follows
    head = big[:MAX_TURN_CHARS]
    assert last_user_text([{"role": "user", "content": big}]) == last_user_text(
        [{"role": "user", "content": head}]
    )
    app = create_server("127.0.0.1:0", str(model_copy), BIG_BATCHES)  # 20 MB allowed
    try:
        with TierpickClient(f"127.0.0.1:{app.port}", timeout=60) as c:
            c.wait_ready()
            pool = futures.ThreadPoolExecutor(1)
            large = pool.submit(c.classify, messages=[{"role": "user", "content": big}])
            answered = 0
            while not large.done():
                resp = c.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
                answered += 1
            out = large.result()
            pool.shutdown()
            assert out.tier in ("local", "mid", "frontier") and answered >= 0
    finally:
        app.shutdown(0)


def test_many_concurrent_calls_on_one_asyncio_channel_are_all_answered(model_copy: Path) -> None:
    """A standard client's burst on one channel: 32 streams per connection refused 3 to 30
    of 64 calls (UNAVAILABLE) before; the stream limit is now above the concurrency limit."""
    import asyncio

    from tierpick.serving.client import AsyncTierpickClient

    app = create_server("127.0.0.1:0", str(model_copy), ServerConfig())
    try:

        async def burst() -> list[str]:
            client = AsyncTierpickClient(f"127.0.0.1:{app.port}", 30.0)
            try:
                answers = await asyncio.gather(
                    *(client.classify(f"What is {i} + {i}?") for i in range(200)),
                    return_exceptions=True,
                )
            finally:
                await client.close()
            return [a.tier if hasattr(a, "tier") else repr(a) for a in answers]

        tiers = asyncio.run(burst())
        assert all(t in ("local", "mid", "frontier") for t in tiers), set(tiers)
    finally:
        app.shutdown(0)


def test_request_bytes_past_the_budget_are_refused_before_parsing(model_copy: Path) -> None:
    prompt = "Summarize this document. " * 2_000  # 50 KB
    app = create_server(
        "127.0.0.1:0",
        str(model_copy),
        ServerConfig(max_request_bytes=2 << 20, max_batch=256),
    )
    try:
        with TierpickClient(f"127.0.0.1:{app.port}", timeout=60) as c:
            c.wait_ready()
            # one batch larger than the whole budget: refused, unparsed, and said why
            with pytest.raises(grpc.RpcError) as err:
                c.classify_batch([prompt] * 60)  # ~3 MB
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "does not fit the 2097152 bytes" in (err.value.details() or "")
            # concurrent batches within the budget one at a time: some wait their turn as
            # RESOURCE_EXHAUSTED, none is lost silently, and the budget comes back
            with futures.ThreadPoolExecutor(8) as pool:
                calls = [pool.submit(c.classify_batch, [prompt] * 30) for _ in range(8)]
                codes = []
                for f in calls:
                    try:
                        f.result()
                        codes.append("OK")
                    except grpc.RpcError as exc:
                        codes.append(exc.code().name)
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and "OK" in codes
            assert c.classify_batch([prompt] * 30).responses  # nothing is held after
            assert app.server is not None
    finally:
        app.shutdown(0)


def test_an_open_health_watch_does_not_hold_the_stop(model_copy: Path) -> None:
    """A Watch stream is not one of the service's calls: it used to keep the server stopping
    for the whole drain timeout (27 s against 1.7 s)."""
    app = create_server("127.0.0.1:0", str(model_copy), ServerConfig(drain_timeout=30.0))
    c = TierpickClient(f"127.0.0.1:{app.port}", timeout=60)
    c.wait_ready()
    stream = c.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
    assert next(stream).status == SERVING
    start = time.monotonic()
    app.shutdown()
    took = time.monotonic() - start
    c.close()
    assert took < 10.0, took  # the drain timeout is 30 s


def test_the_answer_says_why_this_tier(client: TierpickClient) -> None:
    """Rule, knob, each allowed tier's utility and whether the prompt was cut, over the wire."""
    r = client.classify(
        "What is 2 + 2?", routing=policy(cost_weight=0.5, allowed_tiers=["local", "mid"])
    )
    assert (r.basis.rule, r.basis.cost_weight, r.basis.prompt_cut) == ("utility", 0.5, False)
    costs = {
        "local": 0.0,
        "mid": (0.5 + 1.5) / 20.0,
    }  # normalized: (in + out) price over the dearest
    for s in r.scores:
        if s.tier in costs:
            assert s.allowed and s.utility == pytest.approx(
                s.success_probability - 0.5 * costs[s.tier]
            )
        else:
            assert not s.allowed and s.utility == 0.0
    assert r.tier == max((s for s in r.scores if s.allowed), key=lambda s: s.utility).tier
    long = client.classify("Summarize this. " + "lorem ipsum dolor sit amet " * 3000)
    assert long.basis.prompt_cut and long.basis.rule == "utility"
    assert client.classify("x", routing=policy(min_success=0.7)).basis.rule == "threshold"


def test_a_follow_up_is_classified_with_the_turns_it_continues(
    client: TierpickClient, model_copy: Path
) -> None:
    """The served model reads a chat's last user turn and the user turns before it (the tiers
    this gives with the shipped model are checked at the gateway and the plug-in)."""
    from tierpick import classifier

    chat = FOLLOW_UP_CHAT
    clf = classifier.load(str(model_copy))
    expected = clf.predict_proba([clf.chat_text(chat), "ok continue"])
    for messages, want in ((chat, expected[0]), (chat[-1:], expected[1])):
        got = [s.success_probability for s in client.classify(messages=messages).scores]
        assert got == pytest.approx(want.tolist(), abs=1e-6)
    assert clf.chat_text(chat) == "ok continue\n\n" + HARD_REQUEST
    assert not np.allclose(expected[0], expected[1], atol=1e-3)
