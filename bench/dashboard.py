"""Render the Grafana dashboard's panels to a PNG from a real local run (no Grafana needed).

Starts the fake upstream and `reasoning-agent serve` (2 workers, Redis limits), drives about a
minute of mixed traffic (two keys, a burst past one key's request and token limits, upstream
failures and retries, slow answers, an answer that costs more than it reserved), scrapes
/metrics every two seconds, and draws each panel of
charts/reasoning-agent/dashboards/reasoning-agent.json from those scrapes: counters as rates,
histograms as quantiles, as the panel's PromQL would in Grafana.

    make dashboard     # writes charts/reasoning-agent/dashboards/reasoning-agent.png
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fake_openai import FakeOpenAI, Step  # noqa: E402
from tests.support import ALICE, BOB, OPENAI_KEY, Service, free_port, redis_url  # noqa: E402

DASHBOARD = REPO / "charts" / "reasoning-agent" / "dashboards" / "reasoning-agent.json"
OUTPUT = DASHBOARD.with_suffix(".png")
P = "reasoning_agent_"
Labels = tuple[tuple[str, str], ...]
Scrape = tuple[float, dict[tuple[str, Labels], float]]


def scrape(url: str) -> dict[tuple[str, Labels], float]:
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def drive(service: Service, upstream: FakeOpenAI, stop: threading.Event) -> None:
    """A minute of traffic with something for every panel."""

    async def main() -> None:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:

            async def send(key: str, i: int) -> None:
                await client.post(
                    "/task", json={"prompt": f"dashboard load {i}"}, headers={"X-API-Key": key}
                )

            i = 0
            started = time.monotonic()
            while not stop.is_set():
                phase = time.monotonic() - started
                upstream.default_delay = 0.4 if 20 < phase < 30 else 0.02
                if 35 < phase < 40:
                    upstream.script(
                        Step(status=500), Step(status=429, headers={"Retry-After": "0"})
                    )
                if 44 < phase < 46:
                    upstream.script(Step(status=400))
                if 50 < phase < 51:  # an upstream that reports more than was reserved
                    upstream.script(Step(body=_costly_answer()))
                bob = 25 if 8 < phase < 20 else 1  # Bob bursts past his limit; Alice keeps going
                keys = [ALICE] + [BOB] * bob
                await asyncio.gather(*(send(key, i + n) for n, key in enumerate(keys)))
                await client.get("/query", headers={"X-API-Key": ALICE})
                if int(phase) % 9 == 0:
                    await client.get("/query", headers={"X-API-Key": "not-a-valid-key-000000"})
                i += len(keys)
                await asyncio.sleep(0.25)

    asyncio.run(main())


def _costly_answer() -> dict:
    return {
        "id": "chatcmpl-costly",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fake-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "long"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1500, "completion_tokens": 1500, "total_tokens": 3000},
    }


def series_rate(
    scrapes: list[Scrape],
    name: str,
    by: tuple[str, ...],
    where: Callable[[dict[str, str]], bool] = lambda _: True,
) -> dict[str, list[float]]:
    """sum by (`by`) (rate(name[window])) over consecutive scrapes."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0] * (len(scrapes) - 1))
    for i in range(1, len(scrapes)):
        (t0, a), (t1, b) = scrapes[i - 1], scrapes[i]
        for (metric, labels), value in b.items():
            if metric != name:
                continue
            lab = dict(labels)
            if not where(lab):
                continue
            key = " ".join(lab.get(k, "") for k in by) or "all"
            out[key][i - 1] += max(0.0, value - a.get((metric, labels), 0.0)) / (t1 - t0)
    return dict(out)


def series_quantile(
    scrapes: list[Scrape],
    name: str,
    q: float,
    where: Callable[[dict[str, str]], bool] = lambda _: True,
    window: int = 3,
) -> list[float]:
    """histogram_quantile(q, sum by (le) (rate(name_bucket[window scrapes])))."""
    values = []
    for i in range(1, len(scrapes)):
        a, b = scrapes[max(0, i - window)][1], scrapes[i][1]
        buckets: dict[float, float] = defaultdict(float)
        for (metric, labels), value in b.items():
            lab = dict(labels)
            if metric == f"{name}_bucket" and where(lab):
                buckets[float(lab["le"])] += value - a.get((metric, labels), 0.0)
        bounds = sorted(buckets)
        total = buckets[math.inf] if bounds else 0
        if total <= 0:
            values.append(math.nan)
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for bound in bounds:
            if buckets[bound] >= rank:
                if bound == math.inf:
                    values.append(lower)
                else:
                    span = buckets[bound] - below
                    values.append(lower + (bound - lower) * ((rank - below) / span if span else 1))
                break
            lower, below = bound, buckets[bound]
    return values


def panels_data(scrapes: list[Scrape]) -> dict[int, dict[str, list[float]]]:
    task = lambda lab: lab.get("route") == "/task"  # noqa: E731
    errors = lambda lab: lab.get("status", "")[:1] in "45"  # noqa: E731
    requests = series_rate(scrapes, f"{P}http_requests_total", ())
    server_errors = series_rate(
        scrapes, f"{P}http_requests_total", (), lambda lab: lab["status"][:1] == "5"
    )
    total = requests.get("all", [])
    ratio = [
        e / t if t else 0.0
        for e, t in zip(server_errors.get("all", [0.0] * len(total)), total, strict=False)
    ]
    attempts = series_rate(scrapes, f"{P}llm_attempts_total", ()).get("all", [])
    calls = series_rate(scrapes, f"{P}llm_calls_total", ()).get("all", [])
    quantiles = lambda name, where=lambda _: True, qs=(0.5, 0.95, 0.99): {  # noqa: E731
        f"p{int(q * 100)}": series_quantile(scrapes, name, q, where) for q in qs
    }
    in_flight = [
        sum(v for (m, _), v in s.items() if m == f"{P}http_requests_in_flight")
        for _, s in scrapes[1:]
    ]
    return {
        1: requests,
        2: {"5xx ratio": ratio},
        3: {"p99": series_quantile(scrapes, f"{P}overhead_seconds", 0.99, task)},
        4: {"in flight": in_flight},
        5: series_rate(scrapes, f"{P}http_requests_total", ("route", "status")),
        6: {
            **series_rate(scrapes, f"{P}http_requests_total", ("status",), errors),
            **{
                f"429 {k}": v
                for k, v in series_rate(scrapes, f"{P}rate_limited_total", ("key",)).items()
            },
        },
        7: quantiles(f"{P}http_request_duration_seconds", task),
        8: quantiles(f"{P}overhead_seconds", task),
        9: series_rate(scrapes, f"{P}llm_attempts_total", ("outcome",)),
        10: {"retries": [a - c for a, c in zip(attempts, calls, strict=False)]},
        11: quantiles(f"{P}llm_call_duration_seconds", qs=(0.5, 0.95)),
        12: series_rate(scrapes, f"{P}llm_tokens_total", ("key", "direction")),
        13: series_rate(scrapes, f"{P}tasks_total", ("status",)),
        14: {
            "rate-limit store": series_rate(scrapes, f"{P}rate_limit_store_errors_total", ()).get(
                "all", []
            ),
            "database": series_rate(scrapes, f"{P}database_errors_total", ()).get("all", []),
            "401": series_rate(scrapes, f"{P}auth_failures_total", ()).get("all", []),
        },
        15: {
            f"{key} {what}": values
            for what in ("reserved", "settled", "overshoot")
            for key, values in series_rate(scrapes, f"{P}tokens_{what}_total", ("key",)).items()
        },
        16: series_rate(scrapes, f"{P}token_limited_total", ("key", "kind")),
    }


def draw(scrapes: list[Scrape], dashboard: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = panels_data(scrapes)
    times = [t - scrapes[0][0] for t, _ in scrapes[1:]]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    fig = plt.figure(figsize=(20, rows * 0.42), facecolor="#111217")
    fig.suptitle(
        f"{dashboard['title']}: rendered by bench/dashboard.py from a {times[-1]:.0f} s local run",
        color="#d8d9da",
        fontsize=14,
        x=0.01,
        ha="left",
    )
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        ax = fig.add_axes(
            (
                g["x"] / 24 + 0.004,
                1 - (g["y"] + g["h"]) / rows * 0.96 - 0.02,
                g["w"] / 24 - 0.012,
                g["h"] / rows * 0.96 - 0.03,
            ),
            facecolor="#181b1f",
        )
        ax.set_title(panel["title"], color="#d8d9da", fontsize=10, loc="left")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        for side in ax.spines.values():
            side.set_color("#2c3235")
        series = data.get(panel["id"], {})
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        scale = 1000 if unit == "s" else 100 if unit == "percentunit" else 1
        if panel["type"] == "stat":
            values = [v for s in series.values() for v in s if not math.isnan(v)]
            last = (
                sum(s[-1] for s in series.values() if s and not math.isnan(s[-1])) if series else 0
            ) * scale
            suffix = {"s": " ms", "percentunit": " %", "reqps": " req/s"}.get(unit, "")
            ax.text(
                0.03,
                0.35,
                f"{last:.1f}{suffix}",
                color="#73bf69",
                fontsize=22,
                transform=ax.transAxes,
            )
            if values:
                total = [
                    sum(s[i] for s in series.values() if not math.isnan(s[i])) * scale
                    for i in range(len(times))
                ]
                ax.fill_between(times, total, color="#73bf69", alpha=0.15)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for label, values in sorted(series.items()):
            ax.plot(times, [v * scale for v in values], linewidth=1.2, label=label)
        ax.set_ylabel({"s": "ms", "reqps": "req/s"}.get(unit, ""), color="#8e8e8e", fontsize=7)
        if series:
            ax.legend(
                fontsize=6,
                loc="upper left",
                facecolor="#181b1f",
                labelcolor="#d8d9da",
                framealpha=0.6,
                ncol=3,
            )
    fig.savefig(OUTPUT, dpi=80, facecolor=fig.get_facecolor())
    print(f"wrote {OUTPUT.relative_to(REPO)}")


def main(seconds: float = 60) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    upstream = FakeOpenAI().start()
    tmp = Path(tempfile.mkdtemp(prefix="ra-dashboard-"))
    metrics_port = free_port()
    service = Service(
        {
            "API_KEYS": f"alice:{ALICE},bob:{BOB}",
            "DATABASE_URL": f"sqlite:///{tmp}/tasks.db",
            "OPENAI_API_KEY": OPENAI_KEY,
            "OPENAI_BASE_URL": upstream.base_url,
            "OPENAI_MODEL": "fake-model",
            "WORKERS": "2",
            "REDIS_URL": redis_url(db=14),
            "RATE_LIMIT": "300/minute",
            "TOKEN_RATE_LIMIT": "4000/minute",  # a burst of 25 reserves far more: refused
            "TOKEN_BUDGET": "1000000/day",
            "METRICS_PORT": str(metrics_port),
        },
        log_path=tmp / "service.log",
    ).start()
    stop = threading.Event()
    load = threading.Thread(target=drive, args=(service, upstream, stop))
    scrapes: list[Scrape] = []
    try:
        load.start()
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            scrapes.append((time.monotonic(), scrape(f"http://127.0.0.1:{metrics_port}/metrics")))
            time.sleep(2)
    finally:
        stop.set()
        load.join(timeout=60)
        service.stop()
        upstream.stop()
    draw(scrapes, dashboard)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 60)
