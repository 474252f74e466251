"""The API's operational endpoints: ``/healthz``, ``/readyz`` and Prometheus ``/metrics``.

They sit outside ``/api/v1`` and the OpenAPI schema, and need no key: probes and
scrapers carry none, and nothing here reveals a tenant's data.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ledger.control.store import ControlStore
from ledger.settings import Settings

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
REQUEST_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OPERATIONAL_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# The label values a client cannot invent: HTTP's methods (RFC 9110, and PATCH), else OTHER.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
OTHER = "other"
ROUTE_LABEL_LENGTH_MAX = 200

router = APIRouter(include_in_schema=False)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("ledger_api_requests", "HTTP requests answered, by route template and status",
                                ["method", "route", "status"], registry=registry)
        self.seconds = Histogram("ledger_api_request_seconds", "Time to answer a request, by route template",
                                 ["method", "route"], registry=registry, buckets=REQUEST_SECONDS_BUCKETS)


def install(app: FastAPI) -> None:
    """Add the endpoints, and a middleware that counts and times every other request."""
    metrics = ApiMetrics(CollectorRegistry())
    app.state.metrics = metrics
    app.include_router(router)
    app.add_middleware(MeasureRequests, metrics=metrics)


class MeasureRequests:
    """Counts and times each request by method, route template and status; every label from a closed set.

    A client chooses the method and the path, so neither is a label as sent: a method outside
    ``KNOWN_METHODS`` counts as ``other``, and a path as the template of the route it matched (a template
    is written in the code), ``other`` when it matched none. Pure ASGI, so a stream's end is seen as is.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPERATIONAL_PATHS:
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), "500"  # an exception here becomes a plain 500 further out

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else OTHER
            route = _route_template(scope)
            self.metrics.requests.labels(method, route, status).inc()
            self.metrics.seconds.labels(method, route).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    """The matched route's template (``/users/{user_id}``), not the path: ids would make a series each.

    It is the route as its router declares it, without the ``/api/v1`` prefix it is included under.
    """
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and len(path) <= ROUTE_LABEL_LENGTH_MAX else OTHER


@router.get("/healthz")
async def healthz() -> PlainTextResponse:
    """The process answers: its event loop runs."""
    return PlainTextResponse("ok\n")


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready when Kafka and the control database both answer within the probe timeout."""
    from streams.topics import broker_problem

    settings: Settings = request.app.state.settings
    kafka, database = await asyncio.gather(broker_problem(settings.bootstrap, PROBE_TIMEOUT_S),
                                           _database_problem(request.app.state.store))
    if kafka is not None:
        log.warning("Kafka probe failed: %s", kafka)
        kafka = "unreachable"
    checks = {"kafka": kafka or "ok", "control_database": database or "ok"}
    ready = kafka is None and database is None
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _database_problem(store: ControlStore) -> str | None:
    def ping() -> None:
        with store.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    try:
        await asyncio.wait_for(run_in_threadpool(ping), PROBE_TIMEOUT_S)
    except Exception as exc:  # any failure is the answer, not a crash of the probe
        # The probe needs no key, so the answer names the failure only; the log has the details.
        log.warning("control database probe failed: %r", exc)
        return f"unreachable ({type(exc).__name__})"
    return None
