"""Spend queries beside the usage log, not in it: reads must not grow the log, which is kept forever.

A query goes to the queries topic, in the partition of the same number as the
user's usage partition (same key, same partitioner, same partition count; Faust
assigns both partitions to one worker). It carries the end offset that usage
partition had when the query arrived, and the worker answers once it has applied
every record before that offset, from its live state: the answer includes every
event published before the question (read your writes), and the usage log does
not change. The queries topic keeps its records for an hour.
"""

from __future__ import annotations

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from ledger.events import SpendQueried, user_key
from ledger.settings import Settings
from streams.topics import Topics

# A query whose usage offset is not applied within this is dropped: its asker has given up (ask.py waits 10 s).
QUERY_WAIT_S_MAX = 10.0


class SpendQuery(msgspec.Struct, frozen=True, kw_only=True, tag="spend_query"):
    """Answer ``query`` once the usage partition's records before ``usage_offset`` are applied."""

    usage_offset: int
    query: SpendQueried


query_decoder = msgspec.json.Decoder(SpendQuery)


class QueryPublisher:
    """Stamps a spend query with its usage partition's end offset and writes it beside that partition."""

    def __init__(self, settings: Settings) -> None:
        self.topics = Topics.for_namespace(settings.namespace)
        self._producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all", linger_ms=0)
        self._offsets = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False)
        self._partitioner = DefaultPartitioner()
        self._partitions: list[int] = []

    async def start(self) -> None:
        await self._producer.start()
        await self._offsets.start()
        self._partitions = sorted(await self._producer.partitions_for(self.topics.usage))

    async def stop(self) -> None:
        await self._producer.stop()
        await self._offsets.stop()

    async def publish(self, query: SpendQueried) -> None:
        key = user_key(query.tenant, query.user).encode()
        # The producer of the usage log picks the partition the same way (murmur2 of the key).
        partition = self._partitioner(key, self._partitions, self._partitions)
        usage = TopicPartition(self.topics.usage, partition)
        end = (await self._offsets.end_offsets([usage]))[usage]
        value = msgspec.json.encode(SpendQuery(usage_offset=end, query=query))
        await (await self._producer.send(self.topics.queries, value, key=key, partition=partition))
