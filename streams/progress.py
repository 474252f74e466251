"""How far the processor and the projector are behind the log."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CoordinatorLoadInProgressError, GroupCoordinatorNotAvailableError, NotCoordinatorError

from ledger.settings import Settings
from streams.topics import Topics, partitions_of, processor_app_id

CATCH_UP_POLL_S = 0.5
COORDINATOR_NOT_READY = (GroupCoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError)


def processor_group(settings: Settings) -> str:
    return processor_app_id(settings.namespace)


async def end_offsets(settings: Settings, names: tuple[str, ...]) -> dict[TopicPartition, int]:
    parts = await partitions_of(settings.bootstrap, names)
    tps = [TopicPartition(t, p) for t, ps in parts.items() for p in ps]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(tps)) if tps else {}
    finally:
        await consumer.stop()


async def processor_lag(settings: Settings) -> int:
    """Usage-log records past the processor's committed offsets, which follow its durable position (within ~1 s)."""
    topics = Topics.for_namespace(settings.namespace)
    ends = await end_offsets(settings, (topics.usage,))
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(processor_group(settings))
    except COORDINATOR_NOT_READY:
        # A new broker creates its offsets topic on first use: until then nothing is committed.
        committed = {}
    finally:
        await admin.close()
    return sum(max(0, end - (committed[tp].offset if tp in committed else 0)) for tp, end in ends.items())


async def projector_lag(settings: Settings, history: Path) -> int:
    """Ledger entries and gate events not yet stored in the history file."""
    from projections.projector import connect

    topics = Topics.for_namespace(settings.namespace)
    ends = await end_offsets(settings, (topics.entries, topics.gates, topics.rejected))
    if not history.exists():
        return sum(ends.values())
    with connect(history, read_only=True) as con:
        rows = con.execute('SELECT topic, "partition", next_offset FROM projector_offsets').fetchall()
    stored = {TopicPartition(t, p): o for t, p, o in rows}
    return sum(max(0, end - stored.get(tp, 0)) for tp, end in ends.items())


async def wait_caught_up(settings: Settings, history: Path, timeout_s: float) -> None:
    """Wait until the processor, then the projector, have everything published so far."""
    deadline = time.monotonic() + timeout_s
    for name, lag in (("processor", lambda: processor_lag(settings)),
                      ("projector", lambda: projector_lag(settings, history))):
        while (behind := await lag()) > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {name} is still {behind} records behind after {timeout_s:.0f}s")
            await asyncio.sleep(CATCH_UP_POLL_S)
