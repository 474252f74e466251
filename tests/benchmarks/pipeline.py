"""Benchmark: the processor's sustained rate end to end with one worker and with two
(separate processes, one consumer group), next to the raw rate of a plain aiokafka
consumer that reads and decodes the same topic in the same run (the ceiling).

Run with `make bench`. Prints figures; asserts nothing (these machines are noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from ledger.settings import Settings
from streams.codecs import decode_command
from streams.progress import end_offsets
from streams.topics import Topics, ensure_topics, partitions_of
from tests.conftest import WorkerProcess, delete_namespaces, free_port, new_settings
from tests.factories import T0, assigned, published, seed_plans, usage
from tests.kafka_io import publish

SAMPLE_EVERY_S = 0.25


def workload(users: int, events: int, seed: int = 1):
    rng = random.Random(seed)
    plans = seed_plans()
    names = {f"bench{i:05d}": ("free" if i % 2 else "pro") for i in range(users)}
    setup = [published(p) for p in plans.values()] + [assigned(u, plans[p]) for u, p in names.items()]
    calls = []
    for n in range(events):
        user = f"bench{n % users:05d}"
        model = "gpt-4o-mini" if names[user] == "free" else rng.choice(["gpt-4o-mini", "gpt-4o"])
        calls.append(usage(user, n, model=model, input_tokens=rng.randint(0, 2000), output_tokens=rng.randint(0, 800),
                           at=T0 + timedelta(milliseconds=10 * n)))
    return setup, calls


async def raw_consume_rate(settings: Settings, topic: str) -> tuple[int, float]:
    """Read the whole topic with a bare consumer, decoding every record as the processor does."""
    parts = (await partitions_of(settings.bootstrap, (topic,)))[topic]
    tps = [TopicPartition(topic, p) for p in parts]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            await consumer.seek_to_beginning(tp)
        total, started = 0, time.perf_counter()
        remaining = sum(ends.values())
        while remaining > 0:
            for _tp, records in (await consumer.getmany(timeout_ms=500, max_records=10_000)).items():
                for record in records:
                    decode_command(record.value)
                total += len(records)
                remaining -= len(records)
        return total, time.perf_counter() - started
    finally:
        await consumer.stop()


@dataclass
class Run:
    sustained: float  # events/s between 10% and 90% of the output, once the group has settled
    total_s: float  # from the workers' start until the last entry
    settled_s: float  # from the workers' start until every partition had its owner
    shares: list[float]  # events each worker processed
    cpu_s: float  # CPU seconds (user + system) the workers used, start to finish


def _ready_partitions(port: int) -> int | None:
    """Usage partitions the worker owns once it says it is ready, else None."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    except httpx.TransportError:
        return None
    match = re.search(r"(\d+) usage partition", answer.text)
    return int(match.group(1)) if answer.status_code == 200 and match else None


def _processed(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "ledger_events_processed_total")


def processor_rate(settings: Settings, expected_entries: int, workers: int = 1, standby_replicas: int = 1,
                   timeout_s: float = 900) -> Run:
    """Start ``workers`` worker processes in one consumer group and time the entries they produce."""
    topics = Topics.for_namespace(settings.namespace)
    ports = [free_port() for _ in range(workers)]
    procs = [WorkerProcess(settings, str(i), env={"LEDGER_METRICS_PORT": str(port),
                                                  "LEDGER_STANDBY_REPLICAS": str(standby_replicas)}).start()
             for i, port in enumerate(ports)]
    started = time.perf_counter()
    samples: list[tuple[float, int]] = []
    settled_at: float | None = None
    try:
        while True:
            produced = sum(asyncio.run(end_offsets(settings, (topics.entries,))).values())
            now = time.perf_counter()
            samples.append((now, produced))
            if settled_at is None:
                owned = [_ready_partitions(port) for port in ports]
                if all(n is not None for n in owned) and sum(n or 0 for n in owned) == settings.partitions:
                    settled_at = now
            if produced >= expected_entries:
                break
            if not all(p.alive() for p in procs) or now - started > timeout_s:
                raise RuntimeError(f"workers stalled at {produced}/{expected_entries}\n{procs[0].log_tail()}")
            time.sleep(SAMPLE_EVERY_S)
        shares = [_processed(port) for port in ports]
        cpu_s = sum(_cpu_seconds(proc) for proc in procs)
    finally:
        for proc in procs:
            proc.stop()
    if settled_at is None:
        settled_at = samples[-1][0]
    low = next(s for s in samples if s[1] >= 0.1 * expected_entries and s[0] >= settled_at)
    high = next((s for s in samples if s[1] >= 0.9 * expected_entries and s[0] > low[0]), samples[-1])
    return Run(sustained=(high[1] - low[1]) / (high[0] - low[0]) if high[0] > low[0] else float("nan"),
               total_s=samples[-1][0] - started, settled_s=settled_at - started, shares=shares, cpu_s=cpu_s)


def _cpu_seconds(worker: WorkerProcess) -> float:
    """User + system CPU time of a live worker process, from /proc (Linux)."""
    assert worker.proc is not None
    fields = Path(f"/proc/{worker.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fresh_namespace(bootstrap: str, home: Path, setup: list, calls: list) -> tuple[Settings, float]:  # type: ignore[type-arg]
    """A new namespace holding the workload; returns it and the publish time."""
    settings = new_settings(bootstrap, home)
    asyncio.run(ensure_topics(settings))
    t = time.perf_counter()
    publish(settings, setup)
    publish(settings, calls)
    return settings, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=2_000)
    args = parser.parse_args()

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    home = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    setup, calls = workload(args.users, args.events)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    # One namespace per run: each run's group starts from offset 0 and writes its own entries topic.
    one, publish_s = fresh_namespace(bootstrap, home / "one", setup, calls)
    two, _ = fresh_namespace(bootstrap, home / "two", setup, calls)
    two_bare, _ = fresh_namespace(bootstrap, home / "two-bare", setup, calls)
    try:
        raw_n, raw_s = asyncio.run(raw_consume_rate(one, Topics.for_namespace(one.namespace).usage))
        runs = {"1 worker": processor_rate(one, args.events, workers=1),
                "2 workers": processor_rate(two, args.events, workers=2),
                "2 workers, no standby": processor_rate(two_bare, args.events, workers=2, standby_replicas=0)}
    finally:  # 200k records per namespace, on a shared broker
        delete_namespaces(bootstrap, {one.namespace, two.namespace, two_bare.namespace})
    raw = raw_n / raw_s

    print(f"\nworkload: {args.events:,} usage events over {args.users:,} users, {one.partitions} partitions, "
          f"{os.cpu_count()} CPUs shared with the broker (and anyone else on the machine)")
    print(f"publish (aiokafka producer, acks=all):        {args.events / publish_s:>10,.0f} events/s")
    print(f"ceiling: raw aiokafka consume + decode:       {raw:>10,.0f} events/s (one consumer, same topic)")
    print(f"load average before the runs:                 {load_before}")
    for name, run in runs.items():
        split = " / ".join(f"{n:,.0f}" for n in run.shares)
        print(f"processor, {name + ',':<22} sustained (10%..90%): {run.sustained:>8,.0f} events/s "
              f"= {run.sustained / raw:.1%} of the ceiling, {run.sustained / runs['1 worker'].sustained:.2f}x one worker; "
              f"whole run {run.total_s:.1f} s, group settled after {run.settled_s:.1f} s; records per worker {split}; "
              f"{run.cpu_s:.0f} worker CPU-s = {args.events / run.cpu_s:,.0f} events per CPU-s")
    print(f"load average after the runs:                  {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"(other processes share these CPUs: compare within a run, not across runs)")


if __name__ == "__main__":
    main()
