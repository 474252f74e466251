"""The gate stream's cursor and its bounds on concurrent streams (the stream itself: tests/integration/test_sdk_live.py
and tests/integration/test_gate_stream_limits.py)."""

from __future__ import annotations

import base64
import secrets

import pytest
from aiokafka import TopicPartition
from fastapi import HTTPException

from ledger.api import gates
from ledger.api.gates import CURSOR_LENGTH_MAX, CursorSeal, GateStream, StreamSlots, cursor_key
from ledger.settings import Settings

PARTITIONS = list(range(8))
KEY = secrets.token_bytes(32)
SEAL = CursorSeal(KEY, "ns")


@pytest.mark.parametrize("positions", [{0: 0}, {p: 10 ** p for p in PARTITIONS}, {3: 7, 1: 2}, {0: 2 ** 63 - 1}])
def test_a_cursor_round_trips(positions):
    cursor = SEAL.seal("t1", positions)
    assert "=" not in cursor and SEAL.open("t1", cursor, PARTITIONS) == positions


def _b64(text: str | bytes) -> str:
    return base64.urlsafe_b64encode(text.encode() if isinstance(text, str) else text).decode()


def _tampered() -> str:
    raw = bytearray(base64.urlsafe_b64decode(SEAL.seal("t1", {0: 1}) + "=="))
    raw[-1] ^= 1
    return _b64(bytes(raw))


@pytest.mark.parametrize("cursor", [
    "not base64 at all!", _b64("0:1,zz"), _b64("0:-1"), _b64("9:1"), _b64(""), _b64("0:1:2"),
    "A" * (CURSOR_LENGTH_MAX + 1), _b64("\xff"),
    # Cursors of the old plain format, among them the one that ended the stream with an unhandled error.
    _b64("0:9223372036854775808"), _b64("0:1,1:2,2:3,3:4,4:5,5:6,6:7,7:8,8:9"), _b64("0:1"),
    "é" * 10, "\ud800", _tampered(),
    SEAL.seal("t2", {0: 1}),  # another tenant's
    CursorSeal(secrets.token_bytes(32), "ns").seal("t1", {0: 1}),  # another server's key
    CursorSeal(KEY, "other").seal("t1", {0: 1}),  # another namespace's
    SEAL.seal("t1", {9: 1}),  # a partition the topic does not have
])
def test_anything_else_is_a_422_that_says_so(cursor):
    with pytest.raises(HTTPException) as raised:
        SEAL.open("t1", cursor, PARTITIONS)
    assert raised.value.status_code == 422 and "not a cursor" in raised.value.detail


def test_a_cursor_reveals_no_offset_not_even_by_its_length_or_by_repeating():
    """The old cursor was base64 of ``0:5,1:9``: every partition's offset, so a tenant saw others' traffic."""
    quiet, busy = {p: 0 for p in PARTITIONS}, {p: 10 ** 12 + p for p in PARTITIONS}
    cursors = [SEAL.seal("t1", quiet), SEAL.seal("t1", quiet), SEAL.seal("t1", busy)]
    assert len({len(c) for c in cursors}) == 1
    assert len(set(cursors)) == 3  # the same positions twice: two unrelated cursors
    for cursor in cursors:
        raw = base64.urlsafe_b64decode(cursor + "==")
        assert b"0:" not in raw and (10 ** 12).to_bytes(8, "big")[:6] not in raw


def test_the_cursor_key_is_made_once_per_home_and_kept_private(tmp_path):
    settings = Settings(home=tmp_path)
    key = cursor_key(settings)
    assert len(key) == 32 and cursor_key(settings) == key
    assert (tmp_path / gates.CURSOR_KEY_FILE).stat().st_mode & 0o077 == 0
    assert cursor_key(Settings(home=tmp_path, cursor_secret="ab" * 32)) == bytes.fromhex("ab" * 32)


def test_streams_beyond_the_bound_answer_503_until_one_closes():
    slots = StreamSlots(limit=2)
    first = slots.take("t1")
    slots.take("t2")
    with pytest.raises(HTTPException) as raised:
        slots.take("t3")
    assert raised.value.status_code == 503 and raised.value.headers == {"Retry-After": "5"}
    first.release()
    first.release()  # given back once only
    slots.take("t3")
    assert slots.used == 2


def test_a_tenant_beyond_its_quota_gets_429_and_others_are_served():
    slots = StreamSlots(limit=10, per_tenant=2)
    held = [slots.take("t1"), slots.take("t1")]
    with pytest.raises(HTTPException) as raised:
        slots.take("t1")
    assert raised.value.status_code == 429 and "LEDGER_GATE_STREAMS_PER_TENANT" in raised.value.detail
    assert raised.value.headers == {"Retry-After": "5"}
    slots.take("t2")
    held[0].release()
    slots.take("t1")
    assert slots.by_tenant == {"t1": 2, "t2": 1}


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


def _frame_cursor(frame: bytes) -> dict[int, int]:
    assert frame.startswith(b"id: ")
    return SEAL.open("t1", frame[4:frame.index(b"\n")].decode(), PARTITIONS)


async def _holds() -> bool:
    return True


async def test_the_stream_sends_its_tenants_events_with_the_cursor_after_each_and_heartbeats_when_idle(monkeypatch):
    monkeypatch.setattr(gates, "HEARTBEAT_S", 0.0)
    consumer = Polls({0: [Record(5, b"t1/a", b'{"n":1}'), Record(6, b"t2/a", b'{"n":2}')],
                      1: [Record(9, b"t1/b", b'{"n":3}')]})
    slots = StreamSlots(limit=1)
    stream = GateStream(consumer, {0: 5, 1: 9}, "t1", slots.take("t1"), SEAL, _holds).events()

    frames = [await anext(stream) for _ in range(4)]
    await stream.aclose()

    assert frames[0].endswith(b"\n: stream open\n\n") and _frame_cursor(frames[0]) == {0: 5, 1: 9}
    assert frames[1].endswith(b"\nevent: gate\ndata: {\"n\":1}\n\n") and _frame_cursor(frames[1]) == {0: 6, 1: 9}
    # t2's record is skipped, and the next cursor has moved past it too.
    assert frames[2].endswith(b"\nevent: gate\ndata: {\"n\":3}\n\n") and _frame_cursor(frames[2]) == {0: 7, 1: 10}
    assert frames[3].endswith(b"\n: heartbeat\n\n") and _frame_cursor(frames[3]) == {0: 7, 1: 10}
    assert consumer.stopped and slots.used == 0


async def test_a_stream_whose_key_no_longer_holds_ends_and_gives_its_slot_back(monkeypatch):
    monkeypatch.setattr(gates, "KEY_RECHECK_S", 0.0)
    answers = [True, False]

    async def holds() -> bool:
        return answers.pop(0)

    consumer = Polls()
    slots = StreamSlots(limit=1)
    frames = [f async for f in GateStream(consumer, {0: 0}, "t1", slots.take("t1"), SEAL, holds).events()]
    assert frames[-1] == b": the key was revoked; stream closed\n\n" and len(frames) == 2
    assert consumer.stopped and slots.used == 0


async def test_a_stream_cancelled_while_it_polls_gives_its_slot_back():
    """Starlette cancels the response's task when the client goes away: the old code's ``finally`` awaited the
    consumer's stop first, which the cancellation interrupted, so the slot was never given back."""
    import anyio

    class Hanging(Polls):
        async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
            await anyio.sleep(3600)
            return {}

        async def stop(self) -> None:
            await anyio.sleep(0.01)  # a real stop awaits the broker
            self.stopped = True

    consumer = Hanging()
    slots = StreamSlots(limit=1)
    stream = GateStream(consumer, {0: 0}, "t1", slots.take("t1"), SEAL, _holds)

    async def listen() -> None:
        async for _ in stream.events():
            pass

    async with anyio.create_task_group() as group:
        group.start_soon(listen)
        await anyio.sleep(0.05)
        group.cancel_scope.cancel()
    assert slots.used == 0 and consumer.stopped
