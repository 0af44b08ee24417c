"""In-process latency benchmark: tokenization alone, the student single-prompt and in batches,
optionally the teacher, on real prompts; every figure is measured in the same run and compared
with the tokenization floor."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tierpick.classifier.files import read_prompts
from tierpick.classifier.table import format_table


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    a = np.array(samples) * 1e6
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.mean())


def _say(message: str) -> None:
    """A progress line on stderr (the tables go to stdout): long benches said nothing for
    minutes."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _added_latency(
    call: Callable[[int, int], tuple[float, str]],
    names: list[str],
    ref: int,
    calls: int,
    warmup: int,
    outcome: str,
    title: str,
) -> str:
    """Time paths side by side: ``call(k, i)`` sends request ``i`` down path ``k`` and returns
    its seconds and outcome. After ``warmup`` rounds, ``calls`` rounds call every path in turn,
    the order reversed every other round, so all paths see the same machine state; the table
    gives each path's p50/p99, what it adds over path ``ref``, and its outcomes counted."""
    _say(f"{title}: warm-up, then {calls} rounds over {len(names)} paths")
    for i in range(warmup):  # connections, caches, channels
        for k in range(len(names)):
            call(k, i)
    samples: list[list[float]] = [[] for _ in names]
    outcomes: list[dict[str, int]] = [{} for _ in names]
    order = list(range(len(names)))
    for i in range(calls):
        if calls >= 10 and i % (calls // 10) == 0 and i:
            _say(f"{i} of {calls} rounds")
        for k in order if i % 2 == 0 else order[::-1]:
            dt, seen = call(k, i)
            samples[k].append(dt)
            outcomes[k][seen] = outcomes[k].get(seen, 0) + 1
    p = [_percentiles(s) for s in samples]
    rows = [
        [
            names[k],
            p[k][0],
            p[k][1],
            p[k][0] - p[ref][0],
            p[k][1] - p[ref][1],
            ", ".join(f"{s} {n}" for s, n in sorted(outcomes[k].items())),
        ]
        for k in range(len(names))
    ]
    headers = ["path", "p50 us", "p99 us", "p50 added us", "p99 added us", outcome]
    return format_table(headers, rows, title) + "\n"


def run_inprocess_bench(
    model: str | None,
    prompts_path: Path,
    repeat: int = 3,
    teacher: str | None = None,
    adapted: str | None = None,
) -> str:
    from tierpick import classifier

    clf = classifier.load(model)
    prompts = read_prompts(prompts_path)
    clf.predict_proba(prompts[:8])  # warm-up

    def timed(fn: object) -> list[float]:
        out = []
        for _ in range(repeat):
            for p in prompts:
                t0 = time.perf_counter()
                fn(p)  # type: ignore[operator]
                out.append(time.perf_counter() - t0)
        return out

    rows = []
    lib_s = timed(lambda p: clf.token_ids([p], fast_path=False))
    tok_p50 = _percentiles(lib_s)[0]
    rows.append(["tokenize, tokenizers library only (reference)", *_percentiles(lib_s), 1.0])
    tok_s = timed(lambda p: clf.encode([p]))
    rows.append(
        [
            "tokenize as served (fast path, to arrays)",
            *_percentiles(tok_s),
            _percentiles(tok_s)[0] / tok_p50,
        ]
    )
    full = timed(lambda p: clf.predict_proba([p]))
    rows.append(
        ["student predict_proba, 1 prompt", *_percentiles(full), _percentiles(full)[0] / tok_p50]
    )
    route = timed(lambda p: clf.route([p]))
    rows.append(["student route, 1 prompt", *_percentiles(route), _percentiles(route)[0] / tok_p50])
    if adapted:
        rows += _adapted_rows(clf, classifier.load(adapted), prompts, repeat, tok_p50)
    if teacher:
        import onnxruntime as ort

        sess = ort.InferenceSession(teacher, providers=["CPUExecutionProvider"])

        def run_teacher(p: str) -> None:
            ids, mask = clf.encode([p])
            sess.run(None, {"input_ids": ids[:, :128], "attention_mask": mask[:, :128]})

        t = timed(run_teacher)
        rows.append(
            [
                "teacher ONNX, 1 prompt (128 tokens max)",
                *_percentiles(t),
                _percentiles(t)[0] / tok_p50,
            ]
        )
    table = format_table(
        ["what", "p50 us", "p99 us", "mean us", "p50 / reference p50"],
        rows,
        f"In-process latency on {len(prompts)} real prompts x {repeat} (model {clf.version})",
    )
    batch_rows = []
    ring = prompts * 3
    for size in (1, 32, 256, 1024):
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 1.0:
            start = n % len(prompts)  # a different slice of the real prompts every call
            clf.predict_proba(ring[start : start + size])
            n += size
        batch_rows.append([size, n / (time.perf_counter() - t0)])
    table2 = format_table(
        ["batch size", "prompts/s"],
        batch_rows,
        "Batch throughput (1 s each, cycling through the prompts)",
    )
    return table + "\n\n" + table2 + "\n"


def _adapted_rows(
    parent: Any, adapted: Any, prompts: list[str], repeat: int, tok_p50: float
) -> list[list[Any]]:
    """The parent and an adapted model's predict_proba, timed prompt by prompt in alternation
    (the order flipped every pass) so both see the same machine; the adapted row's ratio is to
    the parent's p50 measured in the same loop."""
    for m in (parent, adapted):
        m.predict_proba(prompts[:8])  # warm-up
    times: dict[int, list[float]] = {0: [], 1: []}
    models = (parent, adapted)
    for r in range(repeat):
        for p in prompts:
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                t0 = time.perf_counter()
                models[i].predict_proba([p])
                times[i].append(time.perf_counter() - t0)
    p0 = _percentiles(times[0])[0]
    lineage = adapted.manifest.lineage
    what = f"{lineage.get('method', '?')} on {lineage.get('prompts', '?')} outcomes"
    return [
        [
            "parent predict_proba, alternated with the adapted",
            *_percentiles(times[0]),
            p0 / tok_p50,
        ],
        [
            f"adapted predict_proba ({what}); last column: / parent p50",
            *_percentiles(times[1]),
            _percentiles(times[1])[0] / p0,
        ],
    ]


def run_grpc_bench(
    model: str | None, prompts_path: Path, calls: int = 2000, target: str | None = None
) -> str:
    """Classify vs GetModelInfo latency against a real server in its own process (or ``target``),
    interleaved call by call so both see the same machine state, then a concurrency sweep."""

    from tierpick.serving.client import TierpickClient

    prompts = read_prompts(prompts_path)
    proc = None
    if target is None:
        cmd = [sys.executable, "-m", "tierpick.cli", "serve", "--port", "0", "--watch", "0"]
        if model:
            cmd += ["--model", model]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "serving on" not in line:
            proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        target = line.split("serving on ", 1)[1].split()[0]
    try:
        with TierpickClient(target, timeout=10) as client:
            client.wait_ready()
            _say(f"server at {target}: {calls} Classify and GetModelInfo calls, interleaved")
            for p in prompts[:200]:  # warm-up
                client.classify(p)
                client.model_info()
            cls_t, info_t = [], []
            for i in range(calls):
                p = prompts[i % len(prompts)]
                t0 = time.perf_counter()
                client.classify(p)
                t1 = time.perf_counter()
                client.model_info()
                t2 = time.perf_counter()
                cls_t.append(t1 - t0)
                info_t.append(t2 - t1)
            c50, c99, cm = _percentiles(cls_t)
            i50, i99, im = _percentiles(info_t)
            rows = [
                ["Classify (one real prompt)", c50, c99, cm, c50 / i50],
                ["GetModelInfo (no inference)", i50, i99, im, 1.0],
            ]
            table = format_table(
                ["RPC", "p50 us", "p99 us", "mean us", "p50 / GetModelInfo p50"],
                rows,
                f"gRPC unary latency, 1 client, {calls} interleaved pairs "
                f"on {len(prompts)} real prompts ({target})",
            )
            sweep = []
            for n_clients in (1, 4, 16):
                _say(f"{n_clients} concurrent clients")
                per = max(50, calls // n_clients)
                results: list[tuple[list[float], int]] = [([], 0)] * n_clients
                threads = [
                    threading.Thread(
                        target=_classify_worker, args=(target, prompts, k, per, results)
                    )
                    for k in range(n_clients)
                ]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                lat = [x for r in results for x in r[0]]
                errors = sum(r[1] for r in results)
                p50, p99, _ = _percentiles(lat)
                sweep.append([n_clients, len(lat), errors, len(lat) / wall, p50, p99])
            table2 = format_table(
                ["clients", "calls", "errors", "calls/s", "p50 us", "p99 us"],
                sweep,
                "Concurrency sweep (Classify); clients share this "
                "process's GIL, the server runs in its own",
            )
            rss = _rss_mb(proc.pid) if proc is not None else None
            extra = f"\nserver RSS: {rss:.0f} MB" if rss is not None else ""
            return table + "\n\n" + table2 + extra + "\n"
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


def _classify_worker(
    target: str, prompts: list[str], k: int, per: int, results: list[tuple[list[float], int]]
) -> None:
    import grpc

    from tierpick.serving.client import TierpickClient

    lat: list[float] = []
    errors = 0
    with TierpickClient(target, timeout=10) as c:
        for j in range(per):
            t0 = time.perf_counter()
            try:
                c.classify(prompts[(k * per + j) % len(prompts)])
            except grpc.RpcError:
                errors += 1
            lat.append(time.perf_counter() - t0)
    results[k] = (lat, errors)


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _tree_rss_mb(root: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc), in MB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += _rss_mb(pid) or 0.0
        todo += children.get(pid, [])
    return total


def _run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run a command; returns wall seconds, the peak of its process tree's summed RSS (sampled
    every 0.1 s) and its stdout."""

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], _tree_rss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return wall, peak[0], out


def make_bench_log(prompts_path: Path, rows: int, dst: Path, junk_every: int = 50_000) -> int:
    """A JSONL log of ``rows`` real prompts (the file cycled), with a junk line (invalid JSON or
    a non-string prompt) every ``junk_every`` rows; returns the line count."""
    lines = [x for x in prompts_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    n = 0
    with dst.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(lines[i % len(lines)] + "\n")
            n += 1
            if i % junk_every == junk_every // 2:
                fh.write("{junk line\n" if (i // junk_every) % 2 else '{"prompt": 5}\n')
                n += 1
    return n


def run_score_bench(
    model: str | None,
    prompts_path: Path,
    rows: int,
    workers: int | None = None,
    ray: bool = True,
    workdir: Path | None = None,
) -> str:
    """``tierpick score`` on a log of ``rows`` real prompts, each configuration in its own
    process tree, against the single-machine path with all cores as the reference."""

    tmp = Path(tempfile.mkdtemp(prefix="tierpick-bench-", dir=workdir))
    try:
        log = tmp / "log.jsonl"
        lines = make_bench_log(prompts_path, rows, log, junk_every=max(100, rows // 20))
        n_cpu = workers or len(os.sched_getaffinity(0))
        base = [sys.executable, "-m", "tierpick.cli", "score", str(log)]
        if model:
            base += ["--model", model]
        configs = [
            (
                "local, all cores, no cache (reference)",
                ["--workers", str(n_cpu), "--cache-size", "0"],
            ),
            ("local, 1 process, no cache", ["--workers", "1", "--cache-size", "0"]),
            ("local, all cores, prompt cache", ["--workers", str(n_cpu)]),
        ]
        if ray:
            configs.append(
                (
                    "ray (local, started by the run), no cache",
                    ["--engine", "ray", "--workers", str(n_cpu), "--cache-size", "0"],
                )
            )
        table_rows = []
        ref = None
        for name, extra in configs:
            _say(f"tierpick score on {lines:,} rows: {name}")
            out = tmp / "out.parquet"
            wall, rss, text = _run_measured([*base, str(out), *extra])
            rows_out = _parquet_rows(out)
            if rows_out != lines:
                raise RuntimeError(f"{name}: {rows_out} rows out for {lines} in")
            ref = ref or wall
            errors = text.split("errors: ")[1].split()[0]
            table_rows.append([name, rows_out, errors, wall, lines / wall, wall / ref, rss])
            out.unlink()
        return (
            format_table(
                [
                    "configuration",
                    "rows out",
                    "error rows",
                    "wall s",
                    "rows/s",
                    "wall / reference",
                    "peak RSS MB (tree)",
                ],
                table_rows,
                f"tierpick score: {lines:,} lines ({rows:,} real prompts from {prompts_path.name} "
                f"cycled, junk lines injected) -> Parquet; {n_cpu} CPUs; wall includes process "
                "start and model load",
            )
            + "\n"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def run_gateway_bench(model: str | None, prompts_path: Path, calls: int = 2000) -> str:
    """Latency an Envoy adds with tierpick's ext_proc filter, against the same Envoy without
    it, on real prompts as OpenAI chat requests. Both Envoys run side by side in front of the
    same upstreams and requests alternate between them, so both see the same machine state; the
    processor runs in its own process, as deployed."""

    import yaml

    from tierpick.serving.gateway import parse_gateway_config, render_envoy_config
    from tierpick.serving.gateway.demo import Upstream
    from tierpick.serving.harness.envoy import Envoy
    from tierpick.serving.harness.processes import free_port

    prompts = read_prompts(prompts_path)
    upstreams = {t: Upstream(t) for t in ("local", "mid", "frontier")}
    raw = {
        "processor": {"port": free_port()},
        "model": model,
        "tiers": {t: {"upstream": u.address, "model": f"{t}-model"} for t, u in upstreams.items()},
        "envoy": {"listen_port": free_port(), "admin_port": free_port()},
    }
    with_cfg = parse_gateway_config(raw)
    plain_cfg = parse_gateway_config(
        {**raw, "envoy": {"listen_port": free_port(), "admin_port": free_port()}}
    )
    down_cfg = parse_gateway_config(
        {
            **raw,
            "processor": {"port": free_port()},
            "envoy": {"listen_port": free_port(), "admin_port": free_port()},
        }
    )
    tmp = Path(tempfile.mkdtemp(prefix="tierpick-gwbench-"))
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tierpick.cli",
            "gateway",
            "run",
            "--config",
            str(tmp / "gateway.yaml"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    envoys: list[Envoy] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "processor on" not in line:
            raise RuntimeError(f"the processor did not start: {line!r}")
        envoys = [
            Envoy(render_envoy_config(with_cfg), with_cfg.envoy.admin_port),
            Envoy(render_envoy_config(plain_cfg, with_processor=False), plain_cfg.envoy.admin_port),
            Envoy(render_envoy_config(down_cfg), down_cfg.envoy.admin_port),
        ]
        conns = [
            http.client.HTTPConnection("127.0.0.1", c.envoy.listen_port, timeout=30)
            for c in (with_cfg, plain_cfg, down_cfg)
        ]
        bodies = [
            json.dumps({"model": "auto", "messages": [{"role": "user", "content": p}]}).encode()
            for p in prompts
        ]

        def call(k: int, i: int) -> tuple[float, str]:
            t0 = time.perf_counter()
            conns[k].request(
                "POST",
                "/v1/chat/completions",
                body=bodies[i % len(bodies)],
                headers={"content-type": "application/json"},
            )
            resp = conns[k].getresponse()
            resp.read()
            return time.perf_counter() - t0, resp.getheader("x-tierpick-status") or "-"

        return _added_latency(
            call,
            [
                "Envoy + tierpick ext_proc (classified)",
                "same Envoy, no ext_proc filter (reference)",
                "Envoy + ext_proc, processor stopped (fail-open)",
            ],
            ref=1,
            calls=calls,
            warmup=100,
            outcome="x-tierpick-status",
            title=f"Gateway latency per request, {calls} alternating calls per path on "
            f"{len(prompts)} real prompts (OpenAI chat bodies); upstreams answer at once",
        )
    finally:
        for env in envoys:
            env.close()
        proc.terminate()
        proc.wait(timeout=30)
        for u in upstreams.values():
            u.close()
        shutil.rmtree(tmp, ignore_errors=True)


def run_litellm_bench(model: str | None, prompts_path: Path, calls: int = 500) -> str:
    """Latency the tierpick plug-in adds to a LiteLLM proxy, against the same proxy config
    without it, on real prompts as OpenAI chat requests. The proxies (plug-in calling the
    tierpick service, plug-in classifying in process, the reference without the plug-in, and
    the plug-in with its service stopped) run side by side in front of the same upstreams and
    the requests alternate between them, so all see the same machine state."""
    from concurrent.futures import ThreadPoolExecutor

    from tierpick.serving.gateway.demo import Upstream
    from tierpick.serving.harness.litellm import LiteLLMProxy, litellm_config
    from tierpick.serving.harness.processes import free_port

    prompts = read_prompts(prompts_path)
    upstreams = {t: Upstream(t) for t in ("local", "mid", "frontier")}
    addresses = {t: u.address for t, u in upstreams.items()}
    cmd = [sys.executable, "-m", "tierpick.cli", "serve", "--port", "0"]
    service = subprocess.Popen(
        [*cmd, "--model", model] if model else cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    proxies: list[LiteLLMProxy] = []
    try:
        assert service.stdout is not None
        line = service.stdout.readline()
        if "serving on" not in line:
            raise RuntimeError(f"the tierpick service did not start: {line!r}")
        port = int(line.split("serving on ")[1].split()[0].rsplit(":", 1)[1])
        timeout = {"timeout_ms": 200}
        paths = [
            (
                "LiteLLM + tierpick plug-in -> tierpick service (gRPC)",
                litellm_config(addresses, {"service": f"127.0.0.1:{port}", **timeout}),
                "tierpick/auto",
            ),
            (
                "LiteLLM + tierpick plug-in, in process",
                litellm_config(addresses, {"model": model or "default", **timeout}),
                "tierpick/auto",
            ),
            ("same LiteLLM, no plug-in (reference)", litellm_config(addresses, None), "mid-llm"),
            (
                "LiteLLM + plug-in, service stopped (fail-open)",
                litellm_config(addresses, {"service": f"127.0.0.1:{free_port()}", **timeout}),
                "tierpick/auto",
            ),
        ]
        with ThreadPoolExecutor(len(paths)) as pool:
            futures = [pool.submit(LiteLLMProxy, cfg, free_port()) for _, cfg, _ in paths]
            errors = []
            for f in futures:
                try:
                    proxies.append(f.result())
                except Exception as exc:  # close the others, then report
                    errors.append(exc)
            if errors:
                raise errors[0]
        conns = [http.client.HTTPConnection("127.0.0.1", p.port, timeout=60) for p in proxies]
        bodies = [[{"role": "user", "content": p}] for p in prompts]

        def call(k: int, i: int) -> tuple[float, str]:
            body = {"model": paths[k][2], "messages": bodies[i % len(bodies)]}
            t0 = time.perf_counter()
            status, headers, _ = proxies[k].chat(body, conn=conns[k])
            dt = time.perf_counter() - t0
            return dt, f"{status} {headers.get('x-tierpick-status') or '-'}"

        return _added_latency(
            call,
            [name for name, _, _ in paths],
            ref=2,
            calls=calls,
            warmup=50,
            outcome="HTTP x-tierpick-status",
            title=f"LiteLLM proxy {_litellm_version()} latency per request, {calls} alternating "
            f"calls per path on {len(prompts)} real prompts (OpenAI chat bodies); upstreams "
            "answer at once; the reference asks for the mid tier's model group directly",
        )
    finally:
        for proxy in proxies:
            proxy.close()
        service.terminate()
        service.wait(timeout=60)
        if service.stdout is not None:
            service.stdout.close()
        for u in upstreams.values():
            u.close()


def _litellm_version() -> str:
    from importlib.metadata import version

    return version("litellm")
