"""Benchmark: the processor's sustained rate end to end, next to the raw rate of
a plain aiokafka consumer that reads and decodes the same topic in the same run.

Run with `make bench`. Prints figures; asserts nothing (these machines are noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from ledger.settings import Settings
from streams.codecs import decode_command
from streams.progress import end_offsets
from streams.topics import Topics, ensure_topics, partitions_of
from tests.conftest import WorkerProcess, new_settings
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


def processor_rate(settings: Settings, expected_entries: int, timeout_s: float = 900) -> tuple[float, float]:
    """(sustained events/s between 10% and 90% of the output, total seconds from worker start)."""
    topics = Topics.for_namespace(settings.namespace)
    worker = WorkerProcess(settings).start()
    started = time.perf_counter()
    samples: list[tuple[float, int]] = []
    try:
        while True:
            produced = sum(asyncio.run(end_offsets(settings, (topics.entries,))).values())
            samples.append((time.perf_counter(), produced))
            if produced >= expected_entries:
                break
            if not worker.alive() or time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"worker stalled at {produced}/{expected_entries}\n{worker.log_tail()}")
            time.sleep(SAMPLE_EVERY_S)
    finally:
        worker.stop()
    low = next(s for s in samples if s[1] >= 0.1 * expected_entries)
    high = next(s for s in samples if s[1] >= 0.9 * expected_entries)
    return (high[1] - low[1]) / (high[0] - low[0]), samples[-1][0] - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=2_000)
    args = parser.parse_args()

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    settings = new_settings(bootstrap, Path(tempfile.mkdtemp(prefix="ledger-bench-")))
    asyncio.run(ensure_topics(settings))
    setup, calls = workload(args.users, args.events)
    t = time.perf_counter()
    publish(settings, setup)
    publish(settings, calls)
    publish_s = time.perf_counter() - t
    topic = Topics.for_namespace(settings.namespace).usage

    raw_n, raw_s = asyncio.run(raw_consume_rate(settings, topic))
    sustained, total_s = processor_rate(settings, args.events)

    print(f"\nworkload: {args.events:,} usage events over {args.users:,} users, {settings.partitions} partitions")
    print(f"publish (aiokafka producer, acks=all):        {args.events / publish_s:>10,.0f} events/s")
    print(f"baseline: raw aiokafka consume + decode:      {raw_n / raw_s:>10,.0f} events/s")
    print(f"processor, sustained (10%..90% of output):    {sustained:>10,.0f} events/s")
    print(f"processor, whole run incl. start and restore: {args.events / total_s:>10,.0f} events/s ({total_s:.1f} s)")
    print(f"processor / baseline:                         {sustained / (raw_n / raw_s):>10.1%}")


if __name__ == "__main__":
    main()
