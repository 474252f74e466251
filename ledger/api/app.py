"""The API factory: ``create_api(settings)`` builds an app; nothing is bound at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as PlainJSONResponse

from ledger.api import calls, console, docs, gates, health, plans, spend, tiers, usage, users, webhooks
from ledger.api.headers import SecurityHeaders, security_headers
from ledger.api.ratelimit import TokenBuckets
from ledger.api.wire import install_openapi
from ledger.catalog import load_catalog
from ledger.control.config import CommandLog
from ledger.control.outbox import Relay
from ledger.control.store import ControlStore
from ledger.heap import freeze_startup_heap
from ledger.settings import Settings

log = logging.getLogger(__name__)


def wall_clock() -> datetime:
    return datetime.now(UTC)


def create_api(settings: Settings, *, store: ControlStore | None = None, command_log: CommandLog | None = None,
               clock: Callable[[], datetime] = wall_clock, freeze_heap: bool = False) -> FastAPI:
    """``clock`` dates what the API writes to the log (queries, checks, top-ups, subscriptions, undated usage).

    ``freeze_heap``: once started, keep what startup built out of later full collections (``ledger.heap``), for
    good. For a process that runs this one app (``ledger api``), not for one that builds and drops apps (tests).
    """
    store = store or ControlStore(settings.control_url)
    store.create_schema()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from streams.publisher import UsagePublisher
        from streams.queries import QueryPublisher
        from streams.replies import ReplyWaiter
        from streams.topics import ensure_topics

        await ensure_topics(settings)
        replies = ReplyWaiter(settings)
        await replies.start()
        app.state.replies = replies
        app.state.queries = QueryPublisher(settings)
        await app.state.queries.start()
        if freeze_heap:
            freeze_startup_heap()
        try:
            if command_log is not None:
                async with _relaying(app, command_log):
                    yield
            else:
                async with UsagePublisher(settings) as publisher, _relaying(app, publisher):
                    yield
        finally:
            await app.state.queries.stop()
            await replies.stop()

    @asynccontextmanager
    async def _relaying(app: FastAPI, log_: CommandLog) -> AsyncIterator[None]:
        # The outbox relay: publishes what changes recorded, and repairs what a crash left (see outbox.py).
        app.state.log = log_
        app.state.relay = Relay(store, log_)
        relaying = asyncio.create_task(app.state.relay.run())
        try:
            yield
        finally:
            relaying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relaying

    # /docs is ours (ledger/api/docs.py): Swagger UI from the package, not from a CDN; no ReDoc.
    app = FastAPI(title="usage-ledger", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Priced LLM usage, gate events and spend history per end user.")
    app.state.store = store
    app.state.settings = settings
    app.state.clock = clock
    app.state.catalog = load_catalog(overrides=settings.price_overrides)
    app.state.gate_streams = gates.StreamSlots(per_tenant=settings.gate_streams_per_tenant)
    app.state.gate_cursors = gates.CursorSeal(gates.cursor_key(settings), settings.namespace)
    app.state.rate_limits = TokenBuckets()
    for router in (calls.router, gates.router, plans.router, spend.router, tiers.router, usage.router, users.router,
                   webhooks.router):
        app.include_router(router, prefix="/api/v1")
    install_openapi(app)
    docs.install(app)
    health.install(app)
    console.install(app)  # the operator's console at /console
    gates.observe(app.state.gate_streams, app.state.metrics.registry)
    app.add_middleware(SecurityHeaders)  # added last: the outermost, so every answer gets the headers

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> PlainJSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return PlainJSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> PlainJSONResponse:
        # No stack traces in responses; the log has it.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # This answer is made outside the middlewares, so it gets the security headers here.
        return PlainJSONResponse({"detail": "internal error"}, status_code=500,
                                 headers=security_headers(request.url.path))

    return app
