"""Reading and publishing topics directly, for assertions on the real broker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TypeVar

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from ledger.events import AnyCommand, Envelope, GateEvent, LedgerEntry, Rejection
from ledger.settings import Settings
from streams.codecs import decode_command, decode_record
from streams.publisher import UsagePublisher
from streams.topics import Topics, partitions_of

T = TypeVar("T")


def publish(settings: Settings, commands: Iterable[AnyCommand], envelopes: bool = True) -> None:
    async def go() -> None:
        async with UsagePublisher(settings) as publisher:
            await publisher.publish(list(commands), envelopes=envelopes)
    asyncio.run(go())


def publish_raw(settings: Settings, records: Iterable[tuple[bytes | None, bytes]]) -> None:
    async def go() -> None:
        async with UsagePublisher(settings) as publisher:
            for key, value in records:
                await publisher.publish_raw(key, value)
    asyncio.run(go())


def read_partitions(settings: Settings, topic: str) -> dict[int, list[tuple[bytes | None, bytes]]]:
    """Every committed record of a topic, per partition, in order.

    Committed, as a restore reads the account changelog: an aborted transaction's records are
    not state, and Kafka's log cleaner removes them. (Outputs are not transactional.)
    """
    async def go() -> dict[int, list[tuple[bytes | None, bytes]]]:
        parts = (await partitions_of(settings.bootstrap, (topic,)))[topic]
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    isolation_level="read_committed")
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in parts]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                await consumer.seek_to_beginning(tp)
            out: dict[int, list[tuple[bytes | None, bytes]]] = {p: [] for p in parts}
            async def behind() -> bool:
                return any([await consumer.position(tp) < ends[tp] for tp in tps])

            while await behind():
                for tp, records in (await consumer.getmany(timeout_ms=500, max_records=20_000)).items():
                    out[tp.partition].extend((r.key, r.value) for r in records if r.offset < ends[tp])
            return out
        finally:
            await consumer.stop()
    return asyncio.run(go())


def usage_log(settings: Settings) -> list[tuple[int, bytes | None, AnyCommand]]:
    """Every command on the usage log, with its record's partition and key; an envelope's one by one."""
    out: list[tuple[int, bytes | None, AnyCommand]] = []
    for p, records in read_partitions(settings, Topics.for_namespace(settings.namespace).usage).items():
        for key, value in records:
            decoded = decode_record(value)
            inner = [decode_command(raw) for raw in decoded.commands] if isinstance(decoded, Envelope) else [decoded]
            out.extend((p, key, command) for command in inner)
    return out


def read_all(settings: Settings, topic: str) -> list[bytes]:
    return [value for records in read_partitions(settings, topic).values() for _, value in records]


def _decoded(settings: Settings, name: str, kind: type[T]) -> list[T]:
    topic = getattr(Topics.for_namespace(settings.namespace), name)
    return [msgspec.json.decode(v, type=kind) for v in read_all(settings, topic)]


def entries(settings: Settings) -> list[LedgerEntry]:
    return _decoded(settings, "entries", LedgerEntry)


def gates(settings: Settings) -> list[GateEvent]:
    return _decoded(settings, "gates", GateEvent)


def rejections(settings: Settings) -> list[Rejection]:
    return _decoded(settings, "rejected", Rejection)


def copy_usage_log(source: Settings, target: Settings) -> int:
    """Copy the usage log record for record, partition for partition (a replay from offset 0)."""
    from aiokafka import AIOKafkaProducer

    topic_in, topic_out = Topics.for_namespace(source.namespace).usage, Topics.for_namespace(target.namespace).usage
    records = read_partitions(source, topic_in)

    async def go() -> int:
        producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
        try:
            futures = [await producer.send(topic_out, value, key=key, partition=p)
                       for p, rows in records.items() for key, value in rows]
            for f in futures:
                await f
            return len(futures)
        finally:
            await producer.stop()
    return asyncio.run(go())
