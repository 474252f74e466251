"""A do-nothing Faust agent over a topic: Faust's own per-record ceiling, with none of our code in its path.

Run in its own process (tests/benchmarks/pipeline.py starts it): it reads ``--topic`` to the end offsets it saw
at start, then prints one JSON line with the records, the seconds from the first record to the last, and its own
CPU seconds over that span. Memory store, its own app id and consumer group (``<namespace>-faust-floor`` by
default, so the namespace's cleanup also deletes Faust's internal topics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.topics import partitions_of

BATCH_EVENTS_MAX = 5000  # as the processor takes them (streams/app.py)
BATCH_WITHIN_S = 0.01


async def _end_offsets(bootstrap: str, topic: str) -> int:
    parts = (await partitions_of(bootstrap, (topic,)))[topic]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in parts]
        ends = await consumer.end_offsets(tps)
        return sum(ends.values())
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--mode", choices=("take_events", "events"), default="take_events")
    args = parser.parse_args()

    expected = asyncio.run(_end_offsets(args.bootstrap, args.topic))
    app = faust.App(args.app_id, broker=f"kafka://{args.bootstrap}", store="memory://",
                    datadir=tempfile.mkdtemp(prefix="faust-floor-"), topic_partitions=args.partitions,
                    consumer_auto_offset_reset="earliest", web_enabled=False, table_standby_replicas=0)
    topic = app.topic(args.topic, key_serializer="raw", value_serializer="raw", partitions=args.partitions)
    seen: dict[str, Any] = {"n": 0, "first": None}

    def done() -> None:
        now, cpu = time.perf_counter(), time.process_time()
        first_t, first_cpu = seen["first"]
        print(json.dumps({"records": seen["n"], "expected": expected, "seconds": now - first_t,
                          "cpu_s": cpu - first_cpu, "mode": args.mode}), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # the worker's own graceful shutdown

    def counted(n: int) -> None:
        if seen["first"] is None:
            seen["first"] = (time.perf_counter(), time.process_time())
        seen["n"] += n
        if seen["n"] >= expected:
            done()

    @app.agent(topic, name="floor")
    async def floor(stream: faust.StreamT[Any]) -> None:
        if args.mode == "take_events":
            async for events in stream.take_events(BATCH_EVENTS_MAX, within=BATCH_WITHIN_S):  # type: ignore[attr-defined]
                counted(len(events))
        else:
            async for _event in stream.events():
                counted(1)

    if expected == 0:
        print(json.dumps({"records": 0, "expected": 0, "seconds": 0.0, "cpu_s": 0.0, "mode": args.mode}))
        return
    sys.argv = sys.argv[:1]
    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
