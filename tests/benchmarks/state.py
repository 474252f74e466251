"""Benchmark: one worker's memory with many users of one event each, next to the same worker on an empty log.

Publishes the seed plans, then per user a PlanAssigned and one UsageRecorded (batched straight onto the usage
log, partitioned by key as every producer of ours does), runs one worker until the entries topic holds an entry
per user, and reads VmRSS and VmHWM from /proc/<pid>/status. The baseline is the same worker, started on an
empty namespace in the same run, once it owns every partition. Prints figures; asserts nothing.

    python -m tests.benchmarks.state --users 1000000   # the issue's figure (see docs/benchmarks.md for its time)
    python -m tests.benchmarks.state --users 100000    # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from ledger.events import user_key
from ledger.settings import Settings
from streams.codecs import encode
from streams.progress import end_offsets
from streams.topics import Topics, ensure_topics
from tests.benchmarks.observe import cpu_seconds, memory_mb
from tests.benchmarks.pipeline import STATE_SETTLE_S, _ready_partitions
from tests.conftest import WorkerProcess, delete_namespaces, free_port, new_settings
from tests.factories import T0, TENANT, assigned, published, seed_plans, usage
from tests.kafka_io import publish

BATCH_BYTES = 512 * 1024
PROGRESS_EVERY_S = 30.0
READY_TIMEOUT_S = 180.0


def records(users: int) -> Iterator[tuple[bytes, bytes]]:
    """Per user, its plan assignment and then its one usage event (same key: same partition, in this order)."""
    plans = seed_plans()
    free, pro = plans["free"], plans["pro"]
    for i in range(users):
        user = f"u{i:07d}"
        key = user_key(TENANT, user).encode()
        yield key, encode(assigned(user, pro if i % 2 else free))
        yield key, encode(usage(user, 0, input_tokens=100 + i % 900, output_tokens=50 + i % 400,
                                at=T0 + timedelta(seconds=1 + i // 1000)))


async def publish_bulk(settings: Settings, rows: Iterator[tuple[bytes, bytes]]) -> int:
    """Whole batches per partition, one in flight per partition (so each partition keeps the order of ``rows``),
    without a future per record: about ten times the rate of one ``send`` per record."""
    topic = Topics.for_namespace(settings.namespace).usage
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all", max_batch_size=BATCH_BYTES,
                                max_request_size=2 * BATCH_BYTES)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        partitioner = DefaultPartitioner()
        batches = {p: producer.create_batch() for p in partitions}
        in_flight: dict[int, asyncio.Future[object]] = {}
        sent = 0

        async def flush(p: int) -> None:
            if p in in_flight:
                await in_flight[p]
            batches[p].close()
            in_flight[p] = await producer.send_batch(batches[p], topic, partition=p)
            batches[p] = producer.create_batch()

        for key, value in rows:
            p = partitioner(key, partitions, partitions)
            if batches[p].append(key=key, value=value, timestamp=None) is None:
                await flush(p)
                if batches[p].append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"a record of {len(value)} bytes is larger than a batch")
            sent += 1
        for p in partitions:
            if batches[p].record_count():
                await flush(p)
        for fut in in_flight.values():
            await fut
        return sent
    finally:
        await producer.stop()


def rss_when_ready(settings: Settings, label: str) -> dict[str, float]:
    """A worker on ``settings``'s namespace, once it owns every partition (and a moment after)."""
    port = free_port()
    worker = WorkerProcess(settings, label, env={"LEDGER_METRICS_PORT": str(port)}).start()
    assert worker.proc is not None
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while _ready_partitions(port) != settings.partitions:
            if not worker.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the worker was not ready\n{worker.log_tail()}")
            time.sleep(0.5)
        time.sleep(STATE_SETTLE_S)
        return memory_mb(worker.proc.pid)
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()
    logging.getLogger("aiokafka").setLevel(logging.ERROR)

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    home = Path(tempfile.mkdtemp(prefix="ledger-bench-state-"))
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    empty = new_settings(bootstrap, home / "empty")
    full = new_settings(bootstrap, home / "full")
    try:
        asyncio.run(ensure_topics(empty))
        baseline = rss_when_ready(empty, "empty")

        asyncio.run(ensure_topics(full))
        t = time.perf_counter()
        publish(full, [published(p) for p in seed_plans().values()])
        sent = asyncio.run(publish_bulk(full, records(args.users)))
        publish_s = time.perf_counter() - t
        print(f"published {sent:,} records in {publish_s:.0f} s ({sent / publish_s:,.0f}/s)", file=sys.stderr, flush=True)

        port = free_port()
        worker = WorkerProcess(full, "0", env={"LEDGER_METRICS_PORT": str(port)}).start()
        assert worker.proc is not None
        pid, started = worker.proc.pid, time.perf_counter()
        entries_topic = Topics.for_namespace(full.namespace).entries
        try:
            last_print = started
            while (produced := sum(asyncio.run(end_offsets(full, (entries_topic,))).values())) < args.users:
                now = time.perf_counter()
                if not worker.alive() or now - started > args.timeout_s:
                    raise RuntimeError(f"worker stalled at {produced:,}/{args.users:,} entries\n{worker.log_tail()}")
                if now - last_print > PROGRESS_EVERY_S:
                    print(f"  {now - started:5.0f} s: {produced:,} entries, RSS {memory_mb(pid)['VmRSS']:,.0f} MB",
                          file=sys.stderr, flush=True)
                    last_print = now
                time.sleep(1)
            run_s = time.perf_counter() - started
            time.sleep(STATE_SETTLE_S)
            loaded, cpu = memory_mb(pid), cpu_seconds(pid)
        finally:
            worker.stop()
    finally:
        delete_namespaces(bootstrap, {empty.namespace, full.namespace})

    grown = loaded["VmRSS"] - baseline["VmRSS"]
    print(f"\nworker memory with {args.users:,} users of one event each ({2 * args.users:,} usage-log records, "
          f"{full.partitions} partitions, memory store, one worker)")
    print(f"load average before: {load_before}; after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs shared with the broker and other runs)")
    print(f"publish (batched aiokafka producer):  {sent / publish_s:>10,.0f} records/s")
    after = f"after {args.users:,} users:"
    print(f"{'baseline, empty namespace:':<38}VmRSS {baseline['VmRSS']:>8,.0f} MB   VmHWM {baseline['VmHWM']:>8,.0f} MB")
    print(f"{after:<38}VmRSS {loaded['VmRSS']:>8,.0f} MB   VmHWM {loaded['VmHWM']:>8,.0f} MB"
          f"   = {grown * 1024 * 1024 / args.users:,.0f} bytes of RSS per user over the baseline")
    print(f"run to the last entry: {run_s:.0f} s ({2 * args.users / run_s:,.0f} records/s, "
          f"{cpu * 1e6 / (2 * args.users):,.0f} CPU µs per record over the whole process)")


if __name__ == "__main__":
    main()
