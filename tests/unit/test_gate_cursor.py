"""The gate stream's cursor and its bound on concurrent streams (the stream itself: tests/integration/test_sdk_live.py)."""

from __future__ import annotations

import base64

import pytest
from aiokafka import TopicPartition
from fastapi import HTTPException

from ledger.api import gates
from ledger.api.gates import CURSOR_LENGTH_MAX, StreamSlots, decode_cursor, encode_cursor

PARTITIONS = list(range(8))


@pytest.mark.parametrize("positions", [{0: 0}, {p: 10 ** p for p in PARTITIONS}, {3: 7, 1: 2}])
def test_a_cursor_round_trips(positions):
    cursor = encode_cursor(positions)
    assert "=" not in cursor and decode_cursor(cursor, PARTITIONS) == positions


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize("cursor", ["not base64 at all!", _b64("0:1,zz"), _b64("0:-1"), _b64("9:1"), _b64(""),
                                    _b64("0:1:2"), "A" * (CURSOR_LENGTH_MAX + 1), _b64("\xff")])
def test_anything_else_is_a_422_that_says_so(cursor):
    with pytest.raises(HTTPException) as raised:
        decode_cursor(cursor, PARTITIONS)
    assert raised.value.status_code == 422 and "not a cursor" in raised.value.detail


def test_streams_beyond_the_bound_answer_503_until_one_closes():
    slots = StreamSlots(limit=2)
    slots.take()
    slots.take()
    with pytest.raises(HTTPException) as raised:
        slots.take()
    assert raised.value.status_code == 503 and raised.value.headers == {"Retry-After": "5"}
    slots.give_back()
    slots.take()
    assert slots.used == 2


class Record:
    def __init__(self, offset: int, key: bytes, value: bytes) -> None:
        self.offset, self.key, self.value = offset, key, value


class Polls:
    """Stands in for the stream's Kafka consumer: one scripted poll after another, then nothing."""

    def __init__(self, *polls: dict[int, list[Record]]) -> None:
        self.polls = list(polls)
        self.stopped = False

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        poll = self.polls.pop(0) if self.polls else {}
        return {TopicPartition("gates", p): records for p, records in poll.items()}

    async def stop(self) -> None:
        self.stopped = True


async def test_the_stream_sends_its_tenants_events_with_the_cursor_after_each_and_heartbeats_when_idle(monkeypatch):
    monkeypatch.setattr(gates, "HEARTBEAT_S", 0.0)
    consumer = Polls({0: [Record(5, b"t1/a", b'{"n":1}'), Record(6, b"t2/a", b'{"n":2}')],
                      1: [Record(9, b"t1/b", b'{"n":3}')]})
    slots = StreamSlots(limit=1)
    slots.take()
    stream = gates._events(consumer, {0: 5, 1: 9}, "t1", slots)

    frames = [await anext(stream) for _ in range(4)]
    await stream.aclose()

    assert frames[0] == b"id: %s\n: stream open\n\n" % encode_cursor({0: 5, 1: 9}).encode()
    assert frames[1] == b"id: %s\nevent: gate\ndata: {\"n\":1}\n\n" % encode_cursor({0: 6, 1: 9}).encode()
    # t2's record is skipped, and the next cursor has moved past it too.
    assert frames[2] == b"id: %s\nevent: gate\ndata: {\"n\":3}\n\n" % encode_cursor({0: 7, 1: 10}).encode()
    assert frames[3] == b"id: %s\n: heartbeat\n\n" % encode_cursor({0: 7, 1: 10}).encode()
    assert consumer.stopped and slots.used == 0
