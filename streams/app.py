"""The Faust app factory: the usage topic, the account table and the processor agent.

No app exists at import time; ``create_app`` builds one for the given settings,
so tests and several workers can each have their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
from faust.stores.memory import Store as MemoryStore
from faust.tables.table import Table
from prometheus_client import CollectorRegistry

from ledger.events import ClockTicked
from ledger.settings import Settings
from streams.codecs import STATE_CODEC, encode
from streams.metrics import HealthServer, WorkerMetrics
from streams.processor import Record, UsageProcessor, partition_of
from streams.publisher import CLOCK_KEY
from streams.topics import Topics

log = logging.getLogger(__name__)

BATCH_EVENTS_MAX = 5000
BATCH_WITHIN_S = 0.01  # an idle stream answers checks within ~10 ms; a backlog still fills whole batches
# The account changelog is compacted eagerly: a restart restores roughly one
# record per user, not one per batch that touched the user.
CHANGELOG_CONFIGS = {
    "segment.bytes": str(8 * 1024 * 1024),
    "segment.ms": str(60_000),
    "min.cleanable.dirty.ratio": "0.05",
    "delete.retention.ms": str(60_000),
}
PROGRESS_LOG_EVERY_S = 10.0
SESSION_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 1.0
HEALTH_SAMPLE_S = 1.0


class StandbyMemoryStore(MemoryStore):
    """The in-memory store, keeping what a standby has read so that a takeover reads only the changelog's tail.

    faust-streaming 0.15.3's memory store drops a standby partition's keys when
    recovery completes and reports no offset, so a worker taking a partition over
    re-read its whole changelog even with standby replicas. Here a partition's keys
    stay while it is assigned to this worker (active or standby), and the offset of
    the last changelog record applied to it is its persisted offset: Faust's
    recovery starts reading there. A partition no longer assigned is forgotten,
    keys and offset, so it is read from the start if it ever comes back.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._applied: dict[int, int] = {}  # changelog partition -> offset of the last record applied

    def apply_changelog_batch(self, batch: Iterable[Any], to_key: Any, to_value: Any) -> None:
        events = list(batch)
        super().apply_changelog_batch(events, to_key, to_value)
        for event in events:
            partition, offset = event.message.partition, event.message.offset
            self._applied[partition] = max(self._applied.get(partition, -1), offset)

    def persisted_offset(self, tp: Any) -> int | None:
        return self._applied.get(tp.partition)

    def written(self, partition: int, offset: int) -> None:
        """The processor's own write reached the changelog: a later recovery need not read up to it again."""
        self._applied[partition] = max(self._applied.get(partition, -1), offset)

    async def on_recovery_completed(self, active_tps: set[Any], standby_tps: set[Any]) -> None:
        kept = {tp.partition for tp in active_tps | standby_tps}
        # The processor writes keys itself, so Faust's key->partition index misses them: the key names its partition.
        for key in [k for k in self.data if partition_of(k) not in kept]:
            del self.data[key]
        self._key_partition = {k: p for k, p in self._key_partition.items() if p in kept}
        self._applied = {p: o for p, o in self._applied.items() if p in kept}


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

    def _new_store_by_url(self, url: Any) -> Any:
        if not str(url).startswith("memory:"):
            return super()._new_store_by_url(url)
        return StandbyMemoryStore(url, self.app, self, table_name=self.name, key_type=self.key_type,
                                  key_serializer=self.key_serializer, value_serializer=self.value_serializer,
                                  value_type=self.value_type, loop=self.loop, options=self.options)


def create_app(settings: Settings, worker_id: str = "0", metrics: WorkerMetrics | None = None) -> faust.App:
    topics = Topics.for_namespace(settings.namespace)
    metrics = metrics or WorkerMetrics(CollectorRegistry())
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
        # A standby worker follows each table partition's changelog, ready to take it over.
        table_standby_replicas=settings.standby_replicas,
        # A worker killed with -9 holds its partitions until the group notices it
        # is gone; 60 s (Faust's default) made every failover wait that long.
        broker_session_timeout=SESSION_TIMEOUT_S,
        broker_heartbeat_interval=HEARTBEAT_INTERVAL_S,
    )
    usage = app.topic(topics.usage, key_serializer="raw", value_serializer="raw",
                      partitions=settings.partitions)
    table = app.tables.add(PartitionedTable(
        app=app, name="accounts", partitions=settings.partitions, extra_topic_configs=CHANGELOG_CONFIGS,
    ))
    processor = UsageProcessor(topics, table.get,
                               lambda prefix: ((k, v) for k, v in table.data.items() if k.startswith(prefix)))
    changelog = table.changelog_topic.get_topic_name()
    totals: Counter[str] = Counter()
    next_offsets: dict[int, int] = {}  # per usage partition: the offset after the last record processed

    @app.agent(usage, name="ledger-processor")
    async def process_usage(stream: faust.StreamT) -> None:
        last_log = time.monotonic()
        state_sends: list[asyncio.Future[Any]] = []
        async for events in stream.take_events(BATCH_EVENTS_MAX, within=BATCH_WITHIN_S):
            started = time.perf_counter()
            _raise_failed(state_sends)
            batch = processor.run(
                Record(e.message.topic, e.message.partition, e.message.offset, e.message.key, e.message.value)
                for e in events
            )
            # Outputs are durable before the state that says they happened: a
            # crash in between repeats them under the same ids, never loses them.
            outputs = await _send(app, ((topic, key, value, None) for topic, key, value in batch.outputs))
            await asyncio.gather(*outputs)
            # The state need not be awaited here: Faust flushes the producer
            # before it commits the offsets of these events.
            state_sends = await _send(app, ((changelog, encode(key), encode(value), partition_of(key))
                                            for key, value in batch.writes.items()))
            if isinstance(table.data, StandbyMemoryStore):
                for fut in state_sends:
                    fut.add_done_callback(_note_written(table.data))
            for key, value in batch.writes.items():
                table.data[key] = value
            next_offsets.update(batch.next_offsets)
            totals.update(batch.results)
            metrics.count(batch.results, batch.dead_letters, batch.gates)
            metrics.batch_events.observe(len(events))
            metrics.batch_seconds.observe(time.perf_counter() - started)
            if time.monotonic() - last_log > PROGRESS_LOG_EVERY_S:
                last_log = time.monotonic()
                log.info("processed so far: %s", dict(totals))

    @app.timer(HEALTH_SAMPLE_S)
    async def sample_health() -> None:
        """Lag per assigned partition and the readiness verdict, computed on the loop for the HTTP thread."""
        try:
            _sample_health()
        except Exception as exc:  # an exception in a timer would stop the worker: a probe must never do that
            log.warning("health sample failed: %r", exc)
            metrics.health.beat(False, f"health sample failed: {type(exc).__name__}")

    def _sample_health() -> None:
        usage_topic = usage.get_topic_name()
        assigned = {tp.partition: tp for tp in app.consumer.assignment() if tp.topic == usage_topic}
        for gone in next_offsets.keys() - assigned.keys():  # a partition that comes back starts afresh
            del next_offsets[gone]
        lags = {}
        for p, tp in assigned.items():
            end = app.consumer.highwater(tp)
            if end is not None and p in next_offsets:
                lags[(usage_topic, p)] = end - next_offsets[p]
        metrics.lag.set(lags)
        recovery = app.tables.recovery
        if not recovery.completed.is_set() or recovery.in_recovery:
            metrics.health.beat(False, "restoring the account table")
        elif app.rebalancing:
            metrics.health.beat(False, "rebalancing")
        else:
            metrics.health.beat(True, f"{len(assigned)} usage partition(s) assigned")

    if settings.tick_seconds > 0:
        @app.timer(settings.tick_seconds, on_leader=True)
        async def tick() -> None:
            """Time enters the log as events, so a period ends (and its blocks lift) without traffic."""
            now = datetime.now(UTC)
            value = encode(ClockTicked(event_id=f"tick-{now.isoformat()}", occurred_at=now))
            partitions = app.consumer.topic_partitions(usage.get_topic_name()) or settings.partitions
            await asyncio.gather(*await _send(app, ((topics.usage, CLOCK_KEY, value, p) for p in range(partitions))))

    return app


async def _send(app: faust.App, messages: Iterable[tuple[str, bytes | None, bytes, int | None]]
                ) -> list[asyncio.Future[Any]]:
    """Hand messages to the producer; the futures resolve when the broker has each.

    Table values are written to the changelog here rather than through
    ``table[key] = value``: Faust's send-soon buffer sends one message per
    event-loop turn and throttled the processor to a third of this rate.
    """
    return [await app.producer.send(topic, key, value, partition, None, None)
            for topic, key, value, partition in messages]


def _note_written(store: StandbyMemoryStore) -> Callable[[asyncio.Future[Any]], None]:
    def done(fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            metadata = fut.result()
            store.written(metadata.partition, metadata.offset)
    return done


def _raise_failed(sends: list[asyncio.Future[Any]]) -> None:
    """Crash the agent (and so the worker) if a state write failed: never run ahead of the changelog."""
    for fut in sends:
        if fut.done() and not fut.cancelled() and fut.exception() is not None:
            raise RuntimeError("writing the account changelog failed") from fut.exception()


def run_worker(settings: Settings, worker_id: str = "0", loglevel: str = "info") -> None:
    """Run one worker in the foreground until it is stopped."""
    from streams.topics import ensure_topics

    asyncio.run(ensure_topics(settings))
    metrics = WorkerMetrics(CollectorRegistry())
    app = create_app(settings, worker_id, metrics)
    if settings.metrics_port:
        HealthServer.for_metrics(settings.metrics_host, settings.metrics_port, metrics).start()
    # aiokafka logs a debug record per message sent; building them cost ~7% of the worker.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
