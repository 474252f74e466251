"""Asking the processor: a check into the user's partition of the log, a spend query beside it; the answer
comes from the replies topic."""

from __future__ import annotations

import asyncio
from typing import TypeVar

import msgspec
from fastapi import HTTPException, Request

from ledger.events import CheckRequested, SpendQueried

ANSWER_TIMEOUT_S = 10.0
A = TypeVar("A", bound=msgspec.Struct)


async def ask(request: Request, command: CheckRequested | SpendQueried, kind: type[A]) -> A:
    """Publish ``command`` and wait for its answer: 503 when too many wait already, 504 when none comes."""
    state = request.app.state
    try:
        answer = state.replies.expect(command.request_id, kind)
    except OverflowError as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from None
    try:
        if isinstance(command, SpendQueried):  # a read: beside the log, not in it (streams/queries.py)
            await state.queries.publish(command)
        else:
            await state.log.publish([command])
        return await asyncio.wait_for(answer, ANSWER_TIMEOUT_S)
    except TimeoutError:
        raise HTTPException(504, f"the ledger did not answer within {ANSWER_TIMEOUT_S:.0f}s") from None
    finally:
        state.replies.forget(command.request_id)
