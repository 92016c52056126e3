"""Two builds of the service head to head: served at once, each under its own wrk.

On a shared machine wrk's figures drift by 10-30% within minutes, more than most changes to
the hot path are worth, so measuring the old build and then the new one can mislead. Here
both run at the same time on one upstream, and whatever the machine does hits both alike;
which one starts its load first alternates by round. The base is a git revision's `service/`
(default HEAD), the challenger the working tree.

    .venv/bin/python bench/duel.py [--base HEAD] [--rounds 6] [--connections 16] [--seconds 8]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import REPO, Contender, start_service, start_upstream, worker_pids, wrk


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def share_one_core(contenders: dict[str, Contender], upstream_pid: int) -> None:
    """Both workers on the first core, the upstream and wrk on the others: on a VM one virtual
    core can run slower than another for minutes, and a worker on each would measure that."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return
    for contender in contenders.values():
        for pid in worker_pids(contender.process):
            os.sched_setaffinity(pid, cores[:1])
    os.sched_setaffinity(upstream_pid, cores[1:])
    os.sched_setaffinity(0, cores[1:])  # this process, and the wrk it starts


def checkout(revision: str, into: Path) -> Path:
    """`service/` as it was at `revision`, to import instead of the working tree's."""
    archive = subprocess.run(
        ["git", "archive", revision, "service"], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "service"


def one_round(
    contenders: dict[str, Contender], *, connections: int, seconds: float
) -> dict[str, dict[str, float]]:
    """Both under load at once: requests/s, p50 (ms) and worker CPU per request (ms)."""
    results: dict[str, dict[str, float]] = {}
    pids = {name: worker_pids(c.process)[0] for name, c in contenders.items()}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}

    def load(name: str) -> None:
        c = contenders[name]
        url = c.base_url + c.path
        results[name] = wrk(
            url, connections=connections, seconds=seconds, key=c.key, script="post.lua"
        )

    threads = [threading.Thread(target=load, args=(name,)) for name in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, pid in pids.items():
        requests = results[name]["rps"] * round(seconds)
        results[name]["cpu_ms"] = 1000 * (cpu_seconds(pid) - before[name]) / max(requests, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="HEAD", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="duel-") as scratch:
        tmp = Path(scratch)
        base_path = checkout(args.base, tmp)
        upstream, upstream_process = start_upstream(tmp, delay_ms=0)
        contenders: dict[str, Contender] = {}
        try:
            contenders["base"] = start_service(
                tmp, upstream, 1, extra_env={"PYTHONPATH": str(base_path)}
            )
            contenders["new"] = start_service(tmp, upstream, 1)
            share_one_core(contenders, upstream_process.pid)
            one_round(contenders, connections=args.connections, seconds=2)  # warm up
            rows = []
            for number in range(args.rounds):
                order = dict(reversed(contenders.items())) if number % 2 else contenders
                result = one_round(order, connections=args.connections, seconds=args.seconds)
                rows.append(result)
                print(
                    f"round {number + 1}: "
                    + " | ".join(
                        f"{name} {r['rps']:.0f} req/s, p50 {r['p50']:.2f} ms, "
                        f"{r['cpu_ms']:.2f} ms CPU/req"
                        for name, r in sorted(result.items())
                    ),
                    flush=True,
                )
        finally:
            for contender in contenders.values():
                contender.stop()
            os.killpg(upstream_process.pid, signal.SIGTERM)
            upstream_process.wait(timeout=30)
    for figure in ("rps", "p50", "cpu_ms"):
        ratios = [row["new"][figure] / row["base"][figure] for row in rows]
        print(
            f"new / base {figure}: median {statistics.median(ratios):.3f} "
            f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
        )


if __name__ == "__main__":
    main()
