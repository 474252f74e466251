"""Benchmark: POST /api/v1/check latency with reservations at a fixed request rate.

Open-loop load (requests are sent on a schedule, not after the previous answer)
against `ledger api` and one worker, next to the same API's latency for a call
that never reaches the ledger (a 401), measured in the same run. Prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ledger.cli.stack import wait_for_http
from ledger.control.store import ControlStore
from streams.topics import ensure_topics
from tests.conftest import ROOT, WorkerProcess, new_settings, wait_processed

PLAN = {"plans": [{"name": "bench", "max_spend_per_period": 1000000,
                   "cost_rates": {"m": {"input": 0.001, "output": 0.002}}}]}


async def load(client: httpx.AsyncClient, rate: int, seconds: float, body, authorised: bool) -> list[float]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def one(n: int) -> None:
        started = time.perf_counter()
        answer = await client.post("/check", json=body(n), headers=None if authorised else {"Authorization": ""})
        latencies.append(time.perf_counter() - started)
        statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1

    tasks, start = [], time.perf_counter()
    for n in range(int(rate * seconds)):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    print(f"  statuses: {dict(sorted(statuses.items()))}")
    return latencies


def percentiles(latencies: list[float]) -> str:
    qs = statistics.quantiles(latencies, n=100)
    return f"p50 {qs[49] * 1000:6.1f} ms   p95 {qs[94] * 1000:6.1f} ms   p99 {qs[98] * 1000:6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    settings = new_settings(bootstrap, Path(tempfile.mkdtemp(prefix="ledger-bench-checks-")))
    asyncio.run(ensure_topics(settings))
    store = ControlStore(settings.control_url)
    store.create_schema()
    with store.session() as session:
        _, key = session.create_tenant("bench")
    port = 18500
    env = {**os.environ, "LEDGER_HOME": str(settings.home), "LEDGER_NAMESPACE": settings.namespace,
           "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "LEDGER_API_PORT": str(port)}
    api = subprocess.Popen([sys.executable, "-m", "ledger.cli.main", "api"], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = WorkerProcess(settings).start()
    try:
        base = f"http://127.0.0.1:{port}/api/v1"
        wait_for_http(f"http://127.0.0.1:{port}/docs", 60)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http:
            plan_id = http.post("/config/plans", json=PLAN).json()["plans"][0]["id"]
            for u in range(100):
                http.post("/users", json={"external_id": f"u{u}", "plan_id": plan_id,
                                          "period_start": "2026-01-01T00:00:00Z"})
        wait_processed(settings, worker)

        def body(n: int) -> dict[str, object]:
            return {"user": f"u{n % 100}", "model": "m", "input_tokens": 500, "output_tokens": 200, "reserve": True}

        async def run() -> tuple[list[float], list[float]]:
            async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30,
                                         limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)) as client:
                await load(client, 20, 2, body, True)  # warm-up
                print(f"baseline: the same API answering 401 at {args.rate}/s")
                baseline = await load(client, args.rate, args.seconds / 3, body, False)
                print(f"checks with reservations at {args.rate}/s for {args.seconds:.0f} s")
                checks = await load(client, args.rate, args.seconds, body, True)
                return baseline, checks

        baseline, checks = asyncio.run(run())
        print(f"\nbaseline (401, no ledger round trip): {percentiles(baseline)}")
        print(f"POST /check, reserve=true:            {percentiles(checks)}")
    finally:
        api.terminate()
        worker.stop()


if __name__ == "__main__":
    main()
