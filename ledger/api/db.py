"""Units of work from the routes: run in a thread (lock waits and retries never block the event loop),
then their outbox commands published (see ``ledger.control.outbox``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from aiokafka.errors import KafkaError  # type: ignore[import-untyped]
from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from ledger.control.outbox import NotYetPublished, Relay
from ledger.control.store import ControlSession, ControlStore, LimitExceeded

T = TypeVar("T")


async def unit_of_work(request: Request, work: Callable[[ControlSession], T]) -> T:
    """``work`` in one transaction, retried on transient lock errors; a full quota answers 409."""
    store: ControlStore = request.app.state.store
    try:
        return await run_in_threadpool(store.transact, work)
    except LimitExceeded as exc:
        raise HTTPException(409, str(exc)) from None


async def published(request: Request, seqs: Sequence[int]) -> None:
    """Wait until the broker has the commands a committed unit of work put in the outbox."""
    relay: Relay = request.app.state.relay
    try:
        await relay.deliver(seqs)
    except (KafkaError, NotYetPublished) as exc:
        # Recorded, and published by the relay once the log is back: a retry would make the change twice.
        raise HTTPException(503, f"the change is recorded but the usage log is unavailable ({type(exc).__name__}); "
                                 "the ledger publishes it when the log is back: do not repeat it",
                            headers={"Retry-After": "5"}) from None
