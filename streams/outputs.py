"""The processor's outputs (entries, gates, replies, dead letters) through librdkafka, one future per batch.

aiokafka's ``send`` makes a Python future per message, and its accumulator and sender run on the
event loop: about 12% of the worker at full speed, 7% in ``create_future`` and ``get_running_loop``
alone. confluent-kafka's producer queues each message in C and delivers in its own threads; here a
thread serves its delivery reports, counts them per batch, and resolves the batch's one asyncio future
once every message of the batch is acknowledged by all in-sync replicas (or fails it with the first
error). The writer awaits that future before it stores the batch's state, as before.

Keys are partitioned as Kafka's Java client and aiokafka partition them (murmur2), so a user's outputs
stay in one partition whichever producer wrote them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import confluent_kafka

POLL_S = 0.05
# Messages librdkafka holds before produce() refuses more (it then waits for deliveries).
QUEUE_MESSAGES_MAX = 500_000
QUEUE_FULL_WAIT_S = 0.005


class OutputError(RuntimeError):
    """An output was not acknowledged: the batch's state must not be stored."""


class _Batch:
    __slots__ = ("future", "loop", "left", "error")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], count: int) -> None:
        self.loop, self.future, self.left, self.error = loop, future, count, None

    def delivered(self, err: Any, _msg: Any) -> None:  # in the poll thread
        if err is not None and self.error is None:
            self.error = err
        self.left -= 1
        if self.left == 0:
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self.future.done():
            return
        if self.error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(OutputError(f"an output was not acknowledged: {self.error}"))


class OutputProducer:
    """An idempotent librdkafka producer (acks from all replicas) whose sends resolve one future per batch."""

    def __init__(self, bootstrap: str, message_bytes_max: int) -> None:
        self._producer = confluent_kafka.Producer({
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 0,  # a lone check's answer goes at once; under load, messages queue behind requests in flight
            "socket.nagle.disable": True,  # nor does the kernel hold it back (asyncio's sockets, aiokafka's, do the same)
            "partitioner": "murmur2_random",
            "message.max.bytes": message_bytes_max,
            "queue.buffering.max.messages": QUEUE_MESSAGES_MAX,
        })
        # Never stopped: a worker ends by exiting, and a batch's state is stored only once its outputs are
        # acknowledged, so an output still queued at the exit is sent again by the next owner.
        threading.Thread(target=self._poll, name="output-deliveries", daemon=True).start()

    def _poll(self) -> None:
        while True:
            self._producer.poll(POLL_S)

    def send(self, messages: Sequence[tuple[str, bytes | None, bytes]]) -> asyncio.Future[None]:
        """Queue ``messages`` (topic, key, value), partitioned by key; the future resolves when all are acknowledged."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not messages:
            future.set_result(None)
            return future
        batch = _Batch(loop, future, len(messages))
        produce = self._producer.produce
        for topic, key, value in messages:
            while True:
                try:
                    produce(topic, value, key, on_delivery=batch.delivered)
                    break
                except BufferError:  # librdkafka's queue is full: the poll thread serves deliveries meanwhile
                    time.sleep(QUEUE_FULL_WAIT_S)
        return future
