"""The gate stream: server-sent events of the key's tenant's gate events, resumable without loss or repeats.

Each event's ``id:`` is a cursor: the position of every partition of the gates topic just after
that event (base64 of ``"partition:offset,..."``). A client that sends it back (``Last-Event-ID``
or ``?last_event_id=``) resumes with the next event: records before the cursor were either sent
or belonged to another tenant. Without a cursor the stream starts at the end (new events only);
``?from=beginning`` starts at the first event kept.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from ledger.api.auth import require
from ledger.control.keys import Scope
from ledger.control.store import Principal
from streams.topics import Topics, partitions_of

router = APIRouter(tags=["gates"])
STREAMS_MAX = 32  # concurrent streams per API process: each holds a Kafka consumer
HEARTBEAT_S = 15.0
CURSOR_LENGTH_MAX = 16_384
RECORDS_PER_POLL_MAX = 500


class StreamSlots:
    """A bound on concurrent streams: a slot is taken before the consumer starts and given back when it stops."""

    def __init__(self, limit: int = STREAMS_MAX) -> None:
        self.limit, self.used = limit, 0

    def take(self) -> None:
        if self.used >= self.limit:
            raise HTTPException(503, f"{self.limit} gate streams are open on this server; retry later",
                                headers={"Retry-After": "5"})
        self.used += 1

    def give_back(self) -> None:
        self.used -= 1


def encode_cursor(positions: dict[int, int]) -> str:
    text = ",".join(f"{p}:{o}" for p, o in sorted(positions.items()))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, partitions: list[int]) -> dict[int, int]:
    """Partition -> next offset; a 422 for anything that is not a cursor of this topic."""
    problem = f"last_event_id {cursor[:64]!r} is not a cursor from this stream"
    if len(cursor) > CURSOR_LENGTH_MAX:
        raise HTTPException(422, problem)
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        positions = {int(p): int(o) for p, o in (item.split(":") for item in text.split(","))}
    except (ValueError, binascii.Error):
        raise HTTPException(422, problem) from None
    if not set(positions) <= set(partitions) or any(o < 0 for o in positions.values()):
        raise HTTPException(422, problem)
    return positions


async def _events(consumer: AIOKafkaConsumer, positions: dict[int, int], tenant_id: str,
                  slots: StreamSlots) -> AsyncIterator[bytes]:
    prefix = f"{tenant_id}/".encode()
    try:
        # An `id:` without data moves the client's Last-Event-ID too: a reconnect then skips what was already
        # read, even before (or long after) the tenant's last event.
        yield b"id: %s\n: stream open\n\n" % encode_cursor(positions).encode()
        last_sent = time.monotonic()
        while True:
            batch = await consumer.getmany(timeout_ms=1000, max_records=RECORDS_PER_POLL_MAX)
            for tp, records in batch.items():
                for record in records:
                    # Advance before sending: the cursor of this event covers everything read so far.
                    positions[tp.partition] = record.offset + 1
                    if record.key is not None and record.key.startswith(prefix):
                        yield b"id: %s\nevent: gate\ndata: %s\n\n" % (encode_cursor(positions).encode(), record.value)
                        last_sent = time.monotonic()
            if time.monotonic() - last_sent >= HEARTBEAT_S:
                yield b"id: %s\n: heartbeat\n\n" % encode_cursor(positions).encode()
                last_sent = time.monotonic()
    finally:
        await consumer.stop()
        slots.give_back()


@router.get("/gates/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "one `gate` event per gate event"}},
            summary="Gate events of your tenant as server-sent events, resumable with Last-Event-ID")
async def gate_stream(
        request: Request,
        who: Principal = Depends(require(Scope.read, Scope.admin)),
        last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
        last_event_id: Annotated[str | None, Query(description="The cursor, when a header cannot be sent.")] = None,
        start: Annotated[Literal["end", "beginning"], Query(alias="from")] = "end") -> StreamingResponse:
    settings = request.app.state.settings
    topic = Topics.for_namespace(settings.namespace).gates
    partitions = (await partitions_of(settings.bootstrap, (topic,))).get(topic)
    if not partitions:
        raise HTTPException(503, "the gates topic does not exist yet", headers={"Retry-After": "5"})
    cursor = last_event_id_header or last_event_id
    resume = decode_cursor(cursor, partitions) if cursor else None
    slots: StreamSlots = request.app.state.gate_streams
    slots.take()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False)
    try:
        await consumer.start()
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        if resume is None:
            await (consumer.seek_to_beginning if start == "beginning" else consumer.seek_to_end)(*tps)
        else:  # a partition the cursor does not name is newer than the cursor: all of it is unread
            await consumer.seek_to_beginning(*[tp for tp in tps if tp.partition not in resume])
            for tp in tps:
                if tp.partition in resume:
                    consumer.seek(tp, resume[tp.partition])
        # Resolve every position now, so "the end" is the end at the time of the request.
        positions = {tp.partition: await consumer.position(tp) for tp in tps}
    except BaseException:
        await consumer.stop()
        slots.give_back()
        raise
    return StreamingResponse(_events(consumer, positions, who.tenant_id, slots), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
