"""Spend queries: a user's live spend (from the processor), their history and the tenant's reports (from DuckDB).

Live spend is asked in the user's partition, so it includes everything published before the request. History
and reports read the projection, which trails the log by the projector's lag.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool

from ledger.api.ask import ask
from ledger.api.auth import require
from ledger.api.wire import JSONResponse
from ledger.control.keys import Scope
from ledger.control.store import Principal
from ledger.events import NAME_LENGTH_MAX, SpendAnswer, SpendQueried

router = APIRouter(tags=["spend"])
reader = require(Scope.read, Scope.admin)
HISTORY_PAGE_MAX = 1_000
_RANGE = "ISO 8601 with a zone; the range is [from, to), open ends cover all time."
From = Annotated[datetime | None, Query(alias="from", description=_RANGE)]
To = Annotated[datetime | None, Query(alias="to", description=_RANGE)]


@router.get("/spend/{user}", response_class=JSONResponse,
            responses={404: {"description": "The user has no plan (nothing is known about them)."}},
            summary="A user's live spend: this period, open sessions, per model, what is left of each limit")
async def live_spend(user: str, request: Request, who: Principal = Depends(reader)) -> JSONResponse:
    document = await live_spend_document(request, who.tenant_id, user)
    if document is None:
        raise HTTPException(404, f"user {user} has no plan")
    return JSONResponse(document)


async def live_spend_document(request: Request, tenant_id: str, user: str) -> dict[str, Any] | None:
    """A user's live spend as the API shows it (None: the user has no plan); the console shows the same."""
    if "\x00" in user or len(user) > NAME_LENGTH_MAX:
        # No usage event can name such a user (and PostgreSQL text cannot hold NUL): nobody to ask about.
        raise HTTPException(404, f"no user {user[:NAME_LENGTH_MAX]!r}: ids are 1 to {NAME_LENGTH_MAX} characters "
                                 "without NUL")
    now = request.app.state.clock()
    answer = await ask(request, SpendQueried(event_id=str(uuid.uuid4()), request_id=str(uuid.uuid4()),
                                             tenant=tenant_id, user=user, occurred_at=now), SpendAnswer)
    if answer.status == "no_plan":
        return None
    document: dict[str, Any] = msgspec.to_builtins(answer, builtin_types=(Decimal, datetime))
    for internal in ("request_id", "tenant", "schema_version"):
        document.pop(internal)
    return document


@router.get("/spend/{user}/history", response_class=JSONResponse,
            summary="A user's spend over a time range, grouped by day, model, session or plan version; paginated")
async def history(user: str, request: Request, who: Principal = Depends(reader),
                  start: From = None, end: To = None,
                  group_by: Literal["day", "model", "session", "plan_version"] = "day",
                  limit: Annotated[int, Query(ge=1, le=HISTORY_PAGE_MAX)] = 100,
                  cursor: Annotated[str | None, Query(max_length=2048, description="next_cursor of the page before")] = None,
                  ) -> JSONResponse:
    from projections.reports import user_history

    page = await query_history(request, lambda con: user_history(
        con, who.tenant_id, user, by=group_by, limit=limit, after=cursor, **history_range(start, end)))
    return JSONResponse({"rows": page.dicts(), "next_cursor": page.next_cursor})


@router.get("/reports/{name}", response_class=JSONResponse,
            summary="A tenant report over [from, to): daily (spend by day x model), top (users), gates (by kind), "
                    "limits (users who reached them, per plan), margins (planned vs realised, per tier)")
async def report(name: Literal["daily", "top", "gates", "limits", "margins"], request: Request,
                 who: Principal = Depends(reader), start: From = None, end: To = None,
                 limit: Annotated[int, Query(ge=1, le=HISTORY_PAGE_MAX, description="top: how many users")] = 10,
                 ) -> JSONResponse:
    found = await run_report(request, who.tenant_id, name, history_range(start, end), limit=limit)
    return JSONResponse({"title": found.title, "rows": found.dicts()})


REPORT_NAMES = ("daily", "top", "gates", "limits", "margins")


async def run_report(request: Request, tenant_id: str, name: str, span: dict[str, datetime], *, limit: int = 10) -> Any:
    """One of the tenant reports over ``span`` (from :func:`history_range`); the console shows the same."""
    from projections import reports

    queries: dict[str, Callable[[Any], Any]] = {
        "daily": lambda con: reports.spend_by_day_and_model(con, tenant_id, **span),
        "top": lambda con: reports.top_users(con, tenant_id, limit=limit, **span),
        "gates": lambda con: reports.gates_by_kind(con, tenant_id, **span),
        "limits": lambda con: reports.limits_reached(con, tenant_id, **span),
    }
    if name == "margins":
        with request.app.state.store.session() as session:
            tiers = [tier for _id, _plan, tier in session.tiers(tenant_id)]
        queries["margins"] = lambda con: reports.tier_margins(con, tenant_id, tiers, **span)
    return await query_history(request, queries[name])


def history_range(start: datetime | None, end: datetime | None) -> dict[str, datetime]:
    for name, value in (("from", start), ("to", end)):
        if value is not None and value.utcoffset() is None:
            raise HTTPException(422, f"{name}: give a time zone (e.g. 2026-11-01T00:00:00Z)")
    from projections.reports import span

    return span(start, end)


async def query_history(request: Request, run: Callable[[Any], Any]) -> Any:
    """Run a report on a read-only connection in a worker thread (DuckDB blocks)."""
    from projections.reports import open_history

    path = request.app.state.settings.history_path

    def run_once() -> Any:
        # No file yet means the projector has written nothing: the answer over an empty history.
        con = open_history(path) if path.exists() else _empty_history()
        try:
            return run(con)
        finally:
            con.close()

    try:
        return await run_in_threadpool(run_once)
    except ValueError as exc:  # a bad cursor or limit
        raise HTTPException(422, str(exc)) from None


def _empty_history() -> Any:
    import duckdb

    from projections.schema import create_schema

    con = duckdb.connect(":memory:")
    create_schema(con)
    con.execute("SET TimeZone = 'UTC'")
    return con
