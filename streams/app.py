"""The Faust app factory: the usage topic, the account table and the processor agent, and the
partition ledger that applies records in offset order and owns each partition's position.

No app exists at import time; ``create_app`` builds one for the given settings,
so tests and several workers can each have their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import ProducerFenced
from faust.stores.memory import Store as MemoryStore
from faust.tables.table import Table
from prometheus_client import CollectorRegistry

from ledger.events import ClockTicked
from ledger.heap import freeze_startup_heap
from ledger.settings import Settings
from streams.codecs import STATE_CODEC, encode, table_form
from streams.faust_consumer import READ_COMMITTED, RecordLane, RewindingConsumer
from streams.metrics import HealthServer, WorkerMetrics
from streams.outputs import OutputProducer
from streams.pending import PendingState
from streams.processor import ALREADY_APPLIED, RECORD_BYTES_MAX, Batch, Record, UsageProcessor, merged
from streams.publisher import CLOCK_KEY
from streams.queries import QUERY_WAIT_S_MAX, query_decoder
from streams.state import Position, partition_of, position_key, tail_key
from streams.take import Window, take_events
from streams.topics import ACCOUNTS_TABLE, MESSAGE_BYTES, MESSAGE_BYTES_MIN, Topics, processor_app_id

log = logging.getLogger(__name__)

BATCH_EVENTS_MAX = 5000
# A batch gathers for 2 ms while batches are small: an idle stream takes a check up within 2 ms. After a batch
# of 8 records or more (a backlog: 2 ms at full speed deliver 15 to 20), the next gathers for 25 ms, so each
# batch's state transactions serve hundreds of records (see streams.take).
BATCH_WINDOW = Window(short_s=0.002, long_s=0.025, grow_at=8)
# The account changelog is compacted eagerly: a restart restores roughly one
# record per user, not one per batch that touched the user.
CHANGELOG_CONFIGS = {
    "segment.bytes": str(8 * 1024 * 1024),
    "segment.ms": str(60_000),
    "min.cleanable.dirty.ratio": "0.05",
    "delete.retention.ms": str(60_000),
    **MESSAGE_BYTES,
}
PROGRESS_LOG_EVERY_S = 10.0
SESSION_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 1.0
HEALTH_SAMPLE_S = 1.0
# Faust's periodic commits are left for revocations only: the processor commits its durable position.
FAUST_COMMIT_INTERVAL_S = 3600.0
FAUST_COMMIT_EVERY = 1_000_000_000
CATCH_UP_S = 1.0  # how often durable positions are committed and an idle partition's tail is checked
CATCH_UP_IDLE_S = 5.0  # no delivery for this long while the log has more: fetch it ourselves
COMMIT_TIMEOUT_S = 5.0
REFETCH_POLL_MS = 500
QUERIES_WAITING_MAX = 10_000  # the API's own bound on waiting requests
# Folded batches waiting for the writer while it stores the ones before; the applier waits past this. The writer
# stores all it finds queued in one transaction per partition, so the transactions per event fall as the load
# grows: writing each batch on its own, a busy stream folded 2 ms batches of a few records that each paid a
# transaction per partition (1.4 events per transaction, a tenth of the Faust floor; docs/benchmarks.md).
WRITES_QUEUED_MAX = 64
# And at most this many records in them (a batch is a whole fetch, up to BATCH_EVENTS_MAX records): the folded
# state, outputs and records of a queued batch stay in memory until it is stored, and 64 batches of 5,000 records
# took a worker with 1,000,000 users from 1.5 GB to 2.5 GB of RSS. Fewer records per stored group cost CPU
# (accounts written more often): 8 batches of up to 5,000 made 1.6 GB, at 20% less throughput (docs/benchmarks.md).
WRITES_QUEUED_RECORDS_MAX = 40_000
# The writer stores at most this often while it keeps up: a state transaction costs the broker and the worker
# several requests per partition, and at a few hundred checks/s over 12 partitions nearly every batch paid one of
# its own. Checks' answers never wait for it (they go out with the batch's outputs); a spend query waiting for a
# position, or a full queue, has the writer store at once. At 200 checks/s, storing every 100 ms instead of after
# every batch took broker CPU from 49% to 30%, the worker from 61% to 44%, and check p50 from 9.0 to 4.6 ms. Each
# store is still a burst (about 0.7 ms of the loop per partition written, 12 at once), and a check folded behind
# one waited for it: every 500 ms, the checks over 20 ms fell from 214 and 136 to 121 and 60 of 6,000 (two pairs of
# runs; docs/benchmarks.md). A crash repeats at most this much more from the log, and at a revocation what was
# folded and not yet stored (at most this much) is dropped and folded again by the partition's next owner.
STATE_WRITE_EVERY_S = 0.5
# A producer's request must hold any record the processor lets through (RECORD_BYTES_MAX) with aiokafka's framing.
PRODUCER_REQUEST_BYTES_MAX = RECORD_BYTES_MAX + 64 * 1024


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
        # Faust's own version also indexes every key's partition (a dict entry per key, a tenth of a
        # million-user worker's memory); our keys name their partition, so the index is not kept.
        for event in batch:
            key, message = to_key(event.key), event.message
            if message.value is None:  # a tombstone
                self.data.pop(key, None)
            else:
                self.data[key] = to_value(event.value)
            self._applied[message.partition] = max(self._applied.get(message.partition, -1), message.offset)

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
        processor_app_id(settings.namespace),
        broker=f"kafka://{settings.bootstrap}",
        store=settings.store,
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        producer_acks=-1,
        # Outputs and tails go through Faust's producer: it must take any record the processor lets through.
        producer_max_request_size=PRODUCER_REQUEST_BYTES_MAX,
        web_enabled=False,
        # A standby worker follows each table partition's changelog, ready to take it over.
        table_standby_replicas=settings.standby_replicas,
        # A worker killed with -9 holds its partitions until the group notices it
        # is gone; 60 s (Faust's default) made every failover wait that long.
        broker_session_timeout=SESSION_TIMEOUT_S,
        broker_heartbeat_interval=HEARTBEAT_INTERVAL_S,
        # The processor commits the durable position itself (PartitionLedger._commit); Faust's own commits
        # of acknowledged offsets would run ahead of it, and are only left for revocations.
        broker_commit_interval=FAUST_COMMIT_INTERVAL_S,
        broker_commit_every=FAUST_COMMIT_EVERY,
    )
    usage = app.topic(topics.usage, key_serializer="raw", value_serializer="raw",
                      partitions=settings.partitions)
    # Faust's consumer, reading committed, with its dropped-message bug fixed; the usage topic's records
    # leave it in whole fetches (the lane) rather than through its per-message path.
    lane = RecordLane(usage.get_topic_name())
    app.transport.Consumer = RewindingConsumer.with_lane(lane)
    table = app.tables.add(PartitionedTable(
        app=app, name=ACCOUNTS_TABLE, partitions=settings.partitions, extra_topic_configs=CHANGELOG_CONFIGS,
    ))
    pending = PendingState(lambda: table.data)
    processor = UsageProcessor(topics, pending.get, pending.scan, partitions=settings.partitions)
    ledger = PartitionLedger(app, settings, usage.get_topic_name(), table, processor, pending, metrics,
                             FaultHooks.from_env())

    @app.agent(usage, name="ledger-processor")
    async def process_usage(stream: faust.StreamT) -> None:
        """Subscribes the group to the usage topic (its partitions and the table's are assigned together).
        Its records come through the lane (``apply_fetched``); any Faust delivers itself are applied here."""
        async for events in take_events(stream, BATCH_EVENTS_MAX, BATCH_WINDOW):
            records = [Record(e.message.topic, e.message.partition, e.message.offset, e.message.key, e.message.value)
                       for e in events]
            await ledger.guarded(ledger.apply(records))

    @app.task
    async def apply_fetched() -> None:
        """The usage records of each fetch, applied in order, at most BATCH_EVENTS_MAX at a time."""
        while True:
            fetched = await lane.get()
            generation = lane.generation
            records = [Record(m.topic, m.partition, m.offset, m.key, m.value) for batch in fetched for m in batch]
            for start in range(0, len(records), BATCH_EVENTS_MAX):
                if lane.generation != generation:  # a revocation meanwhile: the records come again after it
                    break
                await ledger.guarded(ledger.apply(records[start:start + BATCH_EVENTS_MAX]))

    queries = app.topic(topics.queries, key_serializer="raw", value_serializer="raw", partitions=settings.partitions)

    @app.agent(queries, name="ledger-queries")
    async def answer_queries(stream: faust.StreamT) -> None:
        """Spend queries, answered from live state once their user's partition is applied far enough."""
        async for event in stream.events():
            ledger.answer_later(event.message.partition, event.message.value)

    @app.on_partitions_assigned.connect
    async def claim_assigned(app: faust.App, assigned: set[Any], **kwargs: Any) -> None:
        await ledger.claim({tp.partition for tp in assigned if tp.topic == usage.get_topic_name()})

    @app.on_partitions_revoked.connect
    async def forget_revoked(app: faust.App, revoked: set[Any], **kwargs: Any) -> None:
        lane.clear()
        ledger.forget({tp.partition for tp in revoked if tp.topic == usage.get_topic_name()})

    @app.timer(CATCH_UP_S)
    async def catch_up() -> None:
        """Apply records that Faust has not delivered although they are in the log, and commit durable positions."""
        await ledger.guarded(ledger.catch_up())

    @app.task
    async def settle_heap() -> None:
        """Once the first recovery is done, what the worker holds then is kept out of full collections."""
        while not ledger.recovered():
            await asyncio.sleep(1.0)
        freeze_startup_heap()

    @app.timer(HEALTH_SAMPLE_S)
    async def sample_health() -> None:
        """Lag per assigned partition and the readiness verdict, computed on the loop for the HTTP thread."""
        try:
            _sample_health()
        except Exception as exc:  # an exception in a timer would stop the worker: a probe must never do that
            log.warning("health sample failed: %r", exc)
            metrics.health.beat(False, f"health sample failed: {type(exc).__name__}")

    def _sample_health() -> None:
        assigned = ledger.assigned()
        lags = {}
        for p, tp in assigned.items():
            end = app.consumer.highwater(tp)
            if end is not None and p in ledger.positions:
                lags[(tp.topic, p)] = end - ledger.positions[p]
        metrics.lag.set(lags)
        if not ledger.recovered():
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


@dataclass(frozen=True)
class Queued:
    """A folded batch waiting for the writer: its outputs in flight, and what decides whether it may be stored."""

    number: int
    batch: Batch
    sent: list[asyncio.Future[Any]]
    revocations: int
    generation: int
    records: int
    started: float


class PartitionMoved(Exception):
    """The partition's producer was dropped (the partition revoked) before its state was written."""


@dataclass(frozen=True)
class FaultHooks:
    """Faults a test can inject through the environment (never set in production).

    ``LEDGER_TEST_DROP_RECORDS="p:offset,..."``: the first delivery of these records is ignored, as
    Faust's consumer has been seen to drop a record; the processor must notice the hole.
    ``LEDGER_TEST_FAIL_BATCH=N``: the N-th batch with outputs raises after sending half of them.
    ``LEDGER_TEST_EXIT_IN_TXN="p:offset"``: the worker exits at once (code 75) inside the state transaction
    of the batch that applies this record, once the transaction's records are in the log: a kill -9 there.
    """

    drop: frozenset[tuple[int, int]] = frozenset()
    fail_batch: int = 0
    exit_in_txn: tuple[int, int] | None = None

    @classmethod
    def from_env(cls) -> FaultHooks:
        drop = os.environ.get("LEDGER_TEST_DROP_RECORDS", "")
        pairs = (item.split(":") for item in drop.split(",") if item)
        exit_at = os.environ.get("LEDGER_TEST_EXIT_IN_TXN", "")
        p, _, offset = exit_at.partition(":")
        return cls(drop=frozenset((int(p), int(o)) for p, o in pairs),
                   fail_batch=int(os.environ.get("LEDGER_TEST_FAIL_BATCH", "0")),
                   exit_in_txn=(int(p), int(offset)) if exit_at else None)

    def exits_in_txn(self, partition: int, start: int, end: int) -> bool:
        """Whether a state transaction of ``partition`` covering offsets [start, end) is the one to exit in."""
        if self.exit_in_txn is None or self.exit_in_txn[0] != partition:
            return False
        return start <= self.exit_in_txn[1] < end


class PartitionLedger:
    """Applies usage-log records to the table in offset order, and owns each partition's position.

    The position of a partition (the next offset to apply) is stored in the
    table, in the partition's changelog, after the outputs and state of every
    record before it are durable. Applying resumes there, whatever offset Faust
    delivers from: a record below it is skipped, a record past it means a hole,
    and the missing records are fetched again and applied first. Committed
    offsets only bound what a restart reads again; they follow the durable
    position. Any failure stops the worker (the next owner re-reads the batch),
    never just the batch.

    Folding and storing overlap: a batch is folded, its outputs handed to the
    producer, and its state queued for the writer (``_write_loop``), which
    stores batches in order, each once its outputs are acknowledged. The next
    batch folds meanwhile, reading the queued state through ``PendingState``.
    So a check's answer waits for no earlier batch's transaction. If a batch is
    refused (its partitions moved), every batch folded after it is dropped too
    (it read the refused state) and folding starts again from the durable
    positions: the records past them are fetched again as a hole.
    """

    def __init__(self, app: faust.App, settings: Settings, topic: str, table: Table, processor: UsageProcessor,
                 pending: PendingState, metrics: WorkerMetrics, hooks: FaultHooks) -> None:
        self.app, self.settings, self.topic, self.table = app, settings, topic, table
        self.processor, self.pending, self.metrics, self.hooks = processor, pending, metrics, hooks
        self.changelog = table.changelog_topic.get_topic_name()
        # Per owned partition, the next offset to apply. It moves only once a batch's state and position are
        # committed to the changelog, so it is the durable position too: what a restart would resume from.
        self.positions: dict[int, int] = {}
        # Per owned partition, the next offset to fold: past the durable position by the batches still queued.
        self.folded: dict[int, int] = {}
        self._queue: asyncio.Queue[Queued] = asyncio.Queue(maxsize=WRITES_QUEUED_MAX)
        self._queued_records = 0  # records of the batches in the queue
        self._room = asyncio.Event()  # set when the writer has taken batches out of the queue
        self._writer: asyncio.Task[None] | None = None
        self._batches = 0  # numbers the folded batches (PendingState)
        self._generation = 0  # moves when queued batches are dropped: a batch folded before is dropped too
        self.committed: dict[int, int] = {}  # what this worker last committed to the group
        self._revocations = 0  # a batch that saw one start is not stored: its partitions may be someone else's
        self._lock = asyncio.Lock()  # the agent and the catch-up timer apply records one batch at a time
        self._dropped: set[tuple[int, int]] = set()
        self._batches_with_outputs = 0
        self._last_delivery = time.monotonic()
        self._refetcher: AIOKafkaConsumer | None = None
        self._outputs: OutputProducer | None = None  # started with the first batch that has outputs
        self._totals: Counter[str] = Counter()
        self._advanced = asyncio.Event()  # set (and replaced) whenever a position moves
        self._hurry = asyncio.Event()  # the writer stores now, not at its next turn (STATE_WRITE_EVERY_S)
        self._answering: set[asyncio.Task[None]] = set()
        self._producers: dict[int, AIOKafkaProducer] = {}  # per owned partition: the fenced writer of its state
        self._closing: set[asyncio.Task[None]] = set()
        # Per partition: its producer is started, used for a transaction or stopped under this lock, one at a time.
        self._producer_locks: dict[int, asyncio.Lock] = {}
        self._last_log = time.monotonic()

    async def guarded(self, work: Awaitable[None]) -> None:
        """Run ``work``; any exception stops the worker (exit 70) instead of dropping or acking a batch."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.critical("processing failed; stopping the worker so that the batch is read again", exc_info=True)
            _exit_now(70)

    def assigned(self) -> dict[int, Any]:
        return {tp.partition: tp for tp in self.app.consumer.assignment() if tp.topic == self.topic}

    def recovered(self) -> bool:
        recovery = self.app.tables.recovery
        return recovery.completed.is_set() and not recovery.in_recovery

    def forget(self, partitions: set[int]) -> None:
        """Revoked partitions start from their stored position if they ever come back."""
        self._revocations += 1
        for p in partitions:
            self._drop_producer(p)
            for owned in (self.positions, self.committed, self.folded):
                owned.pop(p, None)

    def _start(self, p: int) -> int:
        """The durable position of ``p``."""
        if p not in self.positions:
            stored = self.table.data.get(position_key(p))
            self.positions[p] = stored.next_offset if isinstance(stored, Position) else 0
        return self.positions[p]

    def _next(self, p: int) -> int:
        """The next offset of ``p`` to fold."""
        return self.folded[p] if p in self.folded else self._start(p)

    async def apply(self, delivered: list[Record]) -> None:
        self._last_delivery = time.monotonic()
        async with self._lock:
            await self._apply(self._drop_injected(delivered))

    async def catch_up(self) -> None:
        """Records the log has past the position while Faust delivers nothing (a hole at the end) are fetched."""
        if not self.recovered() or self.app.rebalancing or self._lock.locked():
            return
        async with self._lock:
            if time.monotonic() - self._last_delivery > CATCH_UP_IDLE_S:
                for p, tp in self.assigned().items():
                    end = self.app.consumer.highwater(tp)
                    if end is not None and end > self._next(p):
                        start = self._next(p)
                        log.warning("partition %s: the log ends at %s but nothing past %s was delivered; "
                                    "fetching it", p, end, start)
                        self.metrics.holes.inc()
                        await self._apply(await self._refetch(p, start, min(end, start + BATCH_EVENTS_MAX)))
        # Outside the lock: a commit is a round trip through Faust's consumer thread and the group coordinator,
        # and the batches folded meanwhile waited for it (every second, the slowest checks were those).
        await self._commit(dict(self.positions))

    def _drop_injected(self, records: list[Record]) -> list[Record]:
        if not self.hooks.drop:
            return records
        kept = []
        for r in records:
            if (r.partition, r.offset) in self.hooks.drop and (r.partition, r.offset) not in self._dropped:
                self._dropped.add((r.partition, r.offset))
                log.warning("test hook: dropping %s@%s as Faust might", r.partition, r.offset)
                continue
            kept.append(r)
        return kept

    async def _apply(self, delivered: list[Record]) -> None:
        started = time.perf_counter()
        revocations, generation = self._revocations, self._generation
        reached: dict[int, int] = {}  # per partition, the offset after the last record taken into this batch
        records: list[Record] = []
        for r in delivered:
            p = r.partition
            at = reached.get(p, self._next(p))
            if r.offset < at:
                self._totals[ALREADY_APPLIED] += 1
                self.metrics.processed.labels(ALREADY_APPLIED).inc()
                continue
            if r.offset > at:
                log.warning("partition %s: delivered offset %s, but the position is %s: fetching the hole", p,
                            r.offset, at)
                self.metrics.holes.inc()
                records += await self._refetch(p, at, r.offset)
            records.append(r)
            reached[p] = r.offset + 1
        if not records or generation != self._generation:  # a refetch above waited while queued batches were dropped
            return
        batch = self.processor.run(records)
        number = self._batches = self._batches + 1
        self.pending.stage(number, ((key, value, batch.encoded[key]) for key, value in batch.writes.items()))
        self.folded.update(batch.next_offsets)
        # Outputs are durable before the state and position that say they happened (the writer awaits
        # them first): a crash in between repeats them under the same ids, never loses them.
        sent = await self._send_outputs(batch)
        if self._writer is None:
            self._writer = asyncio.create_task(self.guarded(self._write_loop()))
        while self._queued_records and self._queued_records + len(records) > WRITES_QUEUED_RECORDS_MAX:
            self._room.clear()
            self._hurry.set()
            await self._room.wait()
        if self._queue.full():
            self._hurry.set()
        self._queued_records += len(records)
        await self._queue.put(Queued(number, batch, sent, revocations, generation, len(records), started))

    async def _write_loop(self) -> None:
        """Store queued batches in the order they were folded, each once its outputs are acknowledged.

        The batches queued when the writer comes round (at most every STATE_WRITE_EVERY_S, unless hurried)
        are stored together: their state merged (a later batch's value of a key replaces an earlier one's) in
        one transaction per partition, with the position after the last of them. That is the state a single
        batch of all their records would have written.
        """
        stored_at = 0.0
        while True:
            group = [await self._queue.get()]
            wait_s = stored_at + STATE_WRITE_EVERY_S - time.monotonic()
            if wait_s > 0 and not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), wait_s)
            self._hurry.clear()
            stored_at = time.monotonic()
            while not self._queue.empty():
                group.append(self._queue.get_nowait())
            self._queued_records -= sum(queued.records for queued in group)
            self._room.set()
            await asyncio.gather(*(sent for queued in group for sent in queued.sent))
            # Batches folded before a refusal are dropped (a prefix: only this loop moves the generation).
            for queued in group:
                if queued.generation != self._generation:
                    self.pending.settle(queued.number, queued.batch.writes)
            group = [queued for queued in group if queued.generation == self._generation]
            if not group:
                continue
            batch = merged([queued.batch for queued in group])
            stored = await self._write_state(batch, group[0].revocations)
            for queued in group:
                self.pending.settle(queued.number, queued.batch.writes)
            if not stored:
                self._drop_queued(group[0], len(group))
                continue
            self.positions.update(batch.next_offsets)
            self._advanced.set()
            self._advanced = asyncio.Event()
            for queued in group:
                self._count(queued.batch, time.perf_counter() - queued.started)

    def _drop_queued(self, refused: Queued, stored_with: int) -> None:
        """``stored_with`` batches from ``refused`` on were refused together: they and every batch folded after
        them are dropped; folding restarts at the durable positions."""
        self.metrics.fence_refused.inc()
        log.warning("partitions moved to another worker: dropping the state of %s batch(es) from one of %s records, "
                    "and of the %s batch(es) folded after them", stored_with, refused.records, self._queue.qsize())
        self._generation += 1
        self.folded.clear()
        self.pending.clear()  # every batch left in the queue is dropped when its turn comes

    def answer_later(self, partition: int, raw: bytes | None) -> None:
        """Answer a spend query in a task of its own: one waiting for its partition holds up no other."""
        if len(self._answering) >= QUERIES_WAITING_MAX:
            log.warning("%s spend queries wait already; dropping one (its asker gets a 504)", QUERIES_WAITING_MAX)
            return
        task = asyncio.create_task(self.guarded(self._answer(partition, raw or b"")))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, partition: int, raw: bytes) -> None:
        try:
            query = query_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            log.warning("ignoring a malformed spend query in partition %s: %s", partition, exc)
            return
        deadline = time.monotonic() + QUERY_WAIT_S_MAX
        while partition not in self.positions or self.positions[partition] < query.usage_offset:
            if partition not in self.assigned() or time.monotonic() > deadline:
                return  # not ours (any more), or not applied in time: the asker has given up
            if partition not in self.positions and self.recovered():
                self._start(partition)
                continue
            self._hurry.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), min(1.0, max(0.0, deadline - time.monotonic())))
        reply = self.processor.answer(partition, query.query)
        if reply is not None:
            await (await self.app.producer.send(*reply, None, None, None))

    async def _send_outputs(self, batch: Batch) -> list[asyncio.Future[Any]]:
        """Hand the batch's outputs to the output producer; the future resolves when the broker has every one."""
        outputs = batch.outputs
        failing = False
        if outputs and self.hooks.fail_batch:
            self._batches_with_outputs += 1
            failing = self._batches_with_outputs == self.hooks.fail_batch
        if failing:
            outputs = outputs[: len(outputs) // 2]
        if self._outputs is None:
            self._outputs = OutputProducer(self.settings.bootstrap, MESSAGE_BYTES_MIN)
        sent = self._outputs.send(outputs)
        if failing:
            await sent
            raise RuntimeError("test hook: an output send failed mid-batch")
        return [sent]

    async def _write_state(self, batch: Batch, revocations: int) -> bool:
        """Store the batch's state and positions, one transaction per partition; False if this worker was fenced.

        Each usage partition's state is written by a transactional producer of its own
        (``transactional.id`` names the partition), started before this worker's first
        write to it. Starting one fences every older producer of that id: a paused
        worker that comes back after its partitions moved can no longer write to them,
        whatever it had queued. Within a transaction the order is accounts, plan
        histories, position (see ``Batch.state_in_write_order``). After the commit, a
        plain record (``"<p>:tail"``) follows, so that a partition never ends in a
        transaction marker, which Faust's recovery would wait for until a record follows.
        """
        by_partition: dict[int, list[tuple[str, Any]]] = {}  # a value of None deletes its key
        for key, value in batch.state_in_write_order():
            by_partition.setdefault(partition_of(key), []).append((key, value))
        if revocations != self._revocations or not by_partition.keys() <= self._producers.keys():
            return False  # a partition of the batch moved (or is not claimed yet): not this worker's to write
        # Every partition's transaction ends before this decides: none is left running beside the next write.
        written = await asyncio.gather(*(self._write_partition(p, batch, writes) for p, writes in by_partition.items()),
                                       return_exceptions=True)
        failed = [outcome for outcome in written if isinstance(outcome, BaseException)]
        if any(isinstance(outcome, ProducerFenced | PartitionMoved) for outcome in failed):
            for p in by_partition:  # another worker owns it now: write nothing more there until it is given back
                self._drop_producer(p)
            return False
        if failed:
            if revocations != self._revocations and all(isinstance(outcome, Exception) for outcome in failed):
                return False  # the partition moved while it was written
            raise failed[0]
        if revocations != self._revocations:
            return False
        for writes, metadata in zip(by_partition.values(), written, strict=True):
            for (key, value), meta in zip(writes, metadata, strict=True):
                held = table_form(value, batch.encoded[key])
                if held is None:
                    self.table.data.pop(key, None)
                else:
                    self.table.data[key] = held
                if isinstance(self.table.data, StandbyMemoryStore):
                    self.table.data.written(meta.partition, meta.offset)
        return True

    async def claim(self, partitions: set[int]) -> None:
        """Fence the previous owners of newly assigned partitions, then end each changelog partition in a record.

        Starting the producer aborts a transaction the previous owner left open (a kill -9 mid-batch), which
        appends a marker; a kill between a commit and its tail leaves one too. Faust's recovery waits for
        the last offset of a changelog partition, which a marker never delivers: the tail record gives it one.
        """
        await asyncio.gather(*(self._claim(p) for p in partitions))

    async def _claim(self, p: int) -> None:
        await self._fence(p)  # the group gave us p: from now on only this worker may write its state
        stored = self.table.data.get(position_key(p))
        await self._tail(p, stored.next_offset if isinstance(stored, Position) else 0)

    async def _write_partition(self, p: int, batch: Batch, writes: list[tuple[str, Any]]) -> list[Any]:
        # Only claim() starts producers: one started here for a partition that moved would fence its new owner.
        producer = self._producers.get(p)
        async with self._producer_lock(p):  # so that it is not stopped inside the transaction (_stop_producer)
            if producer is None or self._producers.get(p) is not producer:
                raise PartitionMoved(p)  # dropped while this waited: the partition was revoked
            async with producer.transaction():
                sent = [await producer.send(self.changelog, batch.encoded[key], key=encode(key), partition=p)
                        for key, _value in writes]
                metadata = [await fut for fut in sent]
                if self.hooks.exits_in_txn(p, self.positions.get(p, 0), batch.next_offsets[p]):
                    log.warning("test hook: exiting inside the state transaction of partition %s", p)
                    _exit_now(75)
        await self._tail(p, batch.next_offsets[p])
        return metadata

    async def _tail(self, p: int, next_offset: int) -> None:
        tail = encode(Position(partition=p, next_offset=next_offset))
        await (await self.app.producer.send(self.changelog, encode(tail_key(p)), tail, p, None, None))

    def _drop_producer(self, p: int) -> None:
        producer = self._producers.pop(p, None)
        if producer is not None:
            task = asyncio.create_task(self._stop_producer(p, producer))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _stop_producer(self, p: int, producer: AIOKafkaProducer) -> None:
        """Stop a dropped producer once no transaction of it is open.

        ``AIOKafkaProducer.stop`` cancels the task that would end an open transaction, so a commit or abort
        waiting on it then waits forever: the writer hung with no error, and the partitions it writes stopped
        for good while the worker looked healthy (a revocation landing inside a state transaction).
        """
        async with self._producer_lock(p):
            await producer.stop()

    def _producer_lock(self, p: int) -> asyncio.Lock:
        return self._producer_locks.setdefault(p, asyncio.Lock())

    async def _fence(self, p: int) -> AIOKafkaProducer:
        """This worker's transactional producer for partition ``p``; starting it fences older ones of that id.

        One at a time per partition: two of ours starting at once would fence each other.
        """
        async with self._producer_lock(p):
            return await self._start_producer(p)

    async def _start_producer(self, p: int) -> AIOKafkaProducer:
        producer = self._producers.get(p)
        if producer is None:
            producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap, acks="all", enable_idempotence=True,
                                        transactional_id=f"{self.app.conf.id}-state-{p}", linger_ms=0,
                                        max_request_size=PRODUCER_REQUEST_BYTES_MAX)
            await producer.start()
            self._producers[p] = producer
        return producer

    async def _commit(self, offsets: dict[int, int]) -> bool:
        """Commit durable positions to the group (bounding what a restart re-reads); False if the group refused."""
        assigned = self.assigned()
        todo = {assigned[p]: o for p, o in offsets.items() if p in assigned and self.committed.get(p) != o}
        if not todo:
            return True
        try:
            ok = await asyncio.wait_for(self.app.consumer._commit(todo), COMMIT_TIMEOUT_S)
        except TimeoutError:  # a rebalance holds the consumer: the next batch or tick commits again
            ok = False
        if ok:
            self.committed.update({tp.partition: o for tp, o in todo.items()})
        return bool(ok)

    async def _refetch(self, p: int, start: int, end: int) -> list[Record]:
        """The records of partition ``p`` in [start, end) as the log has them now (markers leave no record)."""
        from aiokafka import TopicPartition

        if self._refetcher is None:
            self._refetcher = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap, group_id=None,
                                               enable_auto_commit=False, auto_offset_reset="earliest",
                                               isolation_level=READ_COMMITTED)
            await self._refetcher.start()
        tp = TopicPartition(self.topic, p)
        self._refetcher.assign([tp])
        self._refetcher.seek(tp, start)
        found: list[Record] = []
        while await self._refetcher.position(tp) < end:
            batch = await self._refetcher.getmany(tp, timeout_ms=REFETCH_POLL_MS)
            for m in batch.get(tp, []):
                if m.offset < end:
                    found.append(Record(m.topic, m.partition, m.offset, m.key, m.value))
            if not batch and (await self._refetcher.end_offsets([tp]))[tp] < end:
                raise RuntimeError(f"partition {p}: offsets up to {end} were delivered but the log ends before")
        self.metrics.refetched.inc(len(found))
        log.warning("partition %s: fetched %s record(s) of offsets %s..%s again", p, len(found), start, end - 1)
        return found

    def _count(self, batch: Batch, seconds: float) -> None:
        self._totals.update(batch.results)
        self.metrics.count(batch.results, batch.dead_letters, batch.gates)
        self.metrics.batch_events.observe(sum(batch.results.values()))  # commands: an envelope's count one by one
        self.metrics.batch_seconds.observe(seconds)
        if time.monotonic() - self._last_log > PROGRESS_LOG_EVERY_S:
            self._last_log = time.monotonic()
            log.info("processed so far: %s", dict(self._totals))


async def _send(app: faust.App, messages: Iterable[tuple[str, bytes | None, bytes, int | None]]
                ) -> list[asyncio.Future[Any]]:
    """Hand messages to the producer; the futures resolve when the broker has each.

    Table values are written to the changelog by the processor rather than through
    ``table[key] = value``: Faust's send-soon buffer sends one message per
    event-loop turn and throttled the processor to a third of this rate.
    """
    return [await app.producer.send(topic, key, value, partition, None, None)
            for topic, key, value, partition in messages]


def _exit_now(code: int) -> None:
    """Leave at once: no Faust shutdown (which would ack and commit), no finally blocks."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
