"""The usage topic's records leave Faust's consumer in whole fetches (streams.faust_consumer.RecordLane)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from faust.types import TP

from streams.faust_consumer import RecordLane


def records(topic: str, partition: int, offsets: range) -> list[SimpleNamespace]:
    return [SimpleNamespace(topic=topic, partition=partition, offset=o) for o in offsets]


async def test_a_fetch_is_split_into_the_lanes_records_queued_whole_and_the_rest_returned() -> None:
    lane = RecordLane("ns.usage")
    usage_0, usage_1, paused = TP("ns.usage", 0), TP("ns.usage", 1), TP("ns.usage", 2)
    changelog = TP("ns-processor-accounts-changelog", 0)
    fetched = {usage_0: records("ns.usage", 0, range(5, 8)), changelog: records("c", 0, range(3)),
               usage_1: records("ns.usage", 1, range(0, 2)), paused: records("ns.usage", 2, range(1))}

    rest = await lane.split(fetched, active={usage_0, usage_1, changelog})

    assert rest == {changelog: fetched[changelog]}  # Faust delivers the changelog as before
    # The active partitions' records, each partition's in order, in one fetch; a paused partition's are dropped,
    # as Faust's own getmany drops them (they are fetched again once it resumes).
    assert await lane.get() == [fetched[usage_0], fetched[usage_1]]


async def test_a_fetch_without_the_lanes_topic_queues_nothing() -> None:
    lane = RecordLane("ns.usage")
    only = {TP("ns.queries", 0): records("ns.queries", 0, range(2))}
    assert await lane.split(only, active=None) == only
    assert lane._fetches.empty()


async def test_the_fetch_loop_waits_while_the_processor_is_behind() -> None:
    lane = RecordLane("ns.usage", fetches_max=1)
    tp = TP("ns.usage", 0)
    await lane.split({tp: records("ns.usage", 0, range(1))}, active=None)
    second = asyncio.ensure_future(lane.split({tp: records("ns.usage", 0, range(1, 2))}, active=None))
    await asyncio.sleep(0.01)
    assert not second.done()  # backpressure: the consumer fetches no further meanwhile
    assert [r.offset for r in (await lane.get())[0]] == [0]
    await asyncio.wait_for(second, 1)
    assert [r.offset for r in (await lane.get())[0]] == [1]


async def test_a_revocation_drops_the_fetches_queued_before_it_and_one_being_queued() -> None:
    lane = RecordLane("ns.usage", fetches_max=1)
    tp = TP("ns.usage", 0)
    await lane.split({tp: records("ns.usage", 0, range(1))}, active=None)
    blocked = asyncio.ensure_future(lane.split({tp: records("ns.usage", 0, range(1, 2))}, active=None))
    await asyncio.sleep(0.01)
    before = lane.generation

    lane.clear()  # the fetch loop was waiting to queue offset 1: it queues it now, under the old generation
    await asyncio.wait_for(blocked, 1)
    after = asyncio.ensure_future(lane.split({tp: records("ns.usage", 0, range(7, 9))}, active=None))

    assert [r.offset for r in (await asyncio.wait_for(lane.get(), 1))[0]] == [7, 8]
    await asyncio.wait_for(after, 1)
    assert lane.generation == before + 1
