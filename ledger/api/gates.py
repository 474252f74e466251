"""The gate stream: server-sent events of the key's tenant's gate events, resumable without loss or repeats.

Each event's ``id:`` is a cursor: the position of every partition of the gates topic just after that
event, sealed (AES-GCM, a fresh nonce each time, bound to the tenant and the namespace) so that it
tells its holder nothing, least of all how much traffic other tenants have. A client that sends it
back (``Last-Event-ID`` or ``?last_event_id=``) resumes with the next event: records before the
cursor were either sent or belonged to another tenant. Without a cursor the stream starts at the end
(new events only); ``?from=beginning`` starts at the first event kept.

A stream holds a slot of the process (``STREAMS_MAX``) and one of its tenant's
(``Settings.gate_streams_per_tenant``) from the request until its client goes away, the key is
revoked, or the server stops; the slots are given back before anything else is awaited, so a
cancelled stream cannot keep them. See docs/security.md.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from ledger.api.auth import bearer, require
from ledger.control.keys import Scope as KeyScope
from ledger.control.store import ControlStore, Principal
from ledger.settings import Settings
from streams.topics import Topics, partitions_of

log = logging.getLogger(__name__)
router = APIRouter(tags=["gates"])
STREAMS_MAX = 32  # concurrent streams per API process: each holds a Kafka consumer
HEARTBEAT_S = 15.0
# How often an open stream asks the control plane whether its key still holds; a revoked key's streams end
# within this (plus one poll, POLL_TIMEOUT_MS).
KEY_RECHECK_S = 2.0
POLL_TIMEOUT_MS = 1000
# Stopping a consumer waits for the broker at most this long; the slots are given back before it.
CONSUMER_STOP_TIMEOUT_S = 5.0
CURSOR_LENGTH_MAX = 16_384
RECORDS_PER_POLL_MAX = 500
OFFSET_MAX = 2 ** 63 - 1  # Kafka offsets are signed 64-bit
PARTITION_MAX = 65_535
CURSOR_VERSION = b"\x01"
CURSOR_NONCE_BYTES = 12
CURSOR_KEY_BYTES = 32
CURSOR_KEY_FILE = "gate-cursor.key"
_POSITION = struct.Struct(">HQ")  # partition, next offset


class StreamSlots:
    """Bounds on concurrent streams, one for the process and one per tenant.

    A slot is taken before the consumer starts; ``Slot.release`` gives it back (at most once).
    """

    def __init__(self, limit: int = STREAMS_MAX, per_tenant: int = STREAMS_MAX) -> None:
        self.limit, self.per_tenant = limit, per_tenant
        self.used = 0
        self.by_tenant: Counter[str] = Counter()

    def take(self, tenant_id: str) -> Slot:
        if self.by_tenant[tenant_id] >= self.per_tenant:
            raise HTTPException(429, f"{self.per_tenant} gate streams of this tenant are open, the most allowed "
                                     "(LEDGER_GATE_STREAMS_PER_TENANT); close one first", headers={"Retry-After": "5"})
        if self.used >= self.limit:
            raise HTTPException(503, f"{self.limit} gate streams are open on this server; retry later",
                                headers={"Retry-After": "5"})
        self.used += 1
        self.by_tenant[tenant_id] += 1
        return Slot(self, tenant_id)

    def _give_back(self, tenant_id: str) -> None:
        self.used -= 1
        self.by_tenant[tenant_id] -= 1
        if not self.by_tenant[tenant_id]:
            del self.by_tenant[tenant_id]


def observe(slots: StreamSlots, registry: Any) -> None:
    """``ledger_api_gate_streams_open`` on the API's /metrics: the process's count, never a tenant's."""
    from prometheus_client import Gauge

    Gauge("ledger_api_gate_streams_open", "Gate streams (SSE) open on this API process",
          registry=registry).set_function(lambda: slots.used)


class Slot:
    def __init__(self, slots: StreamSlots, tenant_id: str) -> None:
        self._slots, self._tenant_id, self._held = slots, tenant_id, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots._give_back(self._tenant_id)


# -- cursors -----------------------------------------------------------------------------------------------------


class CursorSeal:
    """Seals a stream's positions into a cursor only this server's key opens, for this tenant and namespace.

    The sealed text has the same length for any offsets and differs every time, so cursors compared over
    time reveal nothing about how far any partition moved.
    """

    def __init__(self, key: bytes, namespace: str) -> None:
        if len(key) != CURSOR_KEY_BYTES:
            raise ValueError(f"a cursor key is {CURSOR_KEY_BYTES} bytes")
        self._aead, self._namespace = AESGCM(key), namespace

    def _context(self, tenant_id: str) -> bytes:
        return f"gate-cursor\x00{self._namespace}\x00{tenant_id}".encode()

    def seal(self, tenant_id: str, positions: dict[int, int]) -> str:
        plain = b"".join(_POSITION.pack(p, o) for p, o in sorted(positions.items()))
        nonce = secrets.token_bytes(CURSOR_NONCE_BYTES)
        sealed = CURSOR_VERSION + nonce + self._aead.encrypt(nonce, plain, CURSOR_VERSION + self._context(tenant_id))
        return base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(self, tenant_id: str, cursor: str, partitions: list[int]) -> dict[int, int]:
        """Partition -> next offset; a 422 for anything that is not a cursor this stream gave this tenant."""
        problem = HTTPException(422, f"last_event_id {cursor[:64]!r} is not a cursor from this stream: send back "
                                     "an `id:` the stream sent this tenant, or none to start at the end")
        if len(cursor) > CURSOR_LENGTH_MAX or not cursor.isascii():
            raise problem
        try:
            sealed = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            version, nonce, body = sealed[:1], sealed[1:1 + CURSOR_NONCE_BYTES], sealed[1 + CURSOR_NONCE_BYTES:]
            if version != CURSOR_VERSION or len(nonce) != CURSOR_NONCE_BYTES:
                raise ValueError
            plain = self._aead.decrypt(nonce, body, CURSOR_VERSION + self._context(tenant_id))
            if not plain or len(plain) % _POSITION.size:
                raise ValueError
            pairs = [_POSITION.unpack_from(plain, at) for at in range(0, len(plain), _POSITION.size)]
        except (ValueError, binascii.Error, InvalidTag):
            raise problem from None
        positions = dict(pairs)
        if len(positions) != len(pairs) or not set(positions) <= set(partitions) \
                or any(not 0 <= o <= OFFSET_MAX for o in positions.values()):
            raise problem
        return positions


def cursor_key(settings: Settings) -> bytes:
    """``LEDGER_CURSOR_SECRET`` (hex, 32 bytes), else a key made once and kept in the home folder (mode 0600).

    Several API processes that serve one namespace need the same key (the setting, or a shared home), so a
    cursor from one opens on another; a new key invalidates the cursors given out before (a 422, then the
    client starts again without one).
    """
    if settings.cursor_secret is not None:
        return bytes.fromhex(settings.cursor_secret)
    path = Path(settings.home) / CURSOR_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be writing it right now
            key = bytes.fromhex(path.read_text().strip() or "00")
            if len(key) == CURSOR_KEY_BYTES:
                return key
            time.sleep(0.02)
        raise ValueError(f"{path} does not hold a {CURSOR_KEY_BYTES}-byte hex key") from None
    key = secrets.token_bytes(CURSOR_KEY_BYTES)
    with os.fdopen(fd, "w") as out:
        out.write(key.hex())
    return key


# -- the stream --------------------------------------------------------------------------------------------------


class GateStream:
    """One open stream: its consumer, its slot, and the check that its key still holds."""

    def __init__(self, consumer: Any, positions: dict[int, int], tenant_id: str, slot: Slot, seal: CursorSeal,
                 key_holds: Callable[[], Awaitable[bool]]) -> None:
        self.consumer, self.positions, self.tenant_id = consumer, positions, tenant_id
        self.slot, self.seal, self.key_holds = slot, seal, key_holds
        self._closed = False

    def _id(self) -> bytes:
        return self.seal.seal(self.tenant_id, self.positions).encode()

    async def events(self) -> AsyncIterator[bytes]:
        prefix = f"{self.tenant_id}/".encode()
        try:
            # An `id:` without data moves the client's Last-Event-ID too: a reconnect then skips what was already
            # read, even before (or long after) the tenant's last event.
            yield b"id: %s\n: stream open\n\n" % self._id()
            last_sent = last_checked = time.monotonic()
            while True:
                batch = await self.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=RECORDS_PER_POLL_MAX)
                for tp, records in batch.items():
                    for record in records:
                        # Advance before sending: the cursor of this event covers everything read so far.
                        self.positions[tp.partition] = record.offset + 1
                        if record.key is not None and record.key.startswith(prefix):
                            yield b"id: %s\nevent: gate\ndata: %s\n\n" % (self._id(), record.value)
                            last_sent = time.monotonic()
                if time.monotonic() - last_checked >= KEY_RECHECK_S:
                    if not await self.key_holds():
                        yield b": the key was revoked; stream closed\n\n"
                        return
                    last_checked = time.monotonic()
                if time.monotonic() - last_sent >= HEARTBEAT_S:
                    yield b"id: %s\n: heartbeat\n\n" % self._id()
                    last_sent = time.monotonic()
        finally:
            await self.close()

    async def close(self) -> None:
        """Give the slot back, then stop the consumer; safe to call twice, and from a cancelled task."""
        if self._closed:
            return
        self._closed = True
        self.slot.release()  # first, and without awaiting: a cancelled task may not get past its next await
        with anyio.CancelScope(shield=True), anyio.move_on_after(CONSUMER_STOP_TIMEOUT_S):
            try:
                await self.consumer.stop()
            except Exception:  # the slot is back already; a consumer that fails to stop is only logged
                log.warning("a gate stream's consumer did not stop cleanly", exc_info=True)


class GateStreamResponse(StreamingResponse):
    """A streaming response that closes its stream however the response ends, even if it never began."""

    def __init__(self, stream: GateStream) -> None:
        super().__init__(stream.events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.close()


def _key_check(store: ControlStore, key: str, tenant_id: str) -> Callable[[], Awaitable[bool]]:
    return _still_holds(store, lambda session: session.authenticate(key), tenant_id)


def key_id_check(store: ControlStore, key_id: str, tenant_id: str) -> Callable[[], Awaitable[bool]]:
    """The revocation check of a stream opened by a key known by its id (the console's sessions)."""
    return _still_holds(store, lambda session: session.principal(key_id), tenant_id)


def _still_holds(store: ControlStore, lookup: Callable[[Any], Principal | None],
                 tenant_id: str) -> Callable[[], Awaitable[bool]]:
    def holds() -> bool:
        with store.session() as session:
            found = lookup(session)
        return found is not None and found.tenant_id == tenant_id

    async def check() -> bool:
        try:
            return await run_in_threadpool(holds)
        except Exception:  # fail closed: the client resumes with its cursor once the database answers again
            log.warning("could not check a gate stream's key; closing the stream", exc_info=True)
            return False

    return check


@router.get("/gates/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "one `gate` event per gate event"},
                       429: {"description": "The tenant has as many open streams as it may (Retry-After)."},
                       503: {"description": "The server has as many open streams as it may (Retry-After)."}},
            summary="Gate events of your tenant as server-sent events, resumable with Last-Event-ID")
async def gate_stream(
        request: Request,
        who: Principal = Depends(require(KeyScope.read, KeyScope.admin)),
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
        last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
        last_event_id: Annotated[str | None, Query(description="The cursor, when a header cannot be sent.")] = None,
        start: Annotated[Literal["end", "beginning"], Query(alias="from")] = "end") -> StreamingResponse:
    assert credentials is not None  # `who` exists, so the key was sent
    return await open_gate_stream(request, who, _key_check(request.app.state.store, credentials.credentials,
                                                           who.tenant_id),
                                  last_event_id_header or last_event_id, start)


async def open_gate_stream(request: Request, who: Principal, key_check: Callable[[], Awaitable[bool]],
                           cursor: str | None, start: Literal["end", "beginning"] = "end") -> StreamingResponse:
    """A tenant's gate stream from ``cursor`` (or its start); ``key_check`` says whether its key still holds."""
    state = request.app.state
    settings: Settings = state.settings
    topic = Topics.for_namespace(settings.namespace).gates
    partitions = (await partitions_of(settings.bootstrap, (topic,))).get(topic)
    if not partitions:
        raise HTTPException(503, "the gates topic does not exist yet", headers={"Retry-After": "5"})
    seal: CursorSeal = state.gate_cursors
    resume = seal.open(who.tenant_id, cursor, partitions) if cursor else None
    slots: StreamSlots = state.gate_streams
    slot = slots.take(who.tenant_id)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False)
    stream = GateStream(consumer, {}, who.tenant_id, slot, seal, key_check)
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
        stream.positions.update({tp.partition: await consumer.position(tp) for tp in tps})
    except BaseException:
        await stream.close()
        raise
    return GateStreamResponse(stream)
