"""The processor's state writer on the real broker: a revocation landing inside a state transaction.

`PartitionLedger.forget` (the revocation callback) drops the partition's transactional producer while
the writer may be inside that producer's transaction. aiokafka's `stop` cancels the task that would
end the transaction, so the commit then waited forever: no error, no exit, and the worker's partitions
stalled for good (found by `make soak`: `test_a_paused_worker_...` kept 67 records unapplied for 300 s).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry

from ledger.settings import Settings
from streams.app import FaultHooks, PartitionLedger
from streams.codecs import encode
from streams.metrics import WorkerMetrics
from streams.processor import Batch
from streams.topics import changelog_topic, processor_app_id

pytestmark = pytest.mark.integration
WRITE_WAIT_S = 30  # a write that has not returned by then has hung


class _FaustLikeProducer:
    """What the ledger uses of Faust's producer (`send(topic, key, value, partition, timestamp, headers)`)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def send(self, topic: str, key: bytes | None, value: bytes, partition: int | None, _timestamp: Any,
                   _headers: Any) -> asyncio.Future[Any]:
        return await self.producer.send(topic, value, key=key, partition=partition)


def test_a_producer_revoked_inside_a_state_transaction_is_stopped_after_the_transaction(settings: Settings) -> None:
    asyncio.run(_revoked_inside_a_transaction(settings))


async def _revoked_inside_a_transaction(settings: Settings) -> None:
    changelog = changelog_topic(settings.namespace)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(changelog, 1, 1)])
    finally:
        await admin.close()
    plain = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await plain.start()
    app = SimpleNamespace(conf=SimpleNamespace(id=processor_app_id(settings.namespace)), producer=_FaustLikeProducer(plain))
    table = SimpleNamespace(changelog_topic=SimpleNamespace(get_topic_name=lambda: changelog), data={})
    ledger = PartitionLedger(app, settings, f"{settings.namespace}.usage", table, None, None,  # type: ignore[arg-type]
                             WorkerMetrics(CollectorRegistry()), FaultHooks())
    try:
        await ledger.claim({0})
        producer = ledger._producers[0]
        real_send = producer.send

        async def send_then_revoke(*args: Any, **kwargs: Any) -> Any:
            sent = await real_send(*args, **kwargs)
            ledger.forget({0})  # the group revokes the partition while its transaction is open
            await asyncio.sleep(0.5)  # the dropped producer's stop has every chance to run now
            return sent

        producer.send = send_then_revoke  # type: ignore[method-assign]
        key = "0:a:acme:ana"
        batch = Batch(encoded={key: b'{"state":"of ana"}'}, next_offsets={0: 5})
        # When the revocation lands inside the transaction, the write still returns (it hung before) ...
        written = await asyncio.wait_for(ledger._write_partition(0, batch, [(key, None)]), WRITE_WAIT_S)
        assert len(written) == 1
        # ... the dropped producer is stopped once the transaction has ended ...
        await asyncio.wait_for(asyncio.gather(*ledger._closing), WRITE_WAIT_S)
        assert producer._closed
        # ... and the transaction committed: a committed read finds the state record.
        assert encode(key) in await _committed_keys(settings.bootstrap, changelog)
    finally:
        for stopping in list(ledger._producers.values()):
            await stopping.stop()
        await plain.stop()


async def _committed_keys(bootstrap: str, topic: str) -> list[bytes | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        keys: list[bytes | None] = []
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                keys += [r.key for r in records]
        return keys
    finally:
        await consumer.stop()
