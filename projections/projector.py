"""The DuckDB projector: ledger entries and gate events into the history file.

Rows go in by batches through Arrow (never row by row), ``INSERT OR IGNORE``
on the event id, and the next offset of every source partition is stored in
the same transaction: a restart resumes exactly, and a replay adds nothing.
The file is opened per batch, so readers get their turn between batches.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import duckdb
import msgspec
import pyarrow as pa
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from ledger.settings import Settings
from projections.schema import ENTRY_COLUMNS, GATE_COLUMNS, MONEY_COLUMNS, REJECTION_COLUMNS, create_schema
from streams.metrics import HealthServer, ProjectorMetrics
from streams.topics import Topics, partitions_of

log = logging.getLogger(__name__)

BATCH_RECORDS_MAX = 50_000
POLL_TIMEOUT_MS = 200
LOCK_RETRY_S = 0.05
LOCK_WAIT_S_MAX = 30.0
HEALTH_SAMPLE_S = 1.0


class _EntryRow(msgspec.Struct, array_like=False):
    """A ledger entry as the projector stores it: money stays a decimal string."""

    tenant: str
    user: str
    event_id: str
    seq: int
    session_id: str
    session_started_at: str
    model: str
    input_tokens: int
    output_tokens: int
    tool_calls: int
    cost: str
    plan_id: str
    plan_name: str
    plan_version: int
    period_start: str
    period_end: str
    occurred_at: str
    period_spend: str | None
    session_spend: str | None
    period_model_tokens: int | None
    late: bool


class _GateRow(msgspec.Struct):
    gate_id: str
    tenant: str
    user: str
    kind: str
    dimension: str
    model: str | None
    threshold: str
    used: str
    limit: str
    scope: str
    plan_id: str
    plan_version: int
    cause_event_id: str
    occurred_at: str


class _RejectionRow(msgspec.Struct):
    rejection_id: str
    code: str
    reason: str
    key: str | None
    payload: str
    payload_encoding: str
    source_topic: str
    source_partition: int
    source_offset: int
    tenant: str | None
    user: str | None
    event_id: str | None


_entry_decoder = msgspec.json.Decoder(_EntryRow)
_gate_decoder = msgspec.json.Decoder(_GateRow)
_rejection_decoder = msgspec.json.Decoder(_RejectionRow)

_TIMESTAMP_COLUMNS = frozenset({"session_started_at", "period_start", "period_end", "occurred_at"})


def _select(columns: tuple[str, ...]) -> str:
    def cast(column: str) -> str:
        quoted = f'"{column}"'
        if column in MONEY_COLUMNS:
            return f"CAST({quoted} AS DECIMAL(38, 12))"
        if column in _TIMESTAMP_COLUMNS:
            return f"CAST({quoted} AS TIMESTAMPTZ)"
        return quoted
    return ", ".join(cast(c) for c in columns)


def _arrow(columns: tuple[str, ...], rows: list[tuple[object, ...]]) -> pa.Table:
    return pa.table(dict(zip(columns, zip(*rows, strict=True), strict=True)) if rows else {c: [] for c in columns})


def connect(path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the history file, waiting while another connection holds it.

    Another process holds a lock; in this process, a connection opened for
    writing refuses a read-only one until it closes (the projector closes
    after every batch).
    """
    deadline = time.monotonic() + LOCK_WAIT_S_MAX
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            busy = "lock" in str(exc).lower() or "different configuration" in str(exc)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(LOCK_RETRY_S)


def _file_id(path: Path) -> tuple[int, int] | None:
    """Identity of the file behind ``path``: it changes when a rebuild swaps a new file in."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class Projector:
    def __init__(self, settings: Settings, path: Path | None = None, metrics: ProjectorMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ProjectorMetrics(CollectorRegistry())
        self.topics = Topics.for_namespace(settings.namespace)
        self.path = path or settings.history_path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sources = (self.topics.entries, self.topics.gates, self.topics.rejected)
        self.rows_written = 0
        with connect(self.path) as con:
            create_schema(con)
        self._file_id = _file_id(self.path)

    def stored_offsets(self) -> dict[TopicPartition, int]:
        with connect(self.path) as con:
            rows = con.execute('SELECT topic, "partition", next_offset FROM projector_offsets').fetchall()
        return {TopicPartition(t, p): o for t, p, o in rows}

    async def run(self, stop: asyncio.Event | None = None, *, until_caught_up: bool = False) -> None:
        """Project until ``stop`` is set, or (with ``until_caught_up``) until the end offsets seen at start."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await consumer.start()
        try:
            sources = await partitions_of(self.settings.bootstrap, self.sources)
            partitions = [TopicPartition(topic, p) for topic, ps in sources.items() for p in ps]
            if not partitions:
                raise RuntimeError(f"none of the topics {self.sources} exists")
            consumer.assign(partitions)
            self.metrics.health.beat(False, "seeking to the stored offsets")
            await self._seek_to_stored(consumer, partitions)
            targets = await consumer.end_offsets(partitions) if until_caught_up else {}
            sampled_at = 0.0
            while stop is None or not stop.is_set():
                if until_caught_up and await self._caught_up(consumer, targets):
                    return
                if time.monotonic() - sampled_at >= HEALTH_SAMPLE_S:
                    sampled_at = time.monotonic()
                    await self._sample_health(consumer, partitions)
                batch = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=BATCH_RECORDS_MAX)
                if (batch and not self.write(batch.items())) or self._file_id != _file_id(self.path):
                    # `ledger projections rebuild` replaced the file: resume from the offsets the
                    # new file stores, or the records between its end and our position would be lost.
                    log.info("history file %s was replaced; resuming from its stored offsets", self.path)
                    with connect(self.path) as con:
                        create_schema(con)
                    self._file_id = _file_id(self.path)
                    await self._seek_to_stored(consumer, partitions)
        finally:
            await consumer.stop()

    async def _sample_health(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        lags = {}
        for tp in partitions:
            end = consumer.highwater(tp)
            if end is not None:  # known after the first fetch from the partition
                lags[(tp.topic, tp.partition)] = end - await consumer.position(tp)
        self.metrics.lag.set(lags)
        self.metrics.health.beat(True, f"projecting {len(partitions)} partitions into {self.path}")

    async def _seek_to_stored(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        stored = self.stored_offsets()
        for tp in partitions:
            if tp in stored:
                consumer.seek(tp, stored[tp])
        # One call for all: awaited one by one, each waited for an offset reset (~0.5 s per partition).
        if fresh := [tp for tp in partitions if tp not in stored]:
            await consumer.seek_to_beginning(*fresh)

    @staticmethod
    async def _caught_up(consumer: AIOKafkaConsumer, targets: dict[TopicPartition, int]) -> bool:
        for tp, end in targets.items():
            if await consumer.position(tp) < end:
                return False
        return True

    def write(self, batch: Iterable[tuple[TopicPartition, list]]) -> bool:  # type: ignore[type-arg]
        """Store one batch; False (nothing stored) if the file was swapped by a rebuild since we opened it."""
        started = time.perf_counter()
        decoders = {self.topics.entries: _entry_decoder, self.topics.gates: _gate_decoder,
                     self.topics.rejected: _rejection_decoder}
        rows: dict[str, list[tuple[object, ...]]] = {topic: [] for topic in decoders}
        offsets: list[tuple[str, int, int]] = []
        for tp, records in batch:
            decode = decoders[tp.topic].decode
            rows[tp.topic].extend(msgspec.structs.astuple(decode(r.value)) for r in records)
            offsets.append((tp.topic, tp.partition, records[-1].offset + 1))
        targets = (("ledger_entries", ENTRY_COLUMNS, rows[self.topics.entries]),
                   ("gate_events", GATE_COLUMNS, rows[self.topics.gates]),
                   ("rejected_events", REJECTION_COLUMNS, rows[self.topics.rejected]))
        offset_table = pa.table(dict(zip(("topic", "partition", "next_offset"), zip(*offsets, strict=True), strict=True)))
        with connect(self.path) as con:
            # A rebuild replaces the file only while it holds the old file's lock, so with our
            # connection open the identity seen here is the file we are writing to.
            if _file_id(self.path) != self._file_id:
                return False
            con.execute("BEGIN")
            for table, columns, table_rows in targets:
                if table_rows:
                    con.register("batch_rows", _arrow(columns, table_rows))
                    con.execute(f"INSERT OR IGNORE INTO {table} SELECT {_select(columns)} FROM batch_rows")
                    con.unregister("batch_rows")
            con.register("batch_offsets", offset_table)
            con.execute("INSERT OR REPLACE INTO projector_offsets SELECT * FROM batch_offsets")
            con.execute("COMMIT")
        self.rows_written += sum(len(r) for r in rows.values())
        self.metrics.count_rows((table, len(table_rows)) for table, _, table_rows in targets)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return True


def run_projector(settings: Settings) -> None:
    """Run the projector in the foreground until interrupted."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    projector = Projector(settings)
    if settings.metrics_port:
        HealthServer.for_metrics(settings.metrics_host, settings.metrics_port, projector.metrics).start()
    log.info("projecting %s into %s", settings.namespace, projector.path)
    asyncio.run(projector.run())
