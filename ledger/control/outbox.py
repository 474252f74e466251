"""The outbox relay: publishes the commands that control-plane changes recorded, after their commit.

A change that affects a user's decisions (a plan version, an assignment, a top-up) is recorded
in the control plane together with its commands in the outbox, in one short transaction. Then
the relay publishes the outbox to the usage log in outbox order and deletes what the broker has
acknowledged. No transaction is held while Kafka is waited on, and nothing is lost:

- a crash after the commit and before the publish leaves the commands in the outbox; the next
  relay pass (at the API's start, every ``OUTBOX_RELAY_INTERVAL_S``, or the next change) publishes them;
- a crash after the publish and before the delete publishes them again: the same bytes, the same
  event ids, which the processor recognises (a plan version already published with the same content
  is a duplicate; an assignment or top-up is deduplicated on its event id).

One relay at a time publishes (a lease in the control plane, renewed per batch), so the log keeps
the outbox order across processes too; within a tenant that is the order of the commits, because
the writers of a tenant's configuration hold its lock (``ControlSession.lock_tenant``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import msgspec

from ledger.control.config import CommandLog
from ledger.control.store import ControlSession, ControlStore
from ledger.events import AnyCommand

OUTBOX_BATCH_MAX = 500          # commands per publish
OUTBOX_LEASE_S = 30             # a relay that dies holding the lease blocks others this long at most
OUTBOX_WAIT_S = 10.0            # how long a request waits for its commands to be published
OUTBOX_POLL_S = 0.05            # while another process holds the lease
OUTBOX_RELAY_INTERVAL_S = 5.0   # the API's background pass (repairs what a crash left)

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyCommand)


def encode(commands: Sequence[AnyCommand]) -> list[bytes]:
    return [_encoder.encode(c) for c in commands]


def enqueue(session: ControlSession, tenant_id: str, commands: Sequence[AnyCommand]) -> list[int]:
    """Record commands in the outbox within the caller's unit of work; returns their sequence numbers."""
    return session.enqueue(tenant_id, encode(commands)) if commands else []


class NotYetPublished(Exception):
    """The change is recorded, but its commands were not published in time; the relay keeps trying."""


class Relay:
    def __init__(self, store: ControlStore, command_log: CommandLog) -> None:
        self.store = store
        self.log = command_log
        self.holder = str(uuid.uuid4())
        self._lock = asyncio.Lock()  # one pass at a time in this process

    async def deliver(self, seqs: Sequence[int], wait_s: float = OUTBOX_WAIT_S) -> None:
        """Publish the outbox until ``seqs`` are published. Raises the log's error, or NotYetPublished."""
        if not seqs:
            return
        deadline = time.monotonic() + wait_s
        while True:
            await self.flush()
            left = await asyncio.to_thread(self.store.transact, lambda s: s.unpublished(seqs))
            if not left:
                return
            if time.monotonic() > deadline:
                raise NotYetPublished(f"{len(left)} commands are recorded and wait for the usage log")
            await asyncio.sleep(OUTBOX_POLL_S)  # another process holds the lease and is publishing them

    async def flush(self) -> bool:
        """Publish everything in the outbox, oldest first. False if another process holds the lease."""
        async with self._lock:
            if not await asyncio.to_thread(self.store.transact, lambda s: s.outbox(1)):
                return True  # nothing to publish: no need to write the lease
            if not await asyncio.to_thread(self.store.transact, self._take_lease):
                return False
            try:
                while True:
                    batch = await asyncio.to_thread(self.store.transact, lambda s: s.outbox(OUTBOX_BATCH_MAX))
                    if not batch:
                        return True
                    await self.log.publish([_decoder.decode(command) for _, command in batch])
                    done = [seq for seq, _ in batch]
                    await asyncio.to_thread(self.store.transact, lambda s, done=done: s.forget_published(done))
                    if not await asyncio.to_thread(self.store.transact, self._take_lease):
                        return True  # our lease ran out mid-way; its new holder goes on from here
            finally:
                await asyncio.to_thread(self.store.transact, lambda s: s.release_relay_lease(self.holder))

    async def run(self, interval_s: float = OUTBOX_RELAY_INTERVAL_S) -> None:
        """Flush now and every ``interval_s`` until cancelled; a failure is logged and tried again."""
        while True:
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:  # the broker or the database is away: the next pass tries again
                log.warning("the outbox relay could not publish; trying again in %.0fs", interval_s, exc_info=True)
            await asyncio.sleep(interval_s)

    def _take_lease(self, session: ControlSession) -> bool:
        now = datetime.now(UTC)
        return session.take_relay_lease(self.holder, now, now + timedelta(seconds=OUTBOX_LEASE_S))
