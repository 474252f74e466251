"""Faust's Kafka consumer with its dropped-message bug fixed at the source.

faust-streaming 0.15.3's ``Consumer._drain_messages`` hands each fetched message
to the streams with ``wait_first(callback(message), suspend_flow.wait())`` and
then records its offset as read, whichever of the two finished. When flow is
suspended (a rebalance begins) while a message waits for room in a stream's
buffer, the delivery is cancelled and the message is never seen by the agent,
never acknowledged, and never fetched again: the processor lost it, and the
group's commits stalled at the hole. Here an undelivered message is not marked
read; its partition is rewound to it, so the next fetch delivers it again (if the
partition is still ours), and the rest of that partition's fetched messages wait
for that fetch.

The body is faust's own loop with that one change (mind it on upgrades). The
processor's position check (``streams.app.PartitionLedger``) still catches any
hole that gets through.

The consumer also reads every topic ``read_committed``, the account changelog
above all. Faust reads uncommitted unless ``processing_guarantee="exactly_once"``,
which would also hand our commits to its transaction manager. Read uncommitted,
a restore applied the state of a transaction that a killed worker left open and
its successor aborted. The restored worker then skipped that batch's records,
which the state said were applied. But Kafka's log cleaner drops aborted records,
so the next restore lost them: the crash test's accounts came up short.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, ClassVar, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, Consumer
from mode import Service, ServiceT

log = logging.getLogger(__name__)


READ_COMMITTED = "read_committed"
# Whole fetches of the lane's topic waiting for the processor; the consumer's fetch loop waits past this.
LANE_FETCHES_MAX = 4


class RecordLane:
    """One topic's fetched records, handed over in whole fetches instead of message by message.

    Faust delivers every record through its conductor, a stream, an event and an acknowledgement: about
    110 µs of CPU per record here (a do-nothing agent read 8,800 records/s where a plain consumer read
    170,000). The processor needs none of that. It keeps its own position per partition and applies in
    offset order (``streams.app.PartitionLedger``), so the records of the usage topic that Faust's consumer
    fetches are taken out of each fetch, as aiokafka returns them, before Faust's per-message path, and
    queued here whole. The rest of the fetch (the changelog, spend queries) goes on through Faust.

    The consumer's fetch loop is stopped (its task cancelled) at every rebalance; a fetch it had not yet
    queued is then simply not applied, and the processor's hole check fetches it again. So the records are
    applied by a task of their own (``get``), never inside the fetch loop, which could be cancelled mid-batch.
    At a revocation (``clear``) every fetch queued before it is dropped, also one queued while the revocation
    ran: the next assignment seeks to the committed positions, and the records come again.
    """

    def __init__(self, topic: str, fetches_max: int = LANE_FETCHES_MAX) -> None:
        self.topic = topic
        self._generation = 0  # one more at every revocation
        self._fetches: asyncio.Queue[tuple[int, list[list[Any]]]] = asyncio.Queue(fetches_max)

    async def split(self, records: Mapping[Any, list[Any]], active: set[Any] | None) -> dict[Any, list[Any]]:
        """Queue this topic's records of ``records`` (of the partitions Faust would deliver: ``active``);
        return the rest."""
        taken = [batch for tp, batch in records.items()
                 if tp.topic == self.topic and batch and (active is None or tp in active)]
        if taken:
            await self._fetches.put((self._generation, taken))
        return {tp: batch for tp, batch in records.items() if tp.topic != self.topic}

    @property
    def generation(self) -> int:
        """One more at every revocation: the fetch ``get`` returned is of the current one."""
        return self._generation

    def clear(self) -> None:
        """Drop every fetch queued so far, and any still being queued."""
        self._generation += 1
        while not self._fetches.empty():
            self._fetches.get_nowait()

    async def get(self) -> list[list[Any]]:
        """The next fetch: per partition, its records (aiokafka's ConsumerRecord) in offset order."""
        while True:
            generation, fetched = await self._fetches.get()
            if generation == self._generation:
                return fetched


class CommittedReadingThread(AIOKafkaConsumerThread):
    """Faust's consumer thread, its Kafka consumer reading only committed records."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka 0.14 keeps the level as given until start() builds its fetcher with it (mind it on upgrades).
        if getattr(consumer, "_isolation_level", None) not in ("read_uncommitted", READ_COMMITTED):
            raise RuntimeError("aiokafka's consumer no longer keeps _isolation_level: cannot read committed")
        consumer._isolation_level = READ_COMMITTED
        return consumer


class RewindingConsumer(Consumer):
    lane: ClassVar[RecordLane | None] = None  # set on a subclass per app (``with_lane``)

    @classmethod
    def with_lane(cls, lane: RecordLane) -> type[RewindingConsumer]:
        return type("LaneConsumer", (cls,), {"lane": lane})

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return CommittedReadingThread(self, loop=self.loop, beacon=self.beacon)

    async def _wait_next_records(self, timeout: float) -> tuple[Any, Any]:
        records, active = await super()._wait_next_records(timeout)
        # With the flow suspended (a rebalance), Faust's getmany drops the whole fetch and seeks back: so here.
        if records and self.lane is not None and self.flow_active:
            records = await self.lane.split(records, active)
        return records, active

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover (run by the real worker)
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set

        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for

        yield_every = 100
        num_since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                ait = cast(Any, getmany(timeout=1.0))
                await self.sleep(0)
                if not self.should_stop:
                    rewound: set[Any] = set()  # partitions whose rest of this fetch is read again
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await asyncio.sleep(0)
                            num_since_yield = 0
                        if tp in rewound:
                            continue
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            delivery = asyncio.ensure_future(callback(message))
                            await self.wait_first(delivery, self.suspend_flow.wait())
                            if delivery.done() and not delivery.cancelled():
                                delivery.result()
                                set_read_offset(tp, offset)
                            else:
                                rewound.add(tp)
                                await self._rewind(tp, offset)
                    unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def _rewind(self, tp: Any, offset: int) -> None:
        log.info("flow suspended before %s@%s reached the streams: fetching it again", tp, offset)
        try:
            await self.seek(tp, offset)
        except Exception as exc:  # no longer assigned: its next owner starts from its own position
            log.info("not rewinding %s (%r)", tp, exc)
