"""The Faust app factory: the usage topic, the account table and the processor agent.

No app exists at import time; ``create_app`` builds one for the given settings,
so tests and several workers can each have their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import faust
from faust.tables.table import Table

from ledger.settings import Settings
from streams.codecs import STATE_CODEC
from streams.processor import Record, UsageProcessor, partition_of
from streams.topics import Topics

log = logging.getLogger(__name__)

BATCH_EVENTS_MAX = 2000
BATCH_WITHIN_S = 0.05
PROGRESS_LOG_EVERY_S = 10.0


class PartitionedTable(Table):
    """A table whose keys name their own partition (``"<partition>:..."``).

    Faust picks a changelog partition from the event being processed; the
    processor writes a whole batch after its outputs are acknowledged, outside
    any single event, so the key carries the partition instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Faust derives serializers from key/value *types* only; ours are named codecs.
        self.key_serializer = "json"
        self.value_serializer = STATE_CODEC

    def partition_for_key(self, key: Any) -> int:
        return partition_of(key)


def create_app(settings: Settings, worker_id: str = "0") -> faust.App:
    topics = Topics.for_namespace(settings.namespace)
    datadir = Path(settings.home) / "worker" / worker_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.namespace}-processor",
        broker=f"kafka://{settings.bootstrap}",
        store=settings.store,
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        producer_acks=-1,
        web_enabled=False,
    )
    usage = app.topic(topics.usage, key_serializer="raw", value_serializer="raw",
                      partitions=settings.partitions)
    table = app.tables.add(PartitionedTable(
        app=app, name="accounts", partitions=settings.partitions,
    ))
    processor = UsageProcessor(topics, table.get)
    totals: dict[str, int] = {}

    @app.agent(usage, name="ledger-processor")
    async def process_usage(stream: faust.StreamT) -> None:
        last_log = time.monotonic()
        async for events in stream.take_events(BATCH_EVENTS_MAX, within=BATCH_WITHIN_S):
            batch = processor.run(
                Record(e.message.topic, e.message.partition, e.message.offset, e.message.key, e.message.value)
                for e in events
            )
            # Outputs are durable before the state that says they happened: a
            # crash in between repeats them under the same ids, never loses them.
            pending = [await app.producer.send(topic, key, value, None, None, None)
                       for topic, key, value in batch.outputs]
            await asyncio.gather(*pending)
            for key, value in batch.writes.items():
                table[key] = value
            for what, n in batch.counts.items():
                totals[what] = totals.get(what, 0) + n
            if time.monotonic() - last_log > PROGRESS_LOG_EVERY_S:
                last_log = time.monotonic()
                log.info("processed so far: %s", totals)

    app.ledger_totals = totals  # type: ignore[attr-defined]
    return app


def run_worker(settings: Settings, worker_id: str = "0", loglevel: str = "info") -> None:
    """Run one worker in the foreground until it is stopped."""
    from streams.topics import ensure_topics

    asyncio.run(ensure_topics(settings))
    app = create_app(settings, worker_id)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
