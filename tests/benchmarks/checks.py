"""Benchmark: POST /api/v1/check latency with reservations at fixed request rates, and where the time goes.

Open-loop load (requests are sent on a schedule, not after the previous answer)
against `ledger api` and one worker, at each rate next to the same API's latency for
a call that never reaches the ledger (a 401), measured in the same run at the same
rate. The tenant's own rate limit is raised above the highest rate, so a 429 means
the limit still bites; every run prints its statuses.

Then a breakdown per check, joined by its reservation id: the client's send, the
usage record's CreateTime (the API's producer), the reply record's CreateTime (the
worker's producer), the client's answer. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from ledger.cli.stack import wait_for_http
from ledger.control.store import ControlStore
from ledger.events import CheckRequested
from ledger.heap import freeze_startup_heap
from streams.processor import Record, commands_of
from streams.topics import Topics, ensure_topics, partitions_of
from tests.conftest import ROOT, WorkerProcess, delete_namespaces, free_port, new_settings, wait_processed

PLAN = {"plans": [{"name": "bench", "max_spend_per_period": 1000000,
                   "cost_rates": {"m": {"input": 0.001, "output": 0.002}}}]}
USERS = 100
CONNECTIONS_MAX = 256
REQUEST_TIMEOUT_S = 30.0


@dataclass
class Sent:
    reservation_id: str
    sent_s: float  # wall clock (time.time()), comparable with the records' CreateTime
    answered_s: float
    status: int


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)


class Connections:
    """A minimal HTTP/1.1 keep-alive client: httpx spends about a millisecond of CPU per request, so on two
    shared cores it could not send 1,000 requests/s on schedule (it fell a minute behind in one second)."""

    def __init__(self, port: int, size: int) -> None:
        self.port, self.size = port, size
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self._open = 0

    async def post(self, path: str, body: bytes, authorization: str) -> int:
        if self._idle.empty() and self._open < self.size:
            self._open += 1
            try:
                conn = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self._open -= 1
                raise
        else:
            conn = await self._idle.get()
        reader, writer = conn
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Authorization: {authorization}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self._open -= 1
            writer.close()
            raise
        self._idle.put_nowait(conn)
        return status

    async def close(self) -> None:
        while not self._idle.empty():
            _, writer = self._idle.get_nowait()
            writer.close()


async def load(client: Connections, key: str, rate: int, seconds: float, body: Callable[[int, str], dict[str, object]],
               authorised: bool) -> Load:
    out = Load()
    authorization = f"Bearer {key}" if authorised else "Bearer pg_live_not-a-key"

    async def one(n: int) -> None:
        reservation_id = uuid.uuid4().hex
        payload = msgspec.json.encode(body(n, reservation_id))
        sent_s, started = time.time(), time.perf_counter()
        try:
            status = await asyncio.wait_for(client.post("/api/v1/check", payload, authorization), REQUEST_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
            status = 0  # no answer at all (timeout, connection refused): counted, not timed
        elapsed = time.perf_counter() - started
        out.statuses[status] = out.statuses.get(status, 0) + 1
        if status:
            out.latencies.append(elapsed)
            out.sent.append(Sent(reservation_id, sent_s, sent_s + elapsed, status))

    tasks, start = [], time.perf_counter()
    for n in range(int(rate * seconds)):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
    behind_s = time.perf_counter() - start - seconds  # > 0: the client could not keep the schedule
    await asyncio.gather(*tasks)
    print(f"  statuses: {dict(sorted(out.statuses.items()))}" + (f"; the client fell {behind_s:.2f} s behind its "
                                                                  f"schedule" if behind_s > 0.05 else ""))
    return out


def percentiles(latencies: list[float]) -> str:
    if len(latencies) < 2:
        return "too few answers"
    qs = statistics.quantiles(latencies, n=100)
    return f"p50 {qs[49] * 1000:6.1f} ms   p95 {qs[94] * 1000:6.1f} ms   p99 {qs[98] * 1000:6.1f} ms"


async def timestamps(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes, int]]:
    """Every record of ``topic`` with its timestamp (CreateTime, ms)."""
    parts = (await partitions_of(bootstrap, (topic,)))[topic]
    tps = [TopicPartition(topic, p) for p in parts]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    out: list[tuple[bytes | None, bytes, int]] = []
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            await consumer.seek_to_beginning(tp)
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for tp, records in (await consumer.getmany(timeout_ms=500, max_records=20_000)).items():
                out.extend((r.key, r.value or b"", r.timestamp) for r in records if r.offset < ends[tp])
    finally:
        await consumer.stop()
    return out


class _Reply(msgspec.Struct):
    request_id: str


def breakdown(bootstrap: str, namespace: str, sent: list[Sent]) -> dict[str, list[float]]:
    """Per answered check: the legs between the client's send, the two records' CreateTimes and the answer (ms)."""
    topics = Topics.for_namespace(namespace)
    checks: dict[str, tuple[str, int]] = {}  # reservation id -> (request id, usage record's CreateTime)
    for key, value, ts in asyncio.run(timestamps(bootstrap, topics.usage)):
        # Checks that arrive together share a record (an envelope): each is timed by that record.
        for _unit, command in commands_of(Record(topics.usage, 0, 0, key, value)):
            if isinstance(command, CheckRequested):
                checks[command.event_id] = (command.request_id, ts)
    replies: dict[str, int] = {}
    for _key, value, ts in asyncio.run(timestamps(bootstrap, topics.replies)):
        try:
            replies.setdefault(msgspec.json.decode(value, type=_Reply).request_id, ts)
        except msgspec.DecodeError:
            continue
    legs: dict[str, list[float]] = {"client send -> usage record created (API: HTTP, auth, decode, publish call)": [],
                                    "usage record -> reply record created (log append, worker fetch, batch window, "
                                    "fold, outputs, reply send)": [],
                                    "reply record -> client answered (API's reply consumer, response)": [],
                                    "total (client)": []}
    names = list(legs)
    for s in sent:
        if s.reservation_id not in checks:
            continue
        request_id, usage_ms = checks[s.reservation_id]
        if request_id not in replies:
            continue
        reply_ms = replies[request_id]
        legs[names[0]].append(usage_ms - s.sent_s * 1000)
        legs[names[1]].append(reply_ms - usage_ms)
        legs[names[2]].append(s.answered_s * 1000 - reply_ms)
        legs[names[3]].append((s.answered_s - s.sent_s) * 1000)
    return legs


def print_breakdown(rate: int, legs: dict[str, list[float]]) -> None:
    n = len(next(iter(legs.values())))
    print(f"where the time goes at {rate}/s ({n:,} checks joined by reservation id; record timestamps have 1 ms "
          f"resolution, so a leg can read -1 ms):")
    for name, values in legs.items():
        if len(values) < 2:
            print(f"  {name}: too few")
            continue
        qs = statistics.quantiles(values, n=100)
        print(f"  median {statistics.median(values):6.1f} ms   p99 {qs[98]:6.1f} ms   {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="200,1000", help="requests/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=15, help="per rate (the 401 baseline runs a third of it)")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",") if r]
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    settings = new_settings(bootstrap, Path(tempfile.mkdtemp(prefix="ledger-bench-checks-")))
    asyncio.run(ensure_topics(settings))
    store = ControlStore(settings.control_url)
    store.create_schema()
    limit = 2 * max(rates)
    with store.session() as session:
        tenant_id, key = session.create_tenant("bench")
        # The default (250/s, bursts of 500) would refuse 1,000/s: the benchmark's tenant gets its own.
        session.set_rate(tenant_id, limit, 2 * limit)
    port = free_port()
    env = {**os.environ, "LEDGER_HOME": str(settings.home), "LEDGER_NAMESPACE": settings.namespace,
           "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "LEDGER_API_PORT": str(port)}
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    api = subprocess.Popen([sys.executable, "-m", "ledger.cli.main", "api"], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = WorkerProcess(settings).start()
    results: list[tuple[int, Load, Load, dict[str, list[float]]]] = []
    try:
        base = f"http://127.0.0.1:{port}/api/v1"
        wait_for_http(f"http://127.0.0.1:{port}/docs", 60)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http:
            plan_id = http.post("/config/plans", json=PLAN).json()["plans"][0]["id"]
            for u in range(USERS):
                http.post("/users", json={"external_id": f"u{u}", "plan_id": plan_id,
                                          "period_start": "2026-01-01T00:00:00Z"})
        wait_processed(settings, worker)

        def body(n: int, reservation_id: str) -> dict[str, object]:
            return {"user": f"u{n % USERS}", "model": "m", "input_tokens": 500, "output_tokens": 200, "reserve": True,
                    "reservation_id": reservation_id}

        async def run(rate: int) -> tuple[Load, Load]:
            client = Connections(port, CONNECTIONS_MAX)
            try:
                await load(client, key, 20, 2, body, True)  # warm-up
                print(f"baseline: the same API answering 401 at {rate}/s for {args.seconds / 3:.0f} s")
                baseline = await load(client, key, rate, args.seconds / 3, body, False)
                print(f"checks with reservations at {rate}/s for {args.seconds:.0f} s (tenant limit {limit}/s)")
                checks = await load(client, key, rate, args.seconds, body, True)
                return baseline, checks
            finally:
                await client.close()

        for rate in rates:
            freeze_startup_heap()  # the client's own full collections would count as the API's latency
            baseline, checks = asyncio.run(run(rate))
            results.append((rate, baseline, checks, breakdown(bootstrap, settings.namespace, checks.sent)))
    finally:
        api.terminate()
        worker.stop()
        api.wait(timeout=30)
        delete_namespaces(bootstrap, {settings.namespace})

    print(f"\nload average before: {load_before}; after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs shared with the broker, the client, and other runs)")
    for rate, baseline, checks, _legs in results:
        print(f"at {rate}/s: baseline (401, no ledger round trip): {percentiles(baseline.latencies)}   "
              f"statuses {dict(sorted(baseline.statuses.items()))}")
        print(f"at {rate}/s: POST /check, reserve=true:            {percentiles(checks.latencies)}   "
              f"statuses {dict(sorted(checks.statuses.items()))}")
    for rate, _, _, legs in results:
        print_breakdown(rate, legs)


if __name__ == "__main__":
    main()
