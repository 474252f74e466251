"""Calls: the pre-call check (with reservations) and pay-as-you-go top-ups."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, HTTPException, Request

from ledger.account import top_up_problem
from ledger.api.ask import ask
from ledger.api.auth import require
from ledger.api.db import published, unit_of_work
from ledger.api.wire import JSONResponse, body_schema, decode, read_body
from ledger.control.keys import Scope
from ledger.control.outbox import enqueue
from ledger.control.store import ControlSession, Principal, User
from ledger.events import DEFAULT_SESSION, CheckAnswer, CheckRequested, EventId, Name, Tokens, ToppedUp

router = APIRouter(tags=["calls"])


class CheckBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user: Annotated[Name, msgspec.Meta(description="Your id for the end user (usage events' `user`).")]
    model: Name
    session_id: Name = DEFAULT_SESSION
    input_tokens: Tokens | None = None
    output_tokens: Tokens | None = None
    reserve: bool = False
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1, le=86_400)] = 600
    reservation_id: Annotated[EventId | None, msgspec.Meta(
        description="Your id for this check, so a retry is recognised: a reservation it placed is confirmed, "
                    "never held twice. Default: a new id per request.")] = None


class TopUpBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    amount: Annotated[Decimal, msgspec.Meta(description="Dollars to add to the prepaid balance.")]


@router.post("/check", openapi_extra=body_schema(CheckBody), response_class=JSONResponse,
             responses={402: {"description": "Blocked: the body says which limit and why."}},
             summary="May this user make this call? allow / warn (200) or block (402); reserve to hold the estimate")
async def check(request: Request, who: Principal = Depends(require(Scope.ingest, Scope.admin))) -> JSONResponse:
    body = decode(await read_body(request), CheckBody)
    request_id = str(uuid.uuid4())
    command = CheckRequested(
        event_id=body.reservation_id or str(uuid.uuid4()), request_id=request_id, tenant=who.tenant_id,
        user=body.user, model=body.model,
        session_id=body.session_id, input_tokens=body.input_tokens, output_tokens=body.output_tokens,
        reserve=body.reserve, ttl_seconds=body.ttl_seconds, occurred_at=request.app.state.clock())
    answer = await ask(request, command, CheckAnswer)
    document: dict[str, Any] = msgspec.to_builtins(answer, builtin_types=(Decimal,))
    for internal in ("request_id", "tenant", "schema_version"):
        document.pop(internal)
    return JSONResponse(document, status_code=402 if answer.decision == "block" else 200)


@router.post("/users/{user_id}/topups", openapi_extra=body_schema(TopUpBody), response_class=JSONResponse,
             status_code=202, summary="Add to a pay-as-you-go user's prepaid balance")
async def top_up(user_id: str, request: Request, who: Principal = Depends(require(Scope.admin))) -> JSONResponse:
    body = decode(await read_body(request), TopUpBody)
    problem = top_up_problem(body.amount)
    if problem is not None:  # the processor would refuse it too; say so now, with a 422
        raise HTTPException(422, f"amount: {problem}")
    event_id = str(uuid.uuid4())

    def record(session: ControlSession) -> tuple[User, list[int]]:
        # Through the outbox, so a top-up is never published ahead of an assignment recorded before it.
        user = session.user(who.tenant_id, user_id)
        if user is None:
            raise HTTPException(404, f"no user {user_id}")
        return user, enqueue(session, who.tenant_id, [ToppedUp(
            event_id=event_id, tenant=who.tenant_id, user=user.external_id, amount=body.amount,
            occurred_at=request.app.state.clock())])

    user, seqs = await unit_of_work(request, record)
    await published(request, seqs)
    return JSONResponse({"event_id": event_id, "user": user.id, "amount": body.amount}, status_code=202)
