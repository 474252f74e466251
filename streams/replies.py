"""Answers from the processor to the API: checks and spend queries are decided in the user's
partition, and their answers come back on the replies topic, matched by request id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, TypeVar

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from ledger.settings import Settings
from streams.topics import Topics, partitions_of

log = logging.getLogger(__name__)
PENDING_MAX = 10_000
A = TypeVar("A", bound=msgspec.Struct)


class _Head(msgspec.Struct):
    """Every answer carries the request id; the waiter for that request knows the answer's type."""

    request_id: str


_head = msgspec.json.Decoder(_Head)


class ReplyWaiter:
    """Reads every reply from the moment it starts; ``wait`` resolves when a request's answer arrives."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = Topics.for_namespace(settings.namespace).replies
        self._pending: dict[str, tuple[type[Any], asyncio.Future[Any]]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        parts = (await partitions_of(self.settings.bootstrap, (self.topic,)))[self.topic]
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap, group_id=None,
                                          enable_auto_commit=False)
        await self._consumer.start()
        tps = [TopicPartition(self.topic, p) for p in parts]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now, so no answer to a later request can be missed
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    def expect(self, request_id: str, kind: type[A]) -> asyncio.Future[A]:
        """Register interest before the request is sent; the answer is decoded as ``kind``."""
        if len(self._pending) >= PENDING_MAX:
            raise OverflowError(f"more than {PENDING_MAX} requests are waiting for an answer")
        future: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (kind, future)
        return future

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    try:
                        request_id = _head.decode(record.value).request_id
                    except msgspec.DecodeError:
                        log.warning("undecodable reply at %s", record.offset)
                        continue
                    kind, future = self._pending.pop(request_id, (None, None))
                    if future is None or future.done():
                        continue
                    try:
                        future.set_result(msgspec.json.decode(record.value, type=kind))
                    except msgspec.DecodeError as exc:  # the waiter learns now, not at its timeout
                        future.set_exception(exc)
