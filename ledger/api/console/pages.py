"""The console's pages: each one reads through the API's own functions (live spend, reports, the control
store, plan revisions, what-if) and renders a template; nothing here knows a rule of its own."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import msgspec
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, Undefined, select_autoescape
from starlette.concurrency import run_in_threadpool

from ledger.api import gates
from ledger.api.console.sessions import SESSION_COOKIE, SESSION_TTL_S, SIGN_IN_COOKIE, ConsoleSession, new_token, same_token
from ledger.api.plans import revise_plan
from ledger.api.spend import live_spend_document, query_history, run_report
from ledger.api.tiers import tier_document
from ledger.api.webhooks import delivery_document, webhook_document
from ledger.api.wire import BODY_BYTES_MAX, JSONResponse, read_body
from ledger.control.config import TierRecord
from ledger.control.keys import Scope
from ledger.control.store import Principal, User
from ledger.plans import Plan, PlanError, PlanPatch, PlansConfig, PlanSpec, parse_plans_config

router = APIRouter(prefix="/console", include_in_schema=False)
TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                        autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)

USERS_PAGE_SIZE = 20
SEARCH_LENGTH_MAX = 128
# Live spend is asked of at most this many users for the overview, and of at most this many at once.
OVERVIEW_USERS_MAX = 200
LIVE_ASKS_AT_ONCE = 20
RECENT_GATES_SHOWN = 20
RECENT_ENTRIES_SHOWN = 20
DELIVERIES_SHOWN = 20
TOP_USERS_SHOWN = 10
# A report or what-if range given by its days: at most this many days long.
RANGE_DAYS_MAX = 3_660
# What-if defaults to the periods that started in the last this many days.
WHAT_IF_DEFAULT_DAYS = 45
REPORTS = {"daily": "Daily spend by model", "top": "Top users", "limits": "Limits reached",
           "margins": "Margins per tier"}
# Strict: no inline script or style anywhere; charts are drawn by a same-origin script from data attributes.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
                           "object-src 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}


class SignInRequired(Exception):
    """No live session: the page answers with a redirect to the sign-in form."""


# -- formatting ------------------------------------------------------------------------------------------------------


def amount(value: Any) -> str:
    """An exact amount in plain notation, at least two decimals, never rounded (0E-12 reads 0.00)."""
    if value is None or isinstance(value, Undefined):
        return "–"
    text = format(Decimal(value).normalize(), "f")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


def tokens(value: Any) -> str:
    return "–" if value is None or isinstance(value, Undefined) else f"{int(value):,}"


def when(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


def percent(value: Any) -> str:
    return "–" if value is None or isinstance(value, Undefined) else f"{Decimal(value):.2f}%"


def share(value: Any) -> str:
    return "–" if value is None else f"{Decimal(value) * 100:.1f}%"


TEMPLATES.filters.update(amount=amount, tokens=tokens, when=when, percent=percent, share=share)
TEMPLATES.globals.update(amount=amount, tokens=tokens)


def chart(kind: str, **data: Any) -> str:
    """A chart's data for ``console.js`` as a data attribute (money becomes float only to be drawn)."""
    return json.dumps({"kind": kind, **data}, default=lambda v: float(v) if isinstance(v, Decimal) else str(v),
                      separators=(",", ":"))


def stacked_days(rows: list[dict[str, Any]], title: str) -> str:
    """Spend per day and model as stacked daily bars: x = UTC midnights (seconds), one series per model."""
    seen = sorted({r["day"] for r in rows})
    # Every day from the first to the last: a day without usage is a gap in the bars, not a missing tick.
    days = [seen[0] + timedelta(days=i) for i in range((seen[-1] - seen[0]).days + 1)] if seen else []
    models = sorted({r["model"] for r in rows})
    index = {d: i for i, d in enumerate(days)}
    values = {m: [0.0] * len(days) for m in models}
    for r in rows:
        values[r["model"]][index[r["day"]]] += float(r["spend"])
    xs = [int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()) for d in days]
    return chart("days", title=title, x=xs, series=[{"label": m, "values": values[m]} for m in models],
                 unit="USD")


def categories(labels: list[str], series: list[tuple[str, list[Any]]], title: str, unit: str) -> str:
    return chart("bars", title=title, labels=labels, unit=unit,
                 series=[{"label": name, "values": [0.0 if v is None else float(v) for v in values]}
                         for name, values in series])


# -- sessions --------------------------------------------------------------------------------------------------------


def is_console_page(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/console") and not path.startswith("/console/static")


def _cookie_options(request: Request) -> dict[str, Any]:
    return {"httponly": True, "samesite": "strict", "secure": request.url.scheme == "https", "path": "/console"}


def render(request: Request, template: str, status_code: int = 200, headers: Mapping[str, str] | None = None,
           **context: Any) -> HTMLResponse:
    page = TEMPLATES.get_template(template).render(request=request, **context)
    return HTMLResponse(page, status_code=status_code, headers={**PAGE_HEADERS, **(headers or {})})


def error_page(request: Request, status_code: int, message: str, headers: Mapping[str, str] | None = None
               ) -> HTMLResponse:
    who, session = getattr(request.state, "console", (None, None))
    return render(request, "error.html", status_code, headers, who=who, session=session, code=status_code,
                  message=message)


def to_sign_in(request: Request) -> RedirectResponse:
    target = "/console/sign-in"
    if request.method == "GET" and request.url.path not in ("/console", "/console/"):
        target += "?" + urlencode({"next": request.url.path})
    return RedirectResponse(target, status_code=303)


async def signed_in(request: Request) -> tuple[Principal, ConsoleSession]:
    """The session's key, read again (a revoked key ends its sessions), and one request of its rate."""
    session_id = request.cookies.get(SESSION_COOKIE)
    session = request.app.state.console_sessions.get(session_id)
    if session is None:
        raise SignInRequired()
    store = request.app.state.store
    with store.session() as db:
        who = db.principal(session.key_id)
    if who is None:
        request.app.state.console_sessions.close(session_id)
        raise SignInRequired()
    settings = request.app.state.settings
    rate, burst = who.requests_per_s or settings.rate_per_key_per_s, who.burst or settings.rate_burst
    wait_s = request.app.state.rate_limits.take(who.key_id, rate, burst)
    if wait_s is not None:
        raise HTTPException(429, f"rate_per_key: this key may make {rate} requests per second (bursts of {burst}); "
                                 f"retry in {wait_s} s", headers={"Retry-After": str(wait_s)})
    request.state.console = (who, session)
    return who, session


Signed = tuple[Principal, ConsoleSession]


async def form(request: Request, session: ConsoleSession | None = None) -> dict[str, str]:
    """A urlencoded form body (bounded), its CSRF token checked against the session's."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise HTTPException(415, "send the form as application/x-www-form-urlencoded")
    try:
        parsed = parse_qs((await read_body(request)).decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                          max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "the form is not valid UTF-8 urlencoded text") from None
    fields = {name: values[-1] for name, values in parsed.items()}
    if session is not None and not same_token(fields.get("csrf"), session.csrf):
        raise HTTPException(403, "the form's CSRF token is missing or stale: reload the page and try again")
    return fields


def _require_admin(who: Principal, what: str) -> None:
    if Scope.admin not in who.scopes:
        raise HTTPException(403, f"{what} needs a key with the admin scope; this session's key has "
                                 f"{', '.join(sorted(s.value for s in who.scopes))}")


# -- sign in and out -------------------------------------------------------------------------------------------------


def _safe_next(value: str | None) -> str:
    # Only a console path: never an absolute URL or a scheme-relative one (an open redirect).
    if value and value.startswith("/console/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/console/overview"


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
async def home(request: Request) -> Response:
    if request.app.state.console_sessions.get(request.cookies.get(SESSION_COOKIE)) is None:
        return RedirectResponse("/console/sign-in", status_code=303)
    return RedirectResponse("/console/overview", status_code=303)


@router.get("/sign-in", response_class=HTMLResponse)
async def sign_in_form(request: Request, next: str | None = None) -> Response:
    token = new_token()
    response = render(request, "sign_in.html", csrf=token, next=_safe_next(next), message=None)
    response.set_cookie(SIGN_IN_COOKIE, token, max_age=3600, **_cookie_options(request))
    return response


@router.post("/sign-in", response_class=HTMLResponse)
async def sign_in(request: Request) -> Response:
    fields = await form(request)
    expected = request.cookies.get(SIGN_IN_COOKIE)
    if expected is None or not same_token(fields.get("csrf"), expected):
        raise HTTPException(403, "the sign-in form is stale (or cookies are off): reload it and try again")
    key = fields.get("key", "").strip()
    with request.app.state.store.session() as db:
        who = db.authenticate(key) if key else None
    next_page = _safe_next(fields.get("next"))
    if who is None or not who.scopes & {Scope.read, Scope.admin}:
        # The key is never echoed back, logged or kept.
        message = ("unknown or revoked API key" if who is None
                   else "this key has neither the read nor the admin scope")
        token = new_token()
        response = render(request, "sign_in.html", 401, csrf=token, next=next_page, message=message)
        response.set_cookie(SIGN_IN_COOKIE, token, max_age=3600, **_cookie_options(request))
        return response
    session_id, _session = request.app.state.console_sessions.open(who.key_id)
    response = RedirectResponse(next_page, status_code=303)
    response.set_cookie(SESSION_COOKIE, session_id, max_age=SESSION_TTL_S, **_cookie_options(request))
    response.delete_cookie(SIGN_IN_COOKIE, path="/console")
    return response


@router.post("/sign-out")
async def sign_out(request: Request, signed: Signed = Depends(signed_in)) -> Response:
    await form(request, signed[1])
    request.app.state.console_sessions.close(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/console/sign-in", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/console")
    return response


# -- live spend, many at once ----------------------------------------------------------------------------------------


async def live_spends(request: Request, tenant_id: str, users: list[User]) -> dict[str, dict[str, Any] | None]:
    """Live spend of each user (by external id); None for a user with no plan or whose answer did not come."""
    gate = asyncio.Semaphore(LIVE_ASKS_AT_ONCE)

    async def one(user: User) -> tuple[str, dict[str, Any] | None]:
        if user.plan_id is None:
            return user.external_id, None
        async with gate:
            try:
                return user.external_id, await live_spend_document(request, tenant_id, user.external_id)
            except HTTPException:  # 503/504: the page shows what it has
                return user.external_id, None

    return dict(await asyncio.gather(*(one(u) for u in users)))


def _pressing(document: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The limits of a user at or past their soft threshold, worst first."""
    if document is None:
        return []
    order = {"blocked": 0, "warning": 1}
    found = [use for use in document["limits"] if use["status"] in order]
    return sorted(found, key=lambda use: order[use["status"]])


# -- overview --------------------------------------------------------------------------------------------------------


@router.get("/overview", response_class=HTMLResponse)
async def overview(request: Request, signed: Signed = Depends(signed_in)) -> Response:
    from projections.reports import recent_gates

    who, session = signed
    today = request.app.state.clock().astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    daily = await run_report(request, who.tenant_id, "daily", {"start": today, "end": today + timedelta(days=1)})
    spend_today = sum((r["spend"] for r in daily.dicts()), Decimal(0))
    with request.app.state.store.session() as db:
        users, total_users = db.users(who.tenant_id, limit=OVERVIEW_USERS_MAX)
    spends = await live_spends(request, who.tenant_id, users)
    period_spend = sum((d["period_spend"] for d in spends.values() if d and d["period_spend"] is not None), Decimal(0))
    ids = {u.external_id: u.id for u in users}
    pressing = [(name, ids[name], doc, _pressing(doc)) for name, doc in sorted(spends.items()) if _pressing(doc)]
    newest = await query_history(request, lambda con: recent_gates(con, who.tenant_id, limit=RECENT_GATES_SHOWN))
    return render(request, "overview.html", who=who, session=session, spend_today=spend_today, today=today,
                  period_spend=period_spend, users_asked=len(users), total_users=total_users, pressing=pressing,
                  gates=newest.dicts(), user_ids=ids,
                  user_links=json.dumps({name: f"/console/users/{uid}" for name, uid in ids.items()}))


# -- users -----------------------------------------------------------------------------------------------------------


def _page_number(value: str | None) -> int:
    try:
        number = int(value or "1")
    except ValueError:
        raise HTTPException(422, f"page: {value[:20]!r} is not a page number") from None
    if not 1 <= number <= 1_000_000:
        raise HTTPException(422, "page: between 1 and 1000000")
    return number


@router.get("/users", response_class=HTMLResponse)
async def users_page(request: Request, q: str = "", page: str | None = None, signed: Signed = Depends(signed_in)
                     ) -> Response:
    who, session = signed
    if len(q) > SEARCH_LENGTH_MAX or "\x00" in q:
        raise HTTPException(422, f"q: a search is at most {SEARCH_LENGTH_MAX} characters, without NUL")
    number = _page_number(page)
    with request.app.state.store.session() as db:
        found, total = db.users(who.tenant_id, search=q, offset=(number - 1) * USERS_PAGE_SIZE, limit=USERS_PAGE_SIZE)
        plans = {p.plan_id: p.name for p in db.plans(who.tenant_id)}
    spends = await live_spends(request, who.tenant_id, found)
    pages = max(1, math.ceil(total / USERS_PAGE_SIZE))

    def link(n: int) -> str:
        return "/console/users?" + urlencode({**({"q": q} if q else {}), "page": n})

    return render(request, "users.html", who=who, session=session, users=found, spends=spends, plans=plans, q=q,
                  page=number, pages=pages, total=total, previous=link(number - 1) if number > 1 else None,
                  next=link(number + 1) if number < pages else None, pressing=_pressing)


def _user_of(request: Request, who: Principal, user_id: str) -> User:
    with request.app.state.store.session() as db:
        user = db.user(who.tenant_id, user_id)
    if user is None:  # another tenant's user is nobody here
        raise HTTPException(404, f"no user {user_id[:64]}")
    return user


@router.get("/users/{user_id}", response_class=HTMLResponse)
async def user_page(user_id: str, request: Request, signed: Signed = Depends(signed_in)) -> Response:
    from projections.reports import recent_entries, recent_gates, span, spend_by_day_and_model

    who, session = signed
    user = _user_of(request, who, user_id)
    document = (await live_spends(request, who.tenant_id, [user]))[user.external_id]
    if document is not None and document["period_start"] is not None:
        start, end = document["period_start"], document["period_end"]
    else:
        start, end = span(None, None)["start"], span(None, None)["end"]

    def queries(con: Any) -> tuple[Any, Any, Any]:
        return (spend_by_day_and_model(con, who.tenant_id, start=start, end=end, user=user.external_id),
                recent_entries(con, who.tenant_id, user.external_id, limit=RECENT_ENTRIES_SHOWN),
                recent_gates(con, who.tenant_id, limit=RECENT_GATES_SHOWN, user=user.external_id))

    by_day, entries, user_gates = await query_history(request, queries)
    days = by_day.dicts()
    title = f"Spend of {user.external_id} by day and model, this period ({who.tenant_name})"
    return render(request, "user.html", who=who, session=session, user=user, live=document, days=days,
                  chart=stacked_days(days, title), entries=entries.dicts(), gates=user_gates.dicts())


@router.get("/users/{user_id}/spend.json")
async def user_spend_json(user_id: str, request: Request, signed: Signed = Depends(signed_in)) -> Response:
    """The user's live spend, exactly as ``GET /api/v1/spend/{user}`` shows it (for the page's live refresh)."""
    who, _session = signed
    user = _user_of(request, who, user_id)
    document = await live_spend_document(request, who.tenant_id, user.external_id)
    if document is None:
        raise HTTPException(404, f"user {user.external_id} has no plan")
    return JSONResponse(document, headers={"Cache-Control": "no-store"})


# -- plans and tiers -------------------------------------------------------------------------------------------------


@router.get("/plans", response_class=HTMLResponse)
async def plans_page(request: Request, signed: Signed = Depends(signed_in)) -> Response:
    who, session = signed
    with request.app.state.store.session() as db:
        plans = db.plans(who.tenant_id)
        tiers = [TierRecord(*row) for row in db.tiers(who.tenant_id)]
    margins = await run_report(request, who.tenant_id, "margins", _all_time())
    realised = {row["tier"]: row for row in margins.dicts()}
    documents = [tier_document(t) for t in tiers]
    labels = [d["tier_code"] for d in documents]
    margin_chart = categories(labels, [
        ("planned margin %", [(d["margin"] or {}).get("margin_pct") for d in documents]),
        ("realised margin %", [realised.get(code, {}).get("realised_margin_pct") for code in labels]),
    ], f"Margin per tier, planned and realised ({who.tenant_name})", "%") if documents else None
    return render(request, "plans.html", who=who, session=session, plans=plans, tiers=documents, realised=realised,
                  chart=margin_chart)


def _plan_of(request: Request, who: Principal, plan_id: str) -> tuple[Plan, list[tuple[Plan, datetime]]]:
    with request.app.state.store.session() as db:
        versions = db.plan_versions(who.tenant_id, plan_id)
    if not versions:
        raise HTTPException(404, f"no plan {plan_id[:64]}")
    return versions[-1][0], versions


@router.get("/plans/{plan_id}", response_class=HTMLResponse)
async def plan_page(plan_id: str, request: Request, saved: str | None = None, signed: Signed = Depends(signed_in)
                    ) -> Response:
    who, session = signed
    plan, versions = _plan_of(request, who, plan_id)
    return render(request, "plan.html", who=who, session=session, plan=plan, versions=list(reversed(versions)),
                  saved=saved, problem=None, values=_plan_form_values(plan))


PLAN_FORM_AMOUNTS = ("max_spend_per_period", "max_spend_per_session", "soft_gate_at", "hard_gate_at", "markup",
                     "session_timeout_minutes")
NULLABLE = ("max_spend_per_period", "max_spend_per_session")


def _plan_form_values(plan: Plan) -> dict[str, str]:
    values = {name: "" if getattr(plan, name) is None else format(getattr(plan, name), "f") for name in PLAN_FORM_AMOUNTS}
    values |= {f"tokens:{model}": str(limit.max_tokens_per_period) for model, limit in plan.model_limits.items()}
    return values


def plan_patch(plan: Plan, fields: Mapping[str, str]) -> PlanPatch:
    """The fields the form changed, as the API's PATCH body (422 for anything it would refuse)."""
    changes: dict[str, Any] = {}
    for name in PLAN_FORM_AMOUNTS:
        if name not in fields:
            continue
        text = fields[name].strip()
        if text == "" and name in NULLABLE:
            value: Any = None
        else:
            try:
                value = Decimal(text)
            except ArithmeticError:
                raise HTTPException(422, f"{name}: {text[:40]!r} is not a number") from None
            if not value.is_finite():
                raise HTTPException(422, f"{name}: {text[:40]!r} is not a number")
        if value != getattr(plan, name):
            changes[name] = None if value is None else str(value)
    limits = {model: limit.max_tokens_per_period for model, limit in plan.model_limits.items()}
    for model in list(limits):
        text = fields.get(f"tokens:{model}", str(limits[model])).strip()
        if text == "":
            del limits[model]  # no limit on this model any more
            continue
        if not text.isdigit() or len(text) > 18:
            raise HTTPException(422, f"tokens:{model}: {text[:40]!r} is not a whole number of tokens")
        limits[model] = int(text)
    if limits != {model: limit.max_tokens_per_period for model, limit in plan.model_limits.items()}:
        changes["model_limits"] = {model: {"max_tokens_per_period": n} for model, n in limits.items()}
    if not changes:
        raise HTTPException(422, "nothing changed: edit a field to make a new version")
    try:
        return msgspec.convert(changes, PlanPatch, strict=False)
    except msgspec.ValidationError as exc:
        raise HTTPException(422, str(exc)) from None


@router.post("/plans/{plan_id}", response_class=HTMLResponse)
async def edit_plan(plan_id: str, request: Request, signed: Signed = Depends(signed_in)) -> Response:
    who, session = signed
    fields = await form(request, session)
    _require_admin(who, "editing a plan")
    plan, versions = _plan_of(request, who, plan_id)
    try:
        revised = await revise_plan(request, who.tenant_id, plan_id, plan_patch(plan, fields))
    except HTTPException as exc:
        if exc.status_code not in (409, 422):
            raise
        values = {**_plan_form_values(plan), **{k: v for k, v in fields.items() if k != "csrf"}}
        return render(request, "plan.html", exc.status_code, who=who, session=session, plan=plan,
                      versions=list(reversed(versions)), saved=None, problem=str(exc.detail), values=values)
    return RedirectResponse(f"/console/plans/{quote(plan_id)}?saved={revised.version}", status_code=303)


# -- reports ---------------------------------------------------------------------------------------------------------


def _all_time() -> dict[str, datetime]:
    from projections.reports import span

    return span(None, None)


def _day(name: str, value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, f"{name}: {value[:20]!r} is not a date (2026-11-01)") from None


def day_range(start: str | None, end: str | None) -> tuple[dict[str, datetime], date | None, date | None]:
    """[from, to] as whole UTC days (``to`` included); open ends cover all time."""
    from projections.reports import span

    first, last = _day("from", start), _day("to", end)
    if first and last and last < first:
        raise HTTPException(422, "to: the last day is before the first")
    if first and last and (last - first).days > RANGE_DAYS_MAX:
        raise HTTPException(422, f"a range is at most {RANGE_DAYS_MAX} days")
    begin = datetime(first.year, first.month, first.day, tzinfo=UTC) if first else None
    finish = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1) if last else None
    return span(begin, finish), first, last


def _report_chart(name: str, rows: list[dict[str, Any]], tenant_name: str) -> str | None:
    if not rows:
        return None
    if name == "daily":
        return stacked_days(rows, f"Spend per day and model ({tenant_name})")
    if name == "top":
        return categories([r["user"] for r in rows], [("spend", [r["spend"] for r in rows])],
                          f"Top users by spend ({tenant_name})", "USD")
    if name == "limits":
        return categories([r["plan"] for r in rows], [("reached soft", [r["soft_users"] for r in rows]),
                                                      ("reached hard", [r["hard_users"] for r in rows])],
                          f"Users who reached a limit, per plan ({tenant_name})", "users")
    return categories([r["tier"] for r in rows], [("planned margin %", [r["planned_margin_pct"] for r in rows]),
                                                  ("realised margin %", [r["realised_margin_pct"] for r in rows])],
                      f"Margin per tier ({tenant_name})", "%")


def _report_name(name: str) -> str:
    if name not in REPORTS:
        raise HTTPException(404, f"no report {name[:40]!r}: one of {', '.join(REPORTS)}")
    return name


@router.get("/reports", response_class=HTMLResponse)
async def reports_page(request: Request, name: str = "daily", start: str | None = None, end: str | None = None,
                       signed: Signed = Depends(signed_in)) -> Response:
    who, session = signed
    name = _report_name(name)
    span, first, last = day_range(start, end)
    found = await run_report(request, who.tenant_id, name, span, limit=TOP_USERS_SHOWN)
    rows = found.dicts()
    query = urlencode({k: v for k, v in (("start", start), ("end", end)) if v})
    return render(request, "reports.html", who=who, session=session, name=name, reports=REPORTS, report=found,
                  rows=rows, chart=_report_chart(name, rows, who.tenant_name), first=first, last=last,
                  csv_url=f"/console/reports/{name}.csv" + (f"?{query}" if query else ""), query=query)


@router.get("/reports/{name}.csv")
async def report_csv(name: str, request: Request, start: str | None = None, end: str | None = None,
                     signed: Signed = Depends(signed_in)) -> Response:
    from projections.export import to_csv

    who, _session = signed
    name = _report_name(name)
    span, _first, _last = day_range(start, end)
    found = await run_report(request, who.tenant_id, name, span, limit=TOP_USERS_SHOWN)
    return Response(to_csv(found), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}.csv"', "Cache-Control": "no-store",
                             "X-Content-Type-Options": "nosniff"})


# -- what-if ---------------------------------------------------------------------------------------------------------


def plans_as_config(plans: list[Plan]) -> str:
    """The tenant's current plans in the plans guide's JSON format (the what-if form starts from them)."""
    specs = []
    for plan in plans:
        fields = msgspec.to_builtins(plan, builtin_types=(Decimal,))
        specs.append({name: fields[name] for name in PlanSpec.__struct_fields__ if name in fields})
    config = PlansConfig(plans=[msgspec.convert(s, PlanSpec, strict=False) for s in specs])
    text = msgspec.json.format(msgspec.json.Encoder(decimal_format="number").encode(config), indent=2)
    return text.decode()


def _what_if_context(request: Request, signed: Signed, plans_text: str, start: str, end: str, **extra: Any
                     ) -> dict[str, Any]:
    who, session = signed
    return {"who": who, "session": session, "plans_text": plans_text, "start": start, "end": end,
            "plans_bytes_max": BODY_BYTES_MAX, **extra}


@router.get("/what-if", response_class=HTMLResponse)
async def what_if_form(request: Request, signed: Signed = Depends(signed_in)) -> Response:
    who, _session = signed
    with request.app.state.store.session() as db:
        text = plans_as_config(db.plans(who.tenant_id))
    today = request.app.state.clock().astimezone(UTC).date()
    return render(request, "what_if.html", **_what_if_context(
        request, signed, text, (today - timedelta(days=WHAT_IF_DEFAULT_DAYS)).isoformat(), today.isoformat(),
        result=None, problem=None))


@router.post("/what-if", response_class=HTMLResponse)
async def what_if(request: Request, signed: Signed = Depends(signed_in)) -> Response:
    from projections.simulate import WhatIf, simulate

    who, session = signed
    fields = await form(request, session)
    text, start, end = fields.get("plans", ""), fields.get("start", ""), fields.get("end", "")
    try:
        config = parse_plans_config(text.encode())
        span, _first, _last = day_range(start or None, end or None)
    except (PlanError, HTTPException) as exc:
        problem = exc.detail if isinstance(exc, HTTPException) else str(exc)
        return render(request, "what_if.html", 422, **_what_if_context(request, signed, text, start, end, result=None,
                                                                       problem=problem))
    with request.app.state.store.session() as db:
        tiers = [tier for _id, _plan, tier in db.tiers(who.tenant_id)]
    result: WhatIf = await query_history(request, lambda con: simulate(con, who.tenant_id, config, tiers=tiers, **span))
    rows = [dict(zip(WhatIf.COLUMNS, row, strict=True)) for row in result.rows()]
    names = sorted({r["plan"] for r in rows})
    spend = {(r["plan"], r["side"]): r["spend"] for r in rows}
    what_chart = categories(names, [("actual spend", [spend.get((n, "actual")) for n in names]),
                                    ("proposed spend", [spend.get((n, "proposed")) for n in names])],
                            f"Spend per plan, actual and proposed ({who.tenant_name})", "USD") if names else None
    return render(request, "what_if.html", **_what_if_context(
        request, signed, text, start, end, result=result, rows=rows, chart=what_chart, problem=None))


# -- webhooks --------------------------------------------------------------------------------------------------------


@router.get("/webhooks", response_class=HTMLResponse)
async def webhooks_page(request: Request, signed: Signed = Depends(signed_in)) -> Response:
    who, session = signed
    _require_admin(who, "the webhooks page (endpoints and their delivery log)")

    def read() -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        with request.app.state.store.session() as db:
            return [(webhook_document(w), [delivery_document(d) for d in db.deliveries(who.tenant_id, w.id,
                                                                                       DELIVERIES_SHOWN)])
                    for w in db.webhooks(who.tenant_id)]

    return render(request, "webhooks.html", who=who, session=session, webhooks=await run_in_threadpool(read))


# -- the gate stream, through the session ----------------------------------------------------------------------------


@router.get("/gates/stream")
async def gate_stream(request: Request, signed: Signed = Depends(signed_in)) -> StreamingResponse:
    """The API's SSE gate stream of the session's tenant (EventSource cannot send a bearer key)."""
    who, session = signed
    return await gates.open_gate_stream(request, who, gates.key_id_check(request.app.state.store, session.key_id,
                                                                         who.tenant_id),
                                        request.headers.get("Last-Event-ID"))
