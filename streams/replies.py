"""Answers from the processor to the API: checks and spend queries are decided in the user's
partition, and their answers come back on the replies topic, matched by request id.

The replies are read by librdkafka in a thread of their own, and handed to the event loop a fetch at a time.
Read by aiokafka on the API's event loop, the fetch competed with the requests themselves: at 200 checks/s,
2.2 ms from a reply's record to the waiter at the median (1.0 ms in an idle process), and its decoding was
a tenth of the API's samples.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any, TypeVar

import confluent_kafka
import msgspec

from ledger.settings import Settings
from streams.topics import Topics, partitions_of

log = logging.getLogger(__name__)
PENDING_MAX = 10_000
POLL_S = 0.1  # how soon the reading thread sees that it is to stop
FETCHED_MAX = 1_000  # replies handed to the loop at once
WATERMARKS_TIMEOUT_S = 10.0
WATERMARKS_RETRY_S = 0.1
A = TypeVar("A", bound=msgspec.Struct)
_NOT_READY = {confluent_kafka.KafkaError.NOT_LEADER_FOR_PARTITION, confluent_kafka.KafkaError.LEADER_NOT_AVAILABLE,
              confluent_kafka.KafkaError.UNKNOWN_TOPIC_OR_PART}


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
        self._consumer: confluent_kafka.Consumer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    async def start(self) -> None:
        parts = (await partitions_of(self.settings.bootstrap, (self.topic,)))[self.topic]
        # A group id librdkafka wants; the consumer never joins the group (assign) nor commits.
        self._consumer = confluent_kafka.Consumer({
            "bootstrap.servers": self.settings.bootstrap, "group.id": f"{self.topic}-{uuid.uuid4()}",
            "enable.auto.commit": False, "enable.partition.eof": False})
        await asyncio.to_thread(self._assign_at_end, self._consumer, parts)
        self._thread = threading.Thread(target=self._read, args=(asyncio.get_running_loop(),),
                                        name="replies", daemon=True)
        self._thread.start()

    def _assign_at_end(self, consumer: confluent_kafka.Consumer, parts: list[int]) -> None:
        # The end offsets now, not "the end" resolved at the first fetch: an answer to a request sent after
        # start() returns is never before them.
        consumer.assign([confluent_kafka.TopicPartition(self.topic, p, self._end(consumer, p)) for p in parts])

    def _end(self, consumer: confluent_kafka.Consumer, partition: int) -> int:
        deadline = time.monotonic() + WATERMARKS_TIMEOUT_S
        while True:
            try:
                _low, high = consumer.get_watermark_offsets(confluent_kafka.TopicPartition(self.topic, partition),
                                                            timeout=WATERMARKS_TIMEOUT_S)
                return int(high)
            except confluent_kafka.KafkaException as exc:  # a topic just created has no leader yet, for a moment
                error = exc.args[0]
                if not (error.retriable() or error.code() in _NOT_READY) or time.monotonic() > deadline:
                    raise
                time.sleep(WATERMARKS_RETRY_S)

    async def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._consumer is not None:
            self._consumer.close()

    def expect(self, request_id: str, kind: type[A]) -> asyncio.Future[A]:
        """Register interest before the request is sent; the answer is decoded as ``kind``."""
        if len(self._pending) >= PENDING_MAX:
            raise OverflowError(f"more than {PENDING_MAX} requests are waiting for an answer")
        future: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (kind, future)
        return future

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:  # in the reading thread
        assert self._consumer is not None
        while not self._stopping.is_set():
            first = self._consumer.poll(POLL_S)
            if first is None:
                continue
            fetched = [first, *self._consumer.consume(FETCHED_MAX - 1, 0)]
            values = []
            for message in fetched:
                if message.error() is not None:
                    log.warning("replies: %s", message.error())
                else:
                    values.append((message.offset(), message.value() or b""))
            if values:
                loop.call_soon_threadsafe(self._answer, values)

    def _answer(self, values: list[tuple[int, bytes]]) -> None:
        for offset, value in values:
            try:
                request_id = _head.decode(value).request_id
            except msgspec.DecodeError:
                log.warning("undecodable reply at %s", offset)
                continue
            kind, future = self._pending.pop(request_id, (None, None))
            if future is None or future.done():
                continue
            try:
                future.set_result(msgspec.json.decode(value, type=kind))
            except msgspec.DecodeError as exc:  # the waiter learns now, not at its timeout
                future.set_exception(exc)
