"""Benchmark: webhook deliveries per second and their latency, next to bare signed POSTs.

Synthetic gate events are written to the gates topic while `ledger webhooks` runs;
a receiver on loopback verifies every delivery. The baseline makes the same number
of signed POSTs to the same receiver straight from httpx, with the same concurrency
as the delivery process gives one tenant (CONCURRENCY), measured in the same run. Prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from ledger.control.store import ControlStore, DeliveryState
from ledger.events import GateEvent
from ledger.settings import Settings
from ledger_sdk.webhooks import sign, verify
from streams.codecs import encode
from streams.topics import Topics, ensure_topics
from streams.webhooks import IN_FLIGHT_MAX, TENANT_IN_FLIGHT_MAX
from tests.conftest import ROOT, new_settings

WAIT_S_MAX = 600.0
# One tenant's deliveries: at most its share of the process's slots are in flight.
CONCURRENCY = min(IN_FLIGHT_MAX, TENANT_IN_FLIGHT_MAX)
SINGLE_EVENTS = 20


class Receiver:
    """Verifies every request; records when each webhook-id first arrived."""

    def __init__(self, secrets: dict[str, str]) -> None:
        self.secrets = secrets  # path -> secret
        self.arrived: dict[tuple[str, str], float] = {}
        self.refused = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a production receiver would

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                try:
                    verify(receiver.secrets[self.path], dict(self.headers.items()), body)
                    status = 204
                except Exception:
                    status = 401
                with receiver.lock:
                    if status == 204:
                        receiver.arrived.setdefault((self.path, self.headers["webhook-id"]), time.perf_counter())
                    else:
                        receiver.refused += 1
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # http.server's listen backlog of 5 resets connections under load
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def count(self, prefix: str = "") -> int:
        with self.lock:
            return sum(1 for _, msg_id in self.arrived if msg_id.startswith(prefix))


def gate(tenant: str, n: int, kind: str = "burst") -> GateEvent:
    return GateEvent(gate_id=f"{kind}-{n:06d}", tenant=tenant, user=f"u{n}", kind="hard_block",
                     dimension="period_spend", model=None, threshold=Decimal("1.00"), used=Decimal("1.000750000000"),
                     limit=Decimal("1.00"), scope="period:2026-11-01T00:00:00+00:00", plan_id="p", plan_version=1,
                     cause_event_id=f"e{n}", occurred_at=datetime.now(UTC))


async def write_gates(settings: Settings, events: list[GateEvent]) -> dict[str, float]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    written: dict[str, float] = {}
    try:
        topic = Topics.for_namespace(settings.namespace).gates
        for e in events:
            await producer.send(topic, encode(e), key=f"{e.tenant}/{e.user}".encode())
            written[e.gate_id] = time.perf_counter()
        await producer.flush()
    finally:
        await producer.stop()
    return written


async def bare_posts(receiver: Receiver, paths: dict[str, str], events: list[GateEvent]) -> float:
    """The baseline: the same signed POSTs, CONCURRENCY at a time, straight from httpx."""
    gate_limit = asyncio.Semaphore(CONCURRENCY)

    async def one(client: httpx.AsyncClient, path: str, secret: str, e: GateEvent) -> None:
        body = encode(e)
        msg_id = f"base-{e.gate_id}"
        async with gate_limit:
            ts = int(time.time())
            answer = await client.post(receiver.url(path), content=body, headers={
                "content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
                "webhook-signature": sign(secret, msg_id, ts, body)})
            assert answer.status_code == 204

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*[one(client, path, secret, e) for path, secret in paths.items() for e in events])
    return time.perf_counter() - started


def delivery_states(store: ControlStore, tenant_id: str) -> set[DeliveryState]:
    with store.session() as session:
        return {d.state for w in session.webhooks(tenant_id) for d in session.deliveries(tenant_id, w.id, 1000)}


async def delete_topics(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        ours = [t for t in await admin.list_topics() if t.startswith((f"{settings.namespace}.", f"{settings.namespace}-"))]
        if ours:
            await admin.delete_topics(ours)
    finally:
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--endpoints", type=int, default=2)
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    settings = new_settings(bootstrap, Path(tempfile.mkdtemp(prefix="ledger-bench-webhooks-")))
    asyncio.run(ensure_topics(settings))
    store = ControlStore(settings.control_url)
    store.create_schema()
    receiver = Receiver({})
    with store.session() as session:
        tenant_id, _ = session.create_tenant("bench")
        for n in range(args.endpoints):
            _, secret = session.create_webhook(tenant_id, receiver.url(f"/hooks/{n}"))
            receiver.secrets[f"/hooks/{n}"] = secret
    env = {**os.environ, "LEDGER_HOME": str(settings.home), "LEDGER_NAMESPACE": settings.namespace,
           "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "LEDGER_WEBHOOK_ALLOW_PRIVATE": "true"}
    log = open(settings.home / "webhooks.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "ledger.cli.main", "webhooks"], env=env, cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        # Warm-up: one delivery per endpoint, so the group has joined and the connections exist.
        asyncio.run(write_gates(settings, [gate(tenant_id, 0, "warm-up")]))
        deadline = time.monotonic() + WAIT_S_MAX
        while receiver.count("warm-up-") < args.endpoints:
            assert process.poll() is None and time.monotonic() < deadline, "warm-up delivery never arrived"
            time.sleep(0.1)

        # One event at a time: the latency of a gate event when nothing is queued.
        singles: list[float] = []
        for n in range(SINGLE_EVENTS):
            event = gate(tenant_id, n, "single")
            sent = asyncio.run(write_gates(settings, [event]))[event.gate_id]
            while not all((p, event.gate_id) in receiver.arrived for p in receiver.secrets):
                assert process.poll() is None and time.monotonic() < deadline, "a single event was not delivered"
                time.sleep(0.005)
            singles.append(max(receiver.arrived[(p, event.gate_id)] for p in receiver.secrets) - sent)

        events = [gate(tenant_id, n) for n in range(args.events)]
        total = args.events * args.endpoints
        started = time.perf_counter()
        written = asyncio.run(write_gates(settings, events))
        while receiver.count("burst-") < total:
            assert process.poll() is None and time.monotonic() < deadline, f"only {receiver.count('burst-')} arrived"
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        latencies = sorted(receiver.arrived[(p, e.gate_id)] - written[e.gate_id]
                           for p in receiver.secrets for e in events)
        # Outcomes are logged in batches: wait for the log to say what the receiver saw.
        while (states := delivery_states(store, tenant_id)) != {DeliveryState.delivered}:
            assert process.poll() is None and time.monotonic() < deadline, f"delivery log says {states}"
            time.sleep(0.1)
        baseline = asyncio.run(bare_posts(receiver, dict(receiver.secrets), events))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        receiver.server.shutdown()
        asyncio.run(delete_topics(settings))
        store.dispose()
    qs = statistics.quantiles(latencies, n=100)
    print(f"{args.events} gate events x {args.endpoints} endpoints = {total} deliveries, every one verified "
          f"(refused: {receiver.refused}); delivery log states: {sorted(s.value for s in states)}")
    print(f"ledger webhooks, a burst: {total / elapsed:7.0f} deliveries/s ({elapsed:.2f} s); written-to-verified "
          f"latency p50 {qs[49] * 1000:.0f} ms, p95 {qs[94] * 1000:.0f} ms, p99 {qs[98] * 1000:.0f} ms")
    print(f"one event at a time ({SINGLE_EVENTS}), written-to-verified at every endpoint: "
          f"median {statistics.median(singles) * 1000:.0f} ms, max {max(singles) * 1000:.0f} ms")
    print(f"baseline, bare signed POSTs ({CONCURRENCY} in flight): {total / baseline:7.0f} requests/s "
          f"({baseline:.2f} s)")


if __name__ == "__main__":
    main()
