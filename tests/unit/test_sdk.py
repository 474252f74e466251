"""The SDK against httpx.MockTransport: retries reuse the event id, 4xx is never retried, 402 is a value
or ``Blocked``, pages are followed, gate streams resume, and the public surface is what ``__all__`` says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from types import ModuleType, SimpleNamespace
from typing import Any

import httpx
import msgspec
import pytest

import ledger_sdk
from ledger.events import UsageRecorded
from ledger_sdk import (
    AsyncLedgerClient,
    AuthenticationError,
    Blocked,
    InvalidRequest,
    KafkaUsageTransport,
    LedgerClient,
    LedgerError,
    RetryPolicy,
    ServerError,
    TransportError,
    UsageEvent,
    usage_tokens,
)
from ledger_sdk._sse import ServerSentEvent, SSEDecoder

NO_WAIT = RetryPolicy(attempts_max=4, backoff_s_initial=0, backoff_s_max=0)
Handler = Callable[[httpx.Request], httpx.Response]

PUBLIC = ["APIError", "AsyncLedgerClient", "AsyncMeteredCall", "AuthenticationError", "Blocked", "CheckResult",
          "GateEvent", "GateStream", "HistoryRow", "InvalidRequest", "KafkaUsageTransport", "LedgerClient",
          "LedgerError", "LimitUse", "NotFound", "Outcome", "PermissionDenied", "RateLimited", "RetryPolicy",
          "ServerError", "SessionSpend", "Spend", "SyncMeteredCall", "TransportError", "UsageEvent",
          "async_metered_call", "metered_call", "usage_tokens"]


def test_the_public_surface_is_exactly_all_and_every_name_is_importable():
    assert ledger_sdk.__all__ == PUBLIC
    for name in PUBLIC:
        assert getattr(ledger_sdk, name).__module__.startswith("ledger_sdk._")
    # Nothing public slips out unlisted; submodules (ledger_sdk.webhooks) are imported by name.
    exported = {n for n in dir(ledger_sdk) if not n.startswith("_") and not isinstance(getattr(ledger_sdk, n), ModuleType)}
    assert exported == set(PUBLIC)


def test_every_exception_has_the_one_root():
    errors = [getattr(ledger_sdk, n) for n in PUBLIC if isinstance(getattr(ledger_sdk, n), type)
              and issubclass(getattr(ledger_sdk, n), BaseException)]
    assert len(errors) == 10 and all(issubclass(e, LedgerError) for e in errors)


class Recorder:
    """A MockTransport handler that answers from a script and keeps every request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) for r in self.requests]


def accepted(request_body: bytes, status: str = "accepted") -> dict[str, Any]:
    return {"outcomes": [{"event_id": e["event_id"], "status": status, "reason": None}
                         for e in json.loads(request_body)["events"]]}


def client(handler: Handler) -> LedgerClient:
    return LedgerClient("http://ledger.test", "pg_test_x", retry=NO_WAIT, transport=httpx.MockTransport(handler))


def test_a_retried_usage_event_is_sent_with_the_same_id_and_bytes_every_time():
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        if len(seen) == 1:
            raise httpx.ReadTimeout("the answer was lost", request=request)
        if len(seen) == 2:
            return httpx.Response(503, json={"detail": "busy"})
        return httpx.Response(202, json=accepted(request.content, "duplicate"))

    with client(handler) as ledger:
        outcome = ledger.record_usage("u42", "gpt-4o", 1000, 200)

    assert len(seen) == 3 and len(set(seen)) == 1
    (sent,) = json.loads(seen[0])["events"]
    assert outcome.event_id == sent["event_id"] and outcome.status == "duplicate" and outcome.ok
    assert datetime.fromisoformat(sent["occurred_at"]).tzinfo is not None


@pytest.mark.parametrize("status, error", [(400, InvalidRequest), (401, AuthenticationError), (409, InvalidRequest),
                                           (413, InvalidRequest), (422, InvalidRequest)])
def test_a_4xx_is_never_retried(status, error):
    recorder = Recorder(httpx.Response(status, json={"detail": "fix the input_tokens"}))
    with client(recorder) as ledger, pytest.raises(error) as raised:
        ledger.record_usage("u42", "gpt-4o", 1000, 200)
    assert len(recorder.requests) == 1 and raised.value.status_code == status
    assert "input_tokens" in str(raised.value)


@pytest.mark.parametrize("answer, error", [(httpx.Response(504), ServerError),
                                           (httpx.ConnectError("refused"), TransportError),
                                           (httpx.ReadTimeout("slow"), TransportError)])
def test_retries_are_bounded(answer, error):
    recorder = Recorder(answer)
    with client(recorder) as ledger, pytest.raises(error):
        ledger.record_usage("u42", "gpt-4o", 1000, 200)
    assert len(recorder.requests) == NO_WAIT.attempts_max
    assert len({r.content for r in recorder.requests}) == 1


def test_a_reserving_check_carries_its_reservation_id_from_the_first_attempt_and_every_retry_resends_it():
    allow = httpx.Response(200, json={"decision": "allow", "reason": "ok", "reservation_id": "r1"})
    lost = Recorder(httpx.ReadTimeout("slow"), httpx.ConnectError("refused"), httpx.Response(503), allow)
    with client(lost) as ledger:
        assert ledger.reserve("u42", "gpt-4o", input_tokens=100).reservation_id == "r1"
    assert len(lost.requests) == 4  # a lost answer is retried too: the ledger recognises the id
    first, *retries = lost.bodies()
    assert {k: v for k, v in first.items() if k != "reservation_id"} == {
        "user": "u42", "model": "gpt-4o", "reserve": True, "input_tokens": 100}
    assert first["reservation_id"] and all(r == first for r in retries)
    plain = Recorder(allow)
    with client(plain) as ledger:
        ledger.check("u42", "gpt-4o")
    assert "reservation_id" not in plain.bodies()[0]  # a plain check reserves nothing and names no reservation


def test_a_402_is_a_blocked_result_of_check_and_raises_blocked_from_reserve():
    block = {"decision": "block", "reason": "period spend would pass 1.00", "dimension": "period_spend"}
    with client(Recorder(httpx.Response(402, json=block))) as ledger:
        result = ledger.check("u42", "gpt-4o")
        assert result.blocked and result.dimension == "period_spend"
        with pytest.raises(Blocked) as raised:
            ledger.reserve("u42", "gpt-4o")
    assert (raised.value.reason, raised.value.dimension) == (block["reason"], "period_spend")


def test_a_long_batch_goes_in_chunks_of_500_with_outcomes_in_order():
    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sizes.append(len(json.loads(request.content)["events"]))
        return httpx.Response(202, json=accepted(request.content))

    events = [UsageEvent(user="u", model="m", input_tokens=n, output_tokens=0) for n in range(1203)]
    with client(handler) as ledger:
        outcomes = ledger.record_usage_batch(events)
    assert sizes == [500, 500, 203]
    assert [o.event_id for o in outcomes] == [e.event_id for e in events]


SPEND = b"""{"user": "u/42", "status": "warning", "plan_id": "p", "plan_name": "pro", "plan_version": 2,
 "period_start": "2026-11-01T00:00:00Z", "period_end": "2026-12-01T00:00:00Z", "period_spend": 1.230000000001,
 "sessions": [{"session_id": "s", "started_at": "2026-11-02T00:00:00Z", "spend": 0.1}],
 "model_tokens": {"gpt-4o": 1234},
 "limits": [{"dimension": "period_spend", "model": null, "scope": "period:2026-11-01", "limit": 1.5,
             "soft_threshold": 1.2, "hard_threshold": 1.5, "used": 1.230000000001, "remaining": 0.269999999999,
             "status": "warning"}], "balance": null, "reserved": 0.05}"""


def test_spend_decodes_money_exactly_and_url_encodes_the_user():
    recorder = Recorder(httpx.Response(200, content=SPEND))
    with client(recorder) as ledger:
        spend = ledger.spend("u/42")
    assert recorder.requests[0].url.raw_path == b"/api/v1/spend/u%2F42"
    assert spend.period_spend == Decimal("1.230000000001")
    assert spend.limits[0].remaining + spend.limits[0].used == Decimal("1.5")
    assert spend.reserved == Decimal("0.05") and spend.balance is None


def test_history_follows_next_cursor_until_it_is_null():
    def row(n: int) -> dict[str, Any]:
        return {"day": f"2026-11-0{n}", "calls": n, "input_tokens": 1, "output_tokens": 2, "tool_calls": 0,
                "spend": "0.10", "first_at": "2026-11-01T00:00:00Z", "last_at": "2026-11-01T00:00:00Z"}
    pages = {None: ([row(1), row(2)], "c1"), "c1": ([row(3)], "c2"), "c2": ([], None)}

    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        rows, cursor = pages[request.url.params.get("cursor")]
        return httpx.Response(200, json={"rows": rows, "next_cursor": cursor})

    start = datetime(2026, 11, 1, tzinfo=UTC)
    with client(handler) as ledger:
        rows = list(ledger.history("u42", start=start, group_by="model", page_size=2))
    assert [r.calls for r in rows] == [1, 2, 3] and sum(r.spend for r in rows) == Decimal("0.30")
    assert [r.url.params.get("cursor") for r in requests] == [None, "c1", "c2"]
    first = requests[0].url.params
    assert (first["from"], first["group_by"], first["limit"]) == (start.isoformat(), "model", "2")


async def test_the_async_client_retries_with_the_same_event_id():
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        if len(bodies) == 1:
            return httpx.Response(429, headers={"Retry-After": "0"})
        return httpx.Response(202, json=accepted(request.content))

    async with AsyncLedgerClient("http://ledger.test/api/v1", "pg_test_x", retry=NO_WAIT,
                                 transport=httpx.MockTransport(handler)) as ledger:
        outcome = await ledger.record_usage("u42", "gpt-4o", 1, 2, event_id="mine")
    assert outcome.event_id == "mine" and len(bodies) == 2 and bodies[0] == bodies[1]


SSE_CASES: list[tuple[list[str], list[ServerSentEvent], str | None]] = [
    ([": heartbeat", ""], [], None),
    (["id: c1", "event: gate", "data: {}", ""], [ServerSentEvent("gate", "{}", "c1")], "c1"),
    (["data: a", "data: b", ""], [ServerSentEvent("message", "a\nb", None)], None),
    (["id: c1", "data: x", "", "data: y", ""], [ServerSentEvent("message", "x", "c1"),
                                                ServerSentEvent("message", "y", "c1")], "c1"),
    (["id: c2", ""], [], "c2"),
]


@pytest.mark.parametrize("lines, events, last_id", SSE_CASES)
def test_the_sse_decoder(lines, events, last_id):
    decoder = SSEDecoder()
    got = [e for e in map(decoder.feed, lines) if e is not None]
    assert got == events and decoder.last_event_id == last_id


def gate(n: int) -> bytes:
    return json.dumps({"gate_id": f"g{n}", "tenant": "t", "user": "u", "kind": "hard_block",
                       "dimension": "period_spend", "model": None, "threshold": "1.00", "used": "1.01",
                       "limit": "1.00", "scope": "period:x", "plan_id": "p", "plan_version": 1,
                       "cause_event_id": "e", "occurred_at": "2026-11-02T10:00:00Z", "correction": False,
                       "schema_version": 1}).encode()


async def test_a_gate_stream_reconnects_from_the_last_cursor():
    requests: list[httpx.Request] = []
    streams = [b": stream open\n\nid: c1\nevent: gate\ndata: %s\n\nid: c2\nevent: gate\ndata: %s\n\n" % (gate(1), gate(2)),
               b": heartbeat\n\nid: c3\nevent: gate\ndata: %s\n\n" % gate(3)]

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, content=streams[len(requests) - 1],
                              headers={"Content-Type": "text/event-stream"})

    async with AsyncLedgerClient("http://ledger.test", "pg_test_x", retry=NO_WAIT,
                                 transport=httpx.MockTransport(handler)) as ledger:
        stream = ledger.gates(from_beginning=True)
        got = []
        async for event in stream:
            got.append((event.gate_id, event.cursor, stream.last_event_id))
            if len(got) == 3:
                break
    assert got == [("g1", "c1", "c1"), ("g2", "c2", "c2"), ("g3", "c3", "c3")]
    assert requests[0].url.params.get("from") == "beginning" and "last-event-id" not in requests[0].headers
    assert requests[1].headers["last-event-id"] == "c2" and "from" not in requests[1].url.params


async def test_a_heartbeat_cursor_moves_the_resume_point_even_without_events():
    requests: list[httpx.Request] = []
    streams = [b"id: c0\n: stream open\n\nid: c1\n: heartbeat\n\n", b"id: c2\nevent: gate\ndata: %s\n\n" % gate(2)]

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, content=streams[len(requests) - 1])

    async with AsyncLedgerClient("http://ledger.test", "pg_test_x", retry=NO_WAIT,
                                 transport=httpx.MockTransport(handler)) as ledger, ledger.gates() as stream:
        event = await anext(aiter(stream))
    assert (event.gate_id, stream.last_event_id) == ("g2", "c2")
    assert requests[1].headers["last-event-id"] == "c1"


def test_the_kafka_transport_writes_what_the_ledger_reads():
    transport = KafkaUsageTransport("127.0.0.1:1", "tenant-1", namespace="ns")
    event = UsageEvent(user="u42", model="gpt-4o", input_tokens=5, output_tokens=6, tools={"web_search": 1},
                       reservation_id="r1")
    key, value = transport.encode(event)
    command = msgspec.json.decode(value, type=UsageRecorded)
    assert key == b"tenant-1/u42" and transport.topic == "ns.usage"
    assert (command.event_id, command.tenant, command.user, command.tools, command.reservation_id,
            command.occurred_at) == (event.event_id, "tenant-1", "u42", {"web_search": 1}, "r1", event.occurred_at)
    with pytest.raises(RuntimeError):
        asyncio.run(transport.send([event]))


@pytest.mark.parametrize("response, tokens", [
    ({"usage": {"prompt_tokens": 12, "completion_tokens": 34}}, (12, 34)),
    (SimpleNamespace(usage=SimpleNamespace(prompt_tokens=1, completion_tokens=0)), (1, 0)),
    ({"choices": []}, ValueError),
    ({"usage": {"prompt_tokens": -1, "completion_tokens": 3}}, ValueError),
    ({"usage": {"prompt_tokens": 1.5, "completion_tokens": 3}}, ValueError),
])
def test_usage_tokens_of_openai_style_responses(response, tokens):
    if tokens is ValueError:
        with pytest.raises(ValueError):
            usage_tokens(response)
    else:
        assert usage_tokens(response) == tokens
