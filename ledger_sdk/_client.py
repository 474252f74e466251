"""``LedgerClient`` and ``AsyncLedgerClient``: the same calls, blocking or async, over one request layer.

Each call is built by ``_Calls`` (method, path, body) and read by a parser; the two clients only
differ in how they send and wait, so the rules (ids fixed before the first attempt, which answers
are retried, 402 as a value or as ``Blocked``) live in one place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from ledger_sdk._errors import Blocked
from ledger_sdk._sse import SSEDecoder
from ledger_sdk._transport import (
    KafkaUsageTransport,
    RetryPolicy,
    raise_for_status,
    retry_delay_s,
    transport_error,
)
from ledger_sdk._types import CheckResult, GateEvent, HistoryRow, Outcome, Spend, UsageEvent, new_event_id

T = TypeVar("T")
API_PREFIX = "/api/v1"
BATCH_EVENTS_MAX = 500  # the API's bound per request; longer batches are sent in chunks
HISTORY_PAGE_SIZE = 100
TIMEOUT_S = 10.0
GroupBy = Literal["day", "model", "session", "plan_version"]


class _Outcomes(msgspec.Struct, frozen=True):
    outcomes: list[Outcome]


class _HistoryPage(msgspec.Struct, frozen=True):
    rows: list[HistoryRow]
    next_cursor: str | None = None


class _Request(msgspec.Struct, frozen=True):
    method: str
    path: str
    body: bytes | None = None
    params: dict[str, str] = {}


def _usage_event(user: str, model: str, input_tokens: int, output_tokens: int, *, session_id: str,
                 tools: dict[str, int] | None, reservation_id: str | None, event_id: str | None,
                 occurred_at: datetime | None) -> UsageEvent:
    extra: dict[str, Any] = {k: v for k, v in (("event_id", event_id), ("occurred_at", occurred_at)) if v is not None}
    return UsageEvent(user=user, model=model, input_tokens=input_tokens, output_tokens=output_tokens,
                      session_id=session_id, tools=tools or {}, reservation_id=reservation_id, **extra)


def _chunks(events: Sequence[UsageEvent]) -> list[Sequence[UsageEvent]]:
    return [events[n:n + BATCH_EVENTS_MAX] for n in range(0, len(events), BATCH_EVENTS_MAX)]


class _Calls:
    """The requests of each call and how their answers are read."""

    @staticmethod
    def usage(events: Sequence[UsageEvent]) -> _Request:
        return _Request("POST", "/usage", msgspec.json.encode({"events": events}))

    @staticmethod
    def check(user: str, model: str, session_id: str | None, input_tokens: int | None, output_tokens: int | None,
              reserve: bool, ttl_seconds: int | None) -> _Request:
        body: dict[str, Any] = {"user": user, "model": model, "reserve": reserve}
        # A reserving check carries its reservation id from the first attempt: the ledger confirms a retry
        # of an admitted check instead of holding its estimate twice, so it is as safe to retry as a read.
        reservation_id = new_event_id() if reserve else None
        for name, value in (("session_id", session_id), ("input_tokens", input_tokens),
                            ("output_tokens", output_tokens), ("ttl_seconds", ttl_seconds),
                            ("reservation_id", reservation_id)):
            if value is not None:
                body[name] = value
        return _Request("POST", "/check", msgspec.json.encode(body))

    @staticmethod
    def spend(user: str) -> _Request:
        return _Request("GET", f"/spend/{quote(user, safe='')}")

    @staticmethod
    def history(user: str, start: datetime | None, end: datetime | None, group_by: GroupBy, page_size: int,
                cursor: str | None) -> _Request:
        params = {"group_by": group_by, "limit": str(page_size)}
        for name, value in (("from", start), ("to", end)):
            if value is not None:
                params[name] = value.isoformat()
        if cursor is not None:
            params["cursor"] = cursor
        return _Request("GET", f"/spend/{quote(user, safe='')}/history", params=params)

    @staticmethod
    def gates_stream(last_event_id: str | None, from_beginning: bool) -> _Request:
        params = {"from": "beginning"} if from_beginning and last_event_id is None else {}
        return _Request("GET", "/gates/stream", params=params)

    @staticmethod
    def read(response: httpx.Response, kind: type[T]) -> T:
        raise_for_status(response)
        return msgspec.json.decode(response.content, type=kind)

    @staticmethod
    def read_check(response: httpx.Response, *, raise_blocked: bool) -> CheckResult:
        if response.status_code == 402:
            result = msgspec.json.decode(response.content, type=CheckResult)
            if raise_blocked:
                raise Blocked(result.reason, result.dimension)
            return result
        return _Calls.read(response, CheckResult)


def _build(http: httpx.Client | httpx.AsyncClient, call: _Request) -> httpx.Request:
    """The request, built once: every attempt sends these same bytes."""
    headers = {"Content-Type": "application/json"} if call.body else None
    return http.build_request(call.method, call.path, content=call.body, params=call.params, headers=headers)


def _base_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith(API_PREFIX) else base + API_PREFIX


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "User-Agent": "ledger-sdk/1"}


class LedgerClient:
    """A blocking client. ``transport`` is httpx's seam: pass ``httpx.MockTransport`` in tests."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = TIMEOUT_S,
                 retry: RetryPolicy | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(base_url=_base_url(base_url), headers=_headers(api_key), timeout=timeout_s,
                                  transport=transport)

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Request) -> httpx.Response:
        request = _build(self._http, call)
        attempt = 0
        while True:
            attempt += 1
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = self._http.send(request)
            except httpx.TransportError as exc:
                outcome = exc
            delay = retry_delay_s(self.retry, attempt, outcome)
            if delay is None:
                if isinstance(outcome, httpx.TransportError):
                    raise transport_error(outcome, attempt) from outcome
                return outcome
            time.sleep(delay)

    def record_usage(self, user: str, model: str, input_tokens: int, output_tokens: int, *,
                     session_id: str = "default", tools: dict[str, int] | None = None,
                     reservation_id: str | None = None, event_id: str | None = None,
                     occurred_at: datetime | None = None) -> Outcome:
        """Record one model call. The event id is fixed here, before the first attempt."""
        event = _usage_event(user, model, input_tokens, output_tokens, session_id=session_id, tools=tools,
                             reservation_id=reservation_id, event_id=event_id, occurred_at=occurred_at)
        return self.record_usage_batch([event])[0]

    def record_usage_batch(self, events: Sequence[UsageEvent]) -> list[Outcome]:
        """Record many calls; one outcome per event, in order."""
        return [o for chunk in _chunks(events) for o in _Calls.read(self._send(_Calls.usage(chunk)), _Outcomes).outcomes]

    def check(self, user: str, model: str, *, session_id: str | None = None, input_tokens: int | None = None,
              output_tokens: int | None = None) -> CheckResult:
        """May ``user`` make this call? A block (402) is a result: ``result.blocked``."""
        call = _Calls.check(user, model, session_id, input_tokens, output_tokens, False, None)
        return _Calls.read_check(self._send(call), raise_blocked=False)

    def reserve(self, user: str, model: str, *, session_id: str | None = None, input_tokens: int | None = None,
                output_tokens: int | None = None, ttl_seconds: int | None = None) -> CheckResult:
        """Check and hold the estimate until usage carrying ``reservation_id`` settles it; 402 raises ``Blocked``."""
        call = _Calls.check(user, model, session_id, input_tokens, output_tokens, True, ttl_seconds)
        return _Calls.read_check(self._send(call), raise_blocked=True)

    def spend(self, user: str) -> Spend:
        return _Calls.read(self._send(_Calls.spend(user)), Spend)

    def history(self, user: str, *, start: datetime | None = None, end: datetime | None = None,
                group_by: GroupBy = "day", page_size: int = HISTORY_PAGE_SIZE) -> Iterator[HistoryRow]:
        """Every row of the user's history, page after page (keyset pagination through ``next_cursor``)."""
        cursor: str | None = None
        while True:
            page = _Calls.read(self._send(_Calls.history(user, start, end, group_by, page_size, cursor)), _HistoryPage)
            yield from page.rows
            if page.next_cursor is None:
                return
            cursor = page.next_cursor


class AsyncLedgerClient:
    """The async client. ``usage_transport`` sends usage straight to Kafka instead of the API."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = TIMEOUT_S,
                 retry: RetryPolicy | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 usage_transport: KafkaUsageTransport | None = None) -> None:
        self.retry = retry or RetryPolicy()
        self.usage_transport = usage_transport
        self._http = httpx.AsyncClient(base_url=_base_url(base_url), headers=_headers(api_key), timeout=timeout_s,
                                       transport=transport)

    async def __aenter__(self) -> AsyncLedgerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Request) -> httpx.Response:
        request = _build(self._http, call)
        attempt = 0
        while True:
            attempt += 1
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = await self._http.send(request)
            except httpx.TransportError as exc:
                outcome = exc
            delay = retry_delay_s(self.retry, attempt, outcome)
            if delay is None:
                if isinstance(outcome, httpx.TransportError):
                    raise transport_error(outcome, attempt) from outcome
                return outcome
            await asyncio.sleep(delay)

    async def record_usage(self, user: str, model: str, input_tokens: int, output_tokens: int, *,
                           session_id: str = "default", tools: dict[str, int] | None = None,
                           reservation_id: str | None = None, event_id: str | None = None,
                           occurred_at: datetime | None = None) -> Outcome:
        """Record one model call. The event id is fixed here, before the first attempt."""
        event = _usage_event(user, model, input_tokens, output_tokens, session_id=session_id, tools=tools,
                             reservation_id=reservation_id, event_id=event_id, occurred_at=occurred_at)
        return (await self.record_usage_batch([event]))[0]

    async def record_usage_batch(self, events: Sequence[UsageEvent]) -> list[Outcome]:
        """Record many calls; one outcome per event, in order."""
        if self.usage_transport is not None:
            return await self.usage_transport.send(events)
        outcomes: list[Outcome] = []
        for chunk in _chunks(events):
            outcomes += _Calls.read(await self._send(_Calls.usage(chunk)), _Outcomes).outcomes
        return outcomes

    async def check(self, user: str, model: str, *, session_id: str | None = None, input_tokens: int | None = None,
                    output_tokens: int | None = None) -> CheckResult:
        """May ``user`` make this call? A block (402) is a result: ``result.blocked``."""
        call = _Calls.check(user, model, session_id, input_tokens, output_tokens, False, None)
        return _Calls.read_check(await self._send(call), raise_blocked=False)

    async def reserve(self, user: str, model: str, *, session_id: str | None = None, input_tokens: int | None = None,
                      output_tokens: int | None = None, ttl_seconds: int | None = None) -> CheckResult:
        """Check and hold the estimate until usage carrying ``reservation_id`` settles it; 402 raises ``Blocked``."""
        call = _Calls.check(user, model, session_id, input_tokens, output_tokens, True, ttl_seconds)
        return _Calls.read_check(await self._send(call), raise_blocked=True)

    async def spend(self, user: str) -> Spend:
        return _Calls.read(await self._send(_Calls.spend(user)), Spend)

    async def history(self, user: str, *, start: datetime | None = None, end: datetime | None = None,
                      group_by: GroupBy = "day", page_size: int = HISTORY_PAGE_SIZE) -> AsyncIterator[HistoryRow]:
        """Every row of the user's history, page after page (keyset pagination through ``next_cursor``)."""
        cursor: str | None = None
        while True:
            call = _Calls.history(user, start, end, group_by, page_size, cursor)
            page = _Calls.read(await self._send(call), _HistoryPage)
            for row in page.rows:
                yield row
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def gates(self, *, last_event_id: str | None = None, from_beginning: bool = False) -> GateStream:
        """Gate events of the key's tenant as they happen (``GET /gates/stream``); see ``GateStream``."""
        return GateStream(self, last_event_id, from_beginning)


class GateStream:
    """An async iterator of gate events that resumes where it left off.

    ``last_event_id`` is the cursor just after the last event yielded: store it, and pass it to
    ``client.gates(last_event_id=...)`` later to continue with the next event, none missed and none
    repeated. A dropped connection is reopened from that cursor (with the client's retry policy).
    Without a cursor the stream starts with new events (``from_beginning=True``: from the first).
    """

    def __init__(self, client: AsyncLedgerClient, last_event_id: str | None, from_beginning: bool) -> None:
        self._client = client
        self.last_event_id = last_event_id
        self._from_beginning = from_beginning
        self._iterator = self._events()

    def __aiter__(self) -> AsyncIterator[GateEvent]:
        return self._iterator

    async def __aenter__(self) -> GateStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; ``last_event_id`` stays, to resume later."""
        await self._iterator.aclose()

    async def _events(self) -> AsyncGenerator[GateEvent, None]:
        failures = 0
        http = self._client._http
        while True:
            call = _Calls.gates_stream(self.last_event_id, self._from_beginning)
            headers = {"Accept": "text/event-stream"}
            if self.last_event_id is not None:
                headers["Last-Event-ID"] = self.last_event_id
            try:
                # Heartbeats come every ~15 s: a read that waits longer means the connection is gone.
                async with http.stream("GET", call.path, params=call.params, headers=headers,
                                       timeout=httpx.Timeout(TIMEOUT_S, read=60.0)) as response:
                    if not response.is_success:
                        await response.aread()
                        failures += 1
                        delay = retry_delay_s(self._client.retry, failures, response)
                        if delay is None:
                            raise_for_status(response)
                        await asyncio.sleep(delay or 0)
                        continue
                    decoder = SSEDecoder()
                    async for line in response.aiter_lines():
                        sse = decoder.feed(line)
                        if sse is not None and sse.event == "gate":
                            event = msgspec.json.decode(sse.data, type=GateEvent)
                            self.last_event_id = sse.id
                            failures = 0
                            yield msgspec.structs.replace(event, cursor=sse.id or "")
                        elif sse is None and decoder.last_event_id is not None:  # an `id:` alone: the heartbeat's
                            self.last_event_id = decoder.last_event_id
                await asyncio.sleep(self._client.retry.delay_s(1))  # the server ended the stream (a restart)
            except httpx.TransportError as exc:
                failures += 1
                delay = retry_delay_s(self._client.retry, failures, exc)
                if delay is None:
                    raise transport_error(exc, failures) from exc
                await asyncio.sleep(delay)
