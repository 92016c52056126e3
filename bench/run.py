"""`make bench`: the service side by side with a bare pass-through and LiteLLM proxy.

Everything runs on loopback and is cleaned up after: a fast upstream (bench/upstream.py), the
service (`reasoning-agent serve`: Redis limits, SQLite, metrics, tracing off), the pass-through
(bench/passthrough.py) and LiteLLM proxy (its own virtualenv in bench/.litellm, skipped with a
message when it cannot be installed), each with the same number of gunicorn/uvicorn workers.
Load comes from wrk; contenders are measured in turn, A B C A B C, and each figure is the
median of the rounds.

    .venv/bin/python bench/run.py [--rounds 5] [--seconds 10] [--no-litellm] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import streaming  # noqa: E402
from tests.support import ALICE, free_port, redis_url  # noqa: E402

BENCH = REPO / "bench"
RESULTS = BENCH / "results"
LITELLM_VENV = BENCH / ".litellm"
LITELLM_VERSION = "1.106.0"
PORTKEY_DIR = BENCH / ".portkey"
PORTKEY_VERSION = "1.15.2"
PORTKEY_SERVER = (
    PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
)
MASTER_KEY = "sk-bench-master-key-0123456789"
PY = sys.executable
# The pass-through's req/s per worker on the machine where issue 6's targets were set.
REFERENCE_PASSTHROUGH_RPS = 800


@dataclass
class Contender:
    name: str
    base_url: str
    key: str | None
    process: subprocess.Popen[bytes]
    path: str = "/task"
    pids: list[int] = field(default_factory=list)
    # For a gateway: the headers of its OpenAI-shaped request (the service's is post.lua's).
    headers: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        stop(self.process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """End a process we spawned, and its children: SIGTERM, then SIGKILL after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args,
        env={**os.environ, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO,
    )


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited:\n{log.read_text()[-2000:]}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} never answered:\n{log.read_text()[-2000:]}")


def start_upstream(
    tmp: Path, delay_ms: float, *, stream_gap_ms: float = 50.0
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    log = tmp / f"upstream-{port}.log"
    process = spawn(
        [
            PY,
            str(BENCH / "upstream.py"),
            "--port",
            str(port),
            "--delay-ms",
            str(delay_ms),
            "--stream-gap-ms",
            str(stream_gap_ms),
        ],
        {},
        log,
    )
    wait_ready(f"http://127.0.0.1:{port}/", process, log)
    return f"http://127.0.0.1:{port}", process


def service_env(database: Path, upstream: str) -> dict[str, str]:
    """The service as benchmarked: Redis limits too high to bite, SQLite, the fast upstream."""
    return {
        "API_KEYS": f"alice:{ALICE}",
        "DATABASE_URL": f"sqlite:///{database}",
        "REDIS_URL": redis_url(db=11),
        "RATE_LIMIT": "100000000/minute",
        "QUERY_RATE_LIMIT": "100000000/minute",
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": f"{upstream}/v1",
        "OPENAI_MODEL": "bench-model",
        "LOG_LEVEL": "INFO",
    }


def start_service(
    tmp: Path, upstream: str, workers: int, *, extra_env: dict[str, str] | None = None
) -> Contender:
    port = free_port()
    log = tmp / f"service-{port}.log"
    env = service_env(tmp / f"service-{port}.db", upstream)
    env |= {"WORKERS": str(workers), "PORT": str(port), "HOST": "127.0.0.1", **(extra_env or {})}
    process = spawn([str(Path(PY).parent / "reasoning-agent"), "serve"], env, log)
    wait_ready(f"http://127.0.0.1:{port}/livez", process, log)
    return Contender("service", f"http://127.0.0.1:{port}", ALICE, process)


def start_passthrough(tmp: Path, upstream: str, workers: int) -> Contender:
    port = free_port()
    log = tmp / f"passthrough-{port}.log"
    process = spawn(
        [
            str(Path(PY).parent / "gunicorn"),
            "bench.passthrough:app",
            "-k",
            "uvicorn_worker.UvicornWorker",
            "-w",
            str(workers),
            "-b",
            f"127.0.0.1:{port}",
            "--no-control-socket",
            "--log-level",
            "warning",
        ],
        {"OPENAI_BASE_URL": f"{upstream}/v1"},
        log,
    )
    wait_ready(f"http://127.0.0.1:{port}/docs", process, log)
    return Contender("pass-through", f"http://127.0.0.1:{port}", None, process)


def litellm_available() -> bool:
    """LiteLLM proxy in its own virtualenv (it pins versions the service does not share)."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if binary.exists():
        return True
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV.relative_to(REPO)} ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [
                str(LITELLM_VENV / "bin" / "pip"),
                "install",
                "--quiet",
                f"litellm[proxy]=={LITELLM_VERSION}",
            ],
            check=True,
            timeout=900,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"LiteLLM skipped: it could not be installed here ({exc})")
        shutil.rmtree(LITELLM_VENV, ignore_errors=True)
        return False
    return binary.exists()


def start_litellm(tmp: Path, upstream: str, workers: int) -> Contender:
    port = free_port()
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: bench-model\n"
        "    litellm_params:\n"
        "      model: openai/bench-model\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: sk-bench\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  num_retries: 0\n"
    )
    log = tmp / f"litellm-{port}.log"
    process = spawn(
        [
            str(LITELLM_VENV / "bin" / "litellm"),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            str(workers),
        ],
        {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"},
        log,
    )
    wait_ready(f"http://127.0.0.1:{port}/health/liveliness", process, log, timeout=180)
    return Contender(
        "LiteLLM",
        f"http://127.0.0.1:{port}",
        MASTER_KEY,
        process,
        path="/chat/completions",
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
    )


def portkey_available() -> bool:
    """Portkey's open-source gateway, from npm into bench/.portkey (ignored by git)."""
    if PORTKEY_SERVER.exists():
        return True
    if shutil.which("npm") is None or shutil.which("node") is None:
        print("Portkey skipped: node and npm are not installed")
        return False
    print(
        f"installing @portkey-ai/gateway@{PORTKEY_VERSION} into {PORTKEY_DIR.relative_to(REPO)} ..."
    )
    try:
        subprocess.run(
            [
                "npm", "install", "--prefix", str(PORTKEY_DIR), "--no-audit", "--no-fund",
                "--silent", f"@portkey-ai/gateway@{PORTKEY_VERSION}",
            ],
            check=True,
            timeout=900,
        )  # fmt: skip
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"Portkey skipped: it could not be installed here ({exc})")
        return False
    return PORTKEY_SERVER.exists()


def start_portkey(tmp: Path, upstream: str) -> Contender:
    """One Node process, bound to 127.0.0.1 by a preload (it listens on every interface by
    default); it routes by headers to the same upstream."""
    port = free_port()
    log = tmp / f"portkey-{port}.log"
    process = spawn(
        [
            "node", "--import", str(BENCH / "loopback.mjs"), str(PORTKEY_SERVER),
            f"--port={port}", "--headless",
        ],
        {"NODE_ENV": "production"},
        log,
    )  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}/", process, log)
    exposed = [a for a in listening(port) if not ipaddress.ip_address(a).is_loopback]
    if exposed:
        stop(process)
        raise RuntimeError(f"Portkey listens beyond loopback on {exposed}; stopped it")
    return Contender(
        "Portkey",
        f"http://127.0.0.1:{port}",
        None,
        process,
        path="/v1/chat/completions",
        headers={
            "Authorization": "Bearer sk-bench",
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": f"{upstream}/v1",
        },
    )


def listening(port: int) -> list[str]:
    """The local addresses a TCP socket listens on at `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)  # 32-bit words, each little-endian
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(str(ipaddress.ip_address(words)))
    return found


def wrk(
    url: str, *, connections: int, seconds: float, key: str | None, script: str
) -> dict[str, float]:
    """Requests per second and latency percentiles (ms) from one wrk run."""
    threads = min(connections, 2)
    result = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(seconds))}s",  # wrk takes whole seconds only
            "--latency",
            "-s",
            str(BENCH / "wrk" / script),  # an absolute `script` replaces the whole path
            url,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "API_KEY": key or ""},
        check=True,
    )
    out = result.stdout

    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        assert match, out
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": ms("50"),
        "p99": ms("99"),
        "errors": float(errors.group(1)) if errors else 0.0,
    }


GATEWAY_BODY = json.dumps(
    {
        "model": "bench-model",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
)


def script_for(contender: Contender) -> str:
    """The wrk script for a contender: the committed one, or a gateway's written to a
    temporary file (its body and headers differ), never into the tree."""
    if not contender.headers:
        return "post.lua"
    name = contender.name.lower()
    path = Path(tempfile.gettempdir()) / f"reasoning-agent-bench-{name}-{os.getpid()}.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = '{GATEWAY_BODY}'"]
    lines += [
        f'wrk.headers["{header}"] = "{value}"'
        for header, value in {"Content-Type": "application/json", **contender.headers}.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def load(contender: Contender, *, connections: int, seconds: float) -> dict[str, float]:
    """wrk against a contender's own endpoint, with its own request."""
    return wrk(
        contender.base_url + contender.path,
        connections=connections,
        seconds=seconds,
        key=contender.key,
        script=script_for(contender),
    )


def worker_pids(process: subprocess.Popen[bytes]) -> list[int]:
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def thousand_at_once(contender: Contender, tmp: Path, n: int = 1000) -> dict[str, float]:
    """h2load opens `n` connections at once, each sends one POST; wall time until all are done."""
    body = tmp / "body.json"
    body.write_text(json.dumps({"prompt": "What is the capital of France?"}))
    headers = ["-H", "Content-Type: application/json"]
    if contender.key:
        headers += ["-H", f"X-API-Key: {contender.key}"]
    load = ["h2load", "--h1", "-n", str(n), "-c", str(n), "-t", "1", "-T", "120"]
    out = subprocess.run(
        [*load, "-d", str(body), *headers, contender.base_url + contender.path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    finished = re.search(r"finished in ([\d.]+)(ms|s)", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    assert finished and codes, out
    wall = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    return {"wall_s": wall, "errors": n - int(codes.group(1))}


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def most_files_open(pids: list[int], during: Callable[[], dict]) -> tuple[dict, int]:
    """What `during()` returns, and the most files one of `pids` held open meanwhile (sampled
    every 0.2 s)."""
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.2):
            peak = max([peak, *(open_files(pid) for pid in pids)])

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return during(), peak
    finally:
        done.set()
        sampler.join()


def ten_thousand(tmp: Path) -> dict:
    """Scenario 7: 10,000 requests at once against a 10 s upstream, two workers per contender,
    one burst each: every one answered, the wall time, and per worker the peak RSS and the
    most files open at once (sampled every 0.2 s)."""
    slow, slow_process = start_upstream(tmp, delay_ms=10_000)
    rows = {}
    try:
        for starter in (start_service, start_passthrough):
            contender = starter(tmp, slow, 2)
            try:
                thousand_at_once(contender, tmp, n=100)  # warm: imports, caches
                workers = worker_pids(contender.process)
                burst, files = most_files_open(
                    workers, lambda c=contender: thousand_at_once(c, tmp, n=10_000)
                )
                rows[contender.name] = {
                    **burst,
                    "peak_rss_mb_per_worker": max(peak_rss_mb(p) for p in workers),
                    "peak_open_files_per_worker": files,
                }
            finally:
                contender.stop()
    finally:
        stop(slow_process)
    return rows


def seed_tasks(db_path: Path, total: int, mine: int) -> None:
    """Bulk rows through the model's own table: `mine` for alice, the rest spread over 50
    other keys."""
    import sqlalchemy

    from reasoning_agent.tasks.models import Task

    engine = sqlalchemy.create_engine(f"sqlite:///{db_path}")
    table = Task.__table__
    start = datetime.now(UTC) - timedelta(seconds=total)
    with engine.begin() as connection:
        rows = []
        for i in range(total):
            rows.append(
                {
                    "id": uuid.uuid4().hex,
                    "owner": "alice" if i % (total // mine) == 0 else f"key{i % 50}",
                    "request_hash": "h",
                    "status": "completed",
                    "prompt": f"prompt {i}",
                    "answer": f"answer {i}",
                    "model": "bench-model",
                    "metadata": {},
                    "attempts": 1,
                    "created_at": start + timedelta(seconds=i, microseconds=i % 1_000_000),
                }
            )
            if len(rows) == 50_000:
                connection.execute(sqlalchemy.insert(table), rows)
                rows.clear()
        if rows:
            connection.execute(sqlalchemy.insert(table), rows)
        connection.exec_driver_sql("ANALYZE")
    engine.dispose()


async def limiter_decisions(n: int = 5000) -> dict[str, float]:
    """One check against the local Redis, sequentially: request limits alone, then with a
    token rate and two budgets reserved in the same script, and that reservation's settling."""
    from limits import parse_many

    from reasoning_agent.ratelimit import RateLimiter, TokenAsk
    from reasoning_agent.windows import token_windows

    limiter = RateLimiter(redis_url=redis_url(db=11))
    items = parse_many("100000000/minute")
    windows = token_windows(
        parse_many("10000000000/minute"), parse_many("10000000000/day;10000000000/month")
    )
    times: dict[str, list[float]] = {"requests": [], "tokens": [], "settle": []}

    async def timed(kind: str, call: Awaitable[object]) -> None:
        started = time.perf_counter()
        await call
        times[kind].append((time.perf_counter() - started) * 1000)

    try:
        for i in range(200):
            await limiter.hit("task", "warmup", items)
            await limiter.admit(
                "task", "warmup", items, TokenAsk(id=f"w{i}", tokens=1, windows=windows)
            )
            await limiter.settle("warmup", f"w{i}", charge=1)
        for _ in range(n):
            await timed("requests", limiter.hit("task", "bench", items))
        for i in range(n):
            ask = TokenAsk(id=f"t{i}", tokens=1100, windows=windows)
            await timed("tokens", limiter.admit("task", "tokens", items, ask))
            await timed("settle", limiter.settle("tokens", f"t{i}", charge=300))
    finally:
        await limiter.aclose()
    out = {}
    for kind, values in times.items():
        values.sort()
        prefix = "" if kind == "requests" else f"{kind}_"
        out[f"{prefix}p50"] = values[len(values) // 2]
        out[f"{prefix}p99"] = values[int(len(values) * 0.99)]
    return out


def median_of(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def latency_and_throughput(tmp: Path, upstream: str, args: argparse.Namespace) -> dict:
    """Scenarios 1 and 2: each contender with one worker, measured in turn, A B C A B C."""
    contenders = [start_service(tmp, upstream, 1), start_passthrough(tmp, upstream, 1)]
    try:
        if not args.no_portkey and portkey_available():
            contenders.append(start_portkey(tmp, upstream))
        if not args.no_litellm and litellm_available():
            contenders.append(start_litellm(tmp, upstream, 1))
        for c in contenders:  # warm: connections, caches, first-call imports
            load(c, connections=16, seconds=2)
        base = [
            wrk(
                f"{upstream}/v1/chat/completions",
                connections=1,
                seconds=args.seconds,
                key=None,
                script="post.lua",
            )
            for _ in range(args.rounds)
        ]
        one: dict[str, list] = {c.name: [] for c in contenders}
        sixteen: dict[str, list] = {c.name: [] for c in contenders}
        for r in range(args.rounds):
            for connections, runs in ((1, one), (16, sixteen)):
                for c in contenders:
                    runs[c.name].append(load(c, connections=connections, seconds=args.seconds))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        for c in contenders:
            c.stop()
    up_p50, up_p99 = median_of(base, "p50"), median_of(base, "p99")
    return {
        "upstream_alone": {"p50_ms": up_p50, "p99_ms": up_p99},
        "added_latency_1_conn": {
            c.name: {
                "p50_ms": median_of(one[c.name], "p50") - up_p50,
                "p99_ms": median_of(one[c.name], "p99") - up_p99,
                # each round's, as wrk measured them (the upstream's own still in)
                "p50_ms_each": [r["p50"] for r in one[c.name]],
                "p99_ms_each": [r["p99"] for r in one[c.name]],
            }
            for c in contenders
        },
        "throughput_16_conn": {
            c.name: {
                "rps_per_worker": median_of(sixteen[c.name], "rps"),
                "rps_each": [r["rps"] for r in sixteen[c.name]],
                "errors": sum(r["errors"] for r in sixteen[c.name]),
            }
            for c in contenders
        },
    }


def production_path(tmp: Path, upstream: str, args: argparse.Namespace) -> dict:
    """The chart's scale-out path: the service on PostgreSQL and Redis with 2 workers, beside
    the pass-through with 2 workers, wrk with 32 connections, in turn, A B A B."""
    from tests.support import drop_postgres_database, postgres_database

    database = postgres_database()
    contenders = [
        start_service(tmp, upstream, 2, extra_env={"DATABASE_URL": database}),
        start_passthrough(tmp, upstream, 2),
    ]
    runs: dict[str, list] = {c.name: [] for c in contenders}
    try:
        for c in contenders:
            load(c, connections=32, seconds=2)
        for r in range(args.rounds):
            for c in contenders:
                runs[c.name].append(load(c, connections=32, seconds=args.seconds))
            print(f"production path round {r + 1}/{args.rounds} done", flush=True)
    finally:
        for c in contenders:
            c.stop()
        drop_postgres_database(database)
    return {
        name: {
            "rps": median_of(each, "rps"),
            "rps_each": [r["rps"] for r in each],
            "p99_ms": median_of(each, "p99"),
            "errors": sum(r["errors"] for r in each),
        }
        for name, each in runs.items()
    }


def thousand_concurrent(tmp: Path, rounds: int) -> dict:
    """Scenario 3: 1000 requests at once against a 1 s upstream, two workers per contender;
    the median of at least five bursts (one burst moves by 0.1-0.3 s on a shared 2-core
    machine). Each contender's bursts run back to back, not in turn with the other's: a
    connection to the upstream idle for 5 s is closed (the SDK's keep-alive), and waiting
    out the other contender's bursts would make every burst open its 500 again."""
    slow, slow_process = start_upstream(tmp, delay_ms=1000)
    rows = {}
    try:
        for starter in (start_service, start_passthrough):
            contender = starter(tmp, slow, 2)
            try:
                thousand_at_once(contender, tmp, n=100)  # warm: connections, caches
                bursts = [thousand_at_once(contender, tmp) for _ in range(max(rounds, 5))]
                row = {
                    "wall_s": statistics.median(b["wall_s"] for b in bursts),
                    "wall_s_each": [b["wall_s"] for b in bursts],
                    "errors": sum(b["errors"] for b in bursts),
                    "peak_rss_mb_per_worker": max(
                        peak_rss_mb(p) for p in worker_pids(contender.process)
                    ),
                }
            finally:
                contender.stop()
            rows[contender.name] = row
    finally:
        stop(slow_process)
    return rows


def query_latency(tmp: Path, upstream: str, args: argparse.Namespace) -> dict:
    """Scenario 4: GET /query with 1,000,000 tasks stored, 100,000 of them the caller's."""
    total, mine = (100_000, 10_000) if args.quick else (1_000_000, 100_000)
    service = start_service(tmp, upstream, 1)
    try:
        db_file = next(tmp.glob(f"service-{service.base_url.rsplit(':', 1)[1]}.db"))
        started = time.monotonic()
        seed_tasks(db_file, total, mine)
        seeded_s = time.monotonic() - started
        query = wrk(
            f"{service.base_url}/query?limit=20",
            connections=1,
            seconds=args.seconds,
            key=ALICE,
            script="get.lua",
        )
    finally:
        service.stop()
    return {
        "rows": total,
        "caller_rows": mine,
        "seed_s": seeded_s,
        "p50_ms": query["p50"],
        "p99_ms": query["p99"],
    }


SCENARIOS = ("latency", "production", "thousand", "query", "limit", "stream", "ten_thousand")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--no-portkey", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 round of 5 s, small /query seed")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help="comma-separated: latency (1 and 2), production, thousand (3), query (4), "
        "limit (5), stream (6), ten_thousand (7)",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(SCENARIOS):
        parser.error(f"--only takes {', '.join(SCENARIOS)}")
    if args.quick:
        args.rounds, args.seconds = 1, 5
    for tool, package in (("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: apt-get install {package} (make bench does it)")

    tmp = Path(tempfile.mkdtemp(prefix="ra-bench-"))
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "scenarios": {},
    }
    scenarios = results["scenarios"]
    upstream, up = start_upstream(tmp, delay_ms=0)
    try:
        if "latency" in only:
            scenarios.update(latency_and_throughput(tmp, upstream, args))
        if "production" in only:
            scenarios["production_path_32_conn"] = production_path(tmp, upstream, args)
        if "thousand" in only:
            scenarios["thousand_concurrent_1s_upstream"] = thousand_concurrent(tmp, args.rounds)
        if "query" in only:
            scenarios["query_latency"] = query_latency(tmp, upstream, args)
        if "limit" in only:
            scenarios["rate_limit_decision"] = asyncio.run(limiter_decisions())
        if "stream" in only:
            scenarios.update(streaming.streaming(tmp, args, run=sys.modules[__name__]))
        if "ten_thousand" in only:
            scenarios["ten_thousand_10s_upstream"] = ten_thousand(tmp)
    finally:
        stop(up)
        shutil.rmtree(tmp, ignore_errors=True)

    RESULTS.mkdir(exist_ok=True)
    name = "latest.json" if only == set(SCENARIOS) else "partial.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if name == "latest.json":
        chart(results, RESULTS / "latest.png")
        print(f"chart: {(RESULTS / 'latest.png').relative_to(REPO)}")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def chart(results: dict, path: Path) -> None:
    """The headline numbers as one PNG: added latency, throughput, 1000 at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["scenarios"]
    added, rps = s["added_latency_1_conn"], s["throughput_16_conn"]
    thousand = s["thousand_concurrent_1s_upstream"]
    names = list(added)
    colours = {
        "service": "#2b6cb0",
        "pass-through": "#718096",
        "Portkey": "#805ad5",
        "LiteLLM": "#dd6b20",
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    width = 0.38
    for i, name in enumerate(names):
        colour = colours.get(name, "#444")
        axes[0].bar(i - width / 2, added[name]["p50_ms"], width, color=colour)
        axes[0].bar(i + width / 2, added[name]["p99_ms"], width, color=colour, alpha=0.5)
        axes[1].bar(i, rps[name]["rps_per_worker"], color=colour)
    axes[0].set_title("added latency, 1 connection (ms)\nsolid p50, light p99")
    axes[1].set_title("requests/s per worker, 16 connections")
    for ax in axes[:2]:
        ax.set_xticks(range(len(names)), names)
    rows = list(thousand)
    axes[2].bar(
        range(len(rows)),
        [thousand[n]["wall_s"] for n in rows],
        color=[colours.get(n, "#444") for n in rows],
    )
    axes[2].axhline(2.0, color="#c53030", linestyle="--", linewidth=1, label="target 2 s")
    axes[2].set_xticks(range(len(rows)), rows)
    axes[2].set_title("1000 at once, 1 s upstream, 2 workers (s)")
    axes[2].legend(loc="upper right")
    m = results["machine"]
    fig.suptitle(
        f"reasoning-agent benchmark: {m['cpus']} x {m.get('cpu', '?')}, Python {m['python']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(results: dict) -> str:
    """The results as Markdown, with ratios to the pass-through, Portkey and LiteLLM."""
    s = results["scenarios"]
    lines: list[str] = []
    if "added_latency_1_conn" in s:
        lines += latency_table(s["added_latency_1_conn"], s["throughput_16_conn"])
    if "thousand_concurrent_1s_upstream" in s:
        lines += [
            "",
            "| 1000 concurrent, 1 s upstream, 2 workers | wall (s), median | each burst (s) | "
            "errors | peak RSS per worker (MB) |",
            "|---|---|---|---|---|",
        ]
        for name, row in s["thousand_concurrent_1s_upstream"].items():
            each = " / ".join(f"{w:.2f}" for w in row.get("wall_s_each", [row["wall_s"]]))
            lines.append(
                f"| {name} | {row['wall_s']:.2f} | {each} | {row['errors']:.0f} | "
                f"{row['peak_rss_mb_per_worker']:.0f} |"
            )
    if "production_path_32_conn" in s:
        path = s["production_path_32_conn"]
        floor = path["pass-through"]["rps"]
        lines += [
            "",
            "| PostgreSQL + Redis, 2 workers, 32 connections | req/s (median) | each round | "
            "p99 (ms) | errors | vs pass-through |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in path.items():
            each = " / ".join(f"{r:.0f}" for r in row["rps_each"])
            lines.append(
                f"| {name} | {row['rps']:.0f} | {each} | {row['p99_ms']:.2f} | "
                f"{row['errors']:.0f} | {row['rps'] / floor:.2f}x |"
            )
    if "ten_thousand_10s_upstream" in s:
        lines += [
            "",
            "| 10,000 at once, 10 s upstream, 2 workers | wall (s) | errors | "
            "peak RSS per worker (MB) | peak open files per worker |",
            "|---|---|---|---|---|",
        ]
        for name, row in s["ten_thousand_10s_upstream"].items():
            lines.append(
                f"| {name} | {row['wall_s']:.2f} | {row['errors']:.0f} | "
                f"{row['peak_rss_mb_per_worker']:.0f} | {row['peak_open_files_per_worker']} |"
            )
    if "query_latency" in s:
        q = s["query_latency"]
        lines += [
            "",
            f"GET /query with {q['rows']:,} rows ({q['caller_rows']:,} the caller's): "
            f"p50 {q['p50_ms']:.2f} ms, p99 {q['p99_ms']:.2f} ms",
        ]
    if "rate_limit_decision" in s:
        rl = s["rate_limit_decision"]
        lines.append(
            f"rate-limit decision against the local Redis: "
            f"p50 {rl['p50']:.3f} ms, p99 {rl['p99']:.3f} ms"
        )
        if "tokens_p50" in rl:
            lines.append(
                f"with a token rate and two budgets reserved in the same script: "
                f"p50 {rl['tokens_p50']:.3f} ms, p99 {rl['tokens_p99']:.3f} ms; "
                f"settling: p50 {rl['settle_p50']:.3f} ms, p99 {rl['settle_p99']:.3f} ms"
            )
    lines += streaming.table(s)
    m = results["machine"]
    lines.append(
        f"machine: {m['cpus']} x {m.get('cpu', '?')}, {m['platform']}, Python {m['python']}"
    )
    floor = s.get("throughput_16_conn", {}).get("pass-through")
    if floor:  # the absolute targets (2 s, 10 ms, 1 ms) were set on a faster machine
        lines.append(
            f"machine speed: the pass-through served {floor['rps_per_worker']:.0f} req/s per "
            f"worker here; {REFERENCE_PASSTHROUGH_RPS} where issue 6 set the targets"
        )
    return "\n".join(lines)


def latency_table(added: dict, rps: dict) -> list[str]:
    def ratio(name: str, base: str, pick: str) -> str:
        if base not in added or name == base:
            return "-"
        value = {"p50": added, "p99": added, "rps": rps}[pick]
        field = {"p50": "p50_ms", "p99": "p99_ms", "rps": "rps_per_worker"}[pick]
        return f"{value[name][field] / value[base][field]:.2f}x"

    lines = [
        "| contender | added p50 (ms) | added p99 (ms) | req/s per worker (16 conn) | "
        "vs pass-through (p50 / p99 / req/s) | vs Portkey (p50 / p99 / req/s) | "
        "vs LiteLLM (p50 / p99 / req/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in added:
        ratios = [
            " / ".join(ratio(name, base, pick) for pick in ("p50", "p99", "rps"))
            for base in ("pass-through", "Portkey", "LiteLLM")
        ]
        lines.append(
            f"| {name} | {added[name]['p50_ms']:.2f} | {added[name]['p99_ms']:.2f} | "
            f"{rps[name]['rps_per_worker']:.0f} | {ratios[0]} | {ratios[1]} | {ratios[2]} |"
        )
    return lines


if __name__ == "__main__":
    main()
