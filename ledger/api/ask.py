"""Asking the processor: a command into the user's partition, its answer from the replies topic."""

from __future__ import annotations

import asyncio
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

import msgspec
from fastapi import HTTPException, Request

from ledger.events import CheckAnswer, CheckRequested, SpendAnswer, SpendQueried

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
        await state.log.publish([command])
        return await asyncio.wait_for(answer, ANSWER_TIMEOUT_S)
    except TimeoutError:
        raise HTTPException(504, f"the ledger did not answer within {ANSWER_TIMEOUT_S:.0f}s") from None
    finally:
        state.replies.forget(command.request_id)


def public(answer: CheckAnswer | SpendAnswer) -> dict[str, Any]:
    """An answer as the API shows it: without the fields that only route it back here."""
    document: dict[str, Any] = msgspec.to_builtins(answer, builtin_types=(Decimal, datetime))
    for internal in ("request_id", "tenant", "schema_version"):
        document.pop(internal)
    return document
