"""The DuckDB projector: ledger entries and gate events into the history file.

Rows go in by batches through Arrow (never row by row), ``INSERT OR IGNORE``
on the event id, and the next offset of every source partition is stored in
the same transaction: a restart resumes exactly, and a replay adds nothing.
The file is opened per batch, so readers get their turn between batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from ledger.settings import Settings
from projections.schema import ENTRIES, GATES, PROJECTED, REJECTIONS, Table, create_indexes, create_schema
from streams.metrics import HealthServer, ProjectorMetrics
from streams.topics import Topics, partitions_of

log = logging.getLogger(__name__)

BATCH_RECORDS_MAX = 50_000
POLL_TIMEOUT_MS = 200
LOCK_RETRY_S = 0.05
LOCK_WAIT_S_MAX = 30.0
BULK_RECORDS = 200_000  # a rebuild inserts this many records at a time
CONTROL_SYNC_S = 30.0  # how stale the copies of plan versions, users and tiers may get
HEALTH_SAMPLE_S = 1.0


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
    """Projects the output topics into the history file.

    With ``bulk`` (a rebuild into a new file) rows go in without the unique keys, which cost more than half
    of every insert; :meth:`finish` drops repeated records and builds the keys once at the end.
    """

    def __init__(self, settings: Settings, path: Path | None = None, *, bulk: bool = False,
                 metrics: ProjectorMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ProjectorMetrics(CollectorRegistry())
        self.topics = Topics.for_namespace(settings.namespace)
        self.path = path or settings.history_path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sources = (self.topics.entries, self.topics.gates, self.topics.rejected)
        self.tables: dict[str, Table] = dict(zip(self.sources, (ENTRIES, GATES, REJECTIONS), strict=True))
        self.bulk = bulk
        self.rows_written = 0
        self._values: dict[str, list[bytes]] = {topic: [] for topic in self.tables}
        self._offsets: dict[tuple[str, int], int] = {}
        # A bulk load owns its new file: one connection throughout, so no batch pays a checkpoint on close.
        self._held: duckdb.DuckDBPyConnection | None = connect(self.path) if bulk else None
        with self._connection() as con:
            create_schema(con, indexes=not bulk)
        self._file_id = _file_id(self.path)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The held connection of a bulk load; otherwise one per batch, so readers get their turn between."""
        if self._held is not None:
            yield self._held
            return
        with connect(self.path) as con:
            yield con

    def sync_control(self) -> None:
        """Copy the control plane's plan versions, users and tiers; a control plane that is down stops nothing."""
        from ledger.control.store import ControlStore
        from projections.control import sync_control

        store = ControlStore(self.settings.control_url)
        try:
            store.create_schema()
            with self._connection() as con:
                copied = sync_control(con, store)
            log.debug("control plane copied: %s", copied)
        except Exception:
            log.exception("copying the control plane into %s failed; history continues without it", self.path)
        finally:
            store.dispose()

    def stored_offsets(self) -> dict[TopicPartition, int]:
        with self._connection() as con:
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
            synced_at, sampled_at = -CONTROL_SYNC_S, 0.0
            while stop is None or not stop.is_set():
                if time.monotonic() - synced_at >= CONTROL_SYNC_S:
                    await asyncio.to_thread(self.sync_control)
                    synced_at = time.monotonic()
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
                    with self._connection() as con:
                        create_schema(con, indexes=not self.bulk)
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
        """Store one batch; False (nothing stored) if the file was swapped by a rebuild since we opened it.

        A bulk load gathers batches up to BULK_RECORDS and stores them as one (fewer, larger inserts are
        faster; a rebuild that dies starts its new file again, so nothing is lost by holding them).
        """
        for tp, records in batch:
            self._values[tp.topic].extend(r.value for r in records)
            self._offsets[(tp.topic, tp.partition)] = records[-1].offset + 1
        if self.bulk and sum(len(v) for v in self._values.values()) < BULK_RECORDS:
            return True
        return self._flush()

    def _flush(self) -> bool:
        started = time.perf_counter()
        values, offsets = self._values, self._offsets
        self._values, self._offsets = {topic: [] for topic in self.tables}, {}
        if not offsets:
            return True
        offset_table = pa.table({"topic": [t for t, _ in offsets], "partition": [p for _, p in offsets],
                                 "next_offset": list(offsets.values())})
        insert = "INSERT INTO" if self.bulk else "INSERT OR IGNORE INTO"
        with self._connection() as con:
            # A rebuild replaces the file only while it holds the old file's lock, so with our
            # connection open the identity seen here is the file we are writing to.
            if _file_id(self.path) != self._file_id:
                return False
            con.execute("BEGIN")
            for topic, table in self.tables.items():
                if values[topic]:
                    # The records as JSON text; DuckDB parses them and casts money and times exactly.
                    con.register("batch_rows", pa.table({"v": pa.array(values[topic], pa.string())}))
                    con.execute(f"{insert} {table.name} {table.from_json_sql('batch_rows')}")
                    con.unregister("batch_rows")
            con.register("batch_offsets", offset_table)
            con.execute("INSERT OR REPLACE INTO projector_offsets SELECT * FROM batch_offsets")
            con.execute("COMMIT")
        self.rows_written += sum(len(v) for v in values.values())
        self.metrics.count_rows((table.name, len(values[topic])) for topic, table in self.tables.items())
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return True

    def finish(self) -> None:
        """After a bulk load: keep one row per key (a crashed processor repeats outputs) and build the keys."""
        self._flush()
        with self._connection() as con:
            for table in PROJECTED:
                try:
                    con.execute(table.index_sql())
                except duckdb.ConstraintException:  # repeated records: they are identical, keep the first
                    con.execute(f"""DELETE FROM {table.name} WHERE rowid IN (
                        SELECT rowid FROM (SELECT rowid, row_number() OVER (PARTITION BY {', '.join(table.key)}
                                                                            ORDER BY rowid) AS n
                                           FROM {table.name}) WHERE n > 1)""")
                    con.execute(table.index_sql())
            create_indexes(con)
            con.execute("CHECKPOINT")
        self.close()

    def close(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None


def run_projector(settings: Settings) -> None:
    """Run the projector in the foreground until interrupted."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    projector = Projector(settings)
    if settings.metrics_port:
        HealthServer.for_metrics(settings.metrics_host, settings.metrics_port, projector.metrics).start()
    log.info("projecting %s into %s", settings.namespace, projector.path)
    asyncio.run(projector.run())
