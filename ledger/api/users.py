"""End users: creation, subscriptions (a plan and a period start). Assignments go to the log."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, HTTPException, Request

from ledger.api.auth import require
from ledger.api.db import published, unit_of_work
from ledger.api.wire import JSONResponse, body_schema, decode, read_body
from ledger.control.keys import Scope
from ledger.control.outbox import enqueue
from ledger.control.store import Conflict, ControlSession, LimitExceeded, Principal, User
from ledger.events import Name, PlanAssigned, timestamp_problem

router = APIRouter(prefix="/users", tags=["users"])


PeriodStart = Annotated[datetime, msgspec.Meta(tz=True, description="From 1970 to 2099; now when absent.")]


def _check_period_start(value: datetime | None) -> None:
    # Bounded here and in the PlanAssigned command: a start of 9999-12-31 once made the processor compute year
    # 10000, and every later question about the user timed out.
    problem = timestamp_problem("period_start", value)
    if problem is not None:
        raise ValueError(problem)


class NewUser(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    external_id: Annotated[Name, msgspec.Meta(pattern=r"^[^\x00]*$",
                                              description="Your id for the end user; usage events carry it as `user`.")]
    plan_id: str | None = None
    period_start: PeriodStart | None = None

    def __post_init__(self) -> None:
        _check_period_start(self.period_start)


class Subscription(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    plan_id: str
    period_start: PeriodStart | None = None

    def __post_init__(self) -> None:
        _check_period_start(self.period_start)


def user_document(user: User) -> dict[str, Any]:
    return {"id": user.id, "external_id": user.external_id, "plan_id": user.plan_id,
            "period_start": user.period_start.isoformat() if user.period_start else None,
            "created_at": user.created_at.isoformat()}


def _subscribe(session: ControlSession, who: Principal, user: User, plan_id: str,
               period_start: datetime | None, now: datetime) -> tuple[User, list[int]]:
    """Record the subscription and put its assignment in the outbox (the caller holds the tenant's lock)."""
    if session.plan(who.tenant_id, plan_id) is None:
        raise HTTPException(422, f"plan_id: no plan {plan_id} for this tenant")
    try:
        start = (period_start or now).astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00 is before datetime.min in UTC
        raise HTTPException(422, f"period_start: {period_start} is out of range in UTC") from None
    updated = session.set_subscription(who.tenant_id, user.id, plan_id, start)
    return updated, enqueue(session, who.tenant_id, [PlanAssigned(
        event_id=str(uuid.uuid4()), tenant=who.tenant_id, user=user.external_id, plan_id=plan_id,
        period_start=start, occurred_at=now)])


@router.post("", openapi_extra=body_schema(NewUser), response_class=JSONResponse, status_code=201,
             summary="Register an end user (optionally on a plan); an existing external id answers 409")
async def create_user(request: Request, who: Principal = Depends(require(Scope.admin))) -> JSONResponse:
    body = decode(await read_body(request), NewUser)

    def record(session: ControlSession) -> tuple[User, list[int]]:
        session.lock_tenant(who.tenant_id)  # the users quota counts under it
        try:
            user = session.create_user(who.tenant_id, body.external_id)
        except LimitExceeded:
            raise  # answered 409 naming the quota by unit_of_work
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None
        if body.plan_id is None:
            return user, []
        return _subscribe(session, who, user, body.plan_id, body.period_start, request.app.state.clock())

    user, seqs = await unit_of_work(request, record)
    await published(request, seqs)
    return JSONResponse(user_document(user), status_code=201)


@router.get("/{user_id}", response_class=JSONResponse, summary="One end user")
def get_user(user_id: str, request: Request, who: Principal = Depends(require(Scope.admin, Scope.read))
             ) -> JSONResponse:
    with request.app.state.store.session() as session:
        user = session.user(who.tenant_id, user_id)
    if user is None:
        raise HTTPException(404, f"no user {user_id}")
    return JSONResponse(user_document(user))


@router.post("/{user_id}/subscription", openapi_extra=body_schema(Subscription), response_class=JSONResponse,
             summary="Put the user on a plan from period_start; mid-period this is an upgrade or downgrade")
async def subscribe(user_id: str, request: Request, who: Principal = Depends(require(Scope.admin))) -> JSONResponse:
    body = decode(await read_body(request), Subscription)

    def record(session: ControlSession) -> tuple[User, list[int]]:
        session.lock_tenant(who.tenant_id)  # two subscriptions of one user: the log has them in commit order
        user = session.user(who.tenant_id, user_id)
        if user is None:
            raise HTTPException(404, f"no user {user_id}")
        return _subscribe(session, who, user, body.plan_id, body.period_start, request.app.state.clock())

    user, seqs = await unit_of_work(request, record)
    await published(request, seqs)
    return JSONResponse(user_document(user))
