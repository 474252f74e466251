"""The SDK against the real stack (`ledger api` process, a worker, the broker): a retry after a lost
answer counts the call once; a gate stream stopped and resumed with its cursor misses and repeats
nothing; the metered-call wrapper never calls the model when the check answers 402."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import msgspec
import pytest

from examples.chat_backend.fake_model import FakeModel
from ledger.control.store import ControlStore
from ledger.settings import Settings
from ledger_sdk import (
    AsyncLedgerClient,
    Blocked,
    GateEvent,
    KafkaUsageTransport,
    LedgerClient,
    RetryPolicy,
    UsageEvent,
    metered_call,
)
from tests.conftest import wait_processed
from tests.integration import test_admission
from tests.integration.test_admission import METERED
from tests.kafka_io import entries, gates, rejections

pytestmark = pytest.mark.integration
ledger_api = test_admission.api_server  # a fixture: `ledger api` in its own process, and its key

FAST_RETRY = RetryPolicy(attempts_max=4, backoff_s_initial=0.05, backoff_s_max=0.2)
BUDGET_TOKENS = 100_000  # $1.00 of METERED's $0.01 per 1K: one such call crosses the soft and the hard threshold


def tenant_id(settings: Settings, name: str = "acme") -> str:
    with ControlStore(settings.control_url).session() as session:
        found = session.tenant_id(name)
    assert found is not None
    return found


def subscribe(base: str, key: str, users: list[str]) -> None:
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        plan_id = http.post("/config/plans", json=METERED).json()["plans"][0]["id"]
        start = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        for user in users:
            answer = http.post("/users", json={"external_id": user, "plan_id": plan_id, "period_start": start})
            assert answer.status_code == 201, answer.text
    test_admission.wait_until_checks_are_answered(base, key)


class LoseTheFirstAnswer(httpx.HTTPTransport):
    """A real HTTP transport that lets the first usage request reach the server, then drops its answer."""

    def __init__(self, path: str = "/usage", accepted: int = 202) -> None:
        super().__init__()
        self.path, self.accepted = path, accepted
        self.usage_bodies: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith(self.path):
            self.usage_bodies.append(request.content)
            if len(self.usage_bodies) == 1:
                response.read()
                assert response.status_code == self.accepted, "the server must have accepted the request"
                raise httpx.ReadTimeout("the answer was lost after the server accepted the event", request=request)
        return response


def test_a_retry_after_a_lost_answer_counts_the_call_once(settings, worker, ledger_api):
    base, key = ledger_api
    subscribe(base, key, ["careful", "naive", "bulk"])
    lossy = LoseTheFirstAnswer()

    with LedgerClient(base, key, retry=FAST_RETRY, transport=lossy) as ledger:
        outcome = ledger.record_usage("careful", "m", 1000, 0)
    # A client that mints a new id per attempt (what the SDK never does) bills the same call twice.
    with LedgerClient(base, key) as naive:
        naive_outcomes = [naive.record_usage("naive", "m", 1000, 0) for _attempt in range(2)]
    # The API's record of ids is not the only guard: the same event straight onto the log is dropped by the processor.
    (first,) = msgspec.json.decode(lossy.usage_bodies[0], type=dict[str, list[UsageEvent]])["events"]

    async def over_kafka() -> list[str]:
        async with KafkaUsageTransport(settings.bootstrap, tenant_id(settings), namespace=settings.namespace) as kafka:
            await kafka.send([first])
            async with AsyncLedgerClient(base, key, usage_transport=kafka) as producer:  # a high-volume producer
                bulk = [UsageEvent(user="bulk", model="m", input_tokens=1000, output_tokens=0) for _ in range(3)]
                return [o.status for o in await producer.record_usage_batch(bulk)]
    assert asyncio.run(over_kafka()) == ["accepted"] * 3
    wait_processed(settings, worker)

    assert len(lossy.usage_bodies) == 2 and lossy.usage_bodies[0] == lossy.usage_bodies[1]
    assert outcome.status == "duplicate"  # the first attempt was accepted; the retry is recognised
    assert [o.status for o in naive_outcomes] == ["accepted", "accepted"]
    by_user: dict[str, list[Decimal]] = {}
    for entry in entries(settings):
        by_user.setdefault(entry.user, []).append(entry.cost)
    print(f"\nentries after a lost answer + SDK retry + a re-publish on Kafka: {len(by_user['careful'])}; "
          f"after two naive attempts: {len(by_user['naive'])}")
    assert by_user["careful"] == [Decimal("0.01")]
    assert by_user["naive"] == [Decimal("0.01"), Decimal("0.01")]
    assert by_user["bulk"] == [Decimal("0.01")] * 3
    # Dropped as a duplicate (same id, same payload), not dead-lettered as a conflict.
    assert [r.code for r in rejections(settings)] == []


def test_a_gate_stream_stopped_and_resumed_with_its_cursor_misses_and_repeats_nothing(settings, worker, ledger_api):
    base, key = ledger_api
    ours = [f"u{n}" for n in range(6)]
    subscribe(base, key, ours)
    with ControlStore(settings.control_url).session() as session:
        _, other_key = session.create_tenant("globex")
    subscribe(base, other_key, ["g0"])

    def cross_budget(users: list[str], api_key: str = key) -> None:
        with LedgerClient(base, api_key) as ledger:
            assert all(o.status == "accepted" for o in ledger.record_usage_batch(
                [UsageEvent(user=u, model="m", input_tokens=BUDGET_TOKENS, output_tokens=0) for u in users]))

    async def read(stream: AsyncIterator[GateEvent], count: int) -> list[GateEvent]:
        got: list[GateEvent] = []
        async for event in stream:
            got.append(event)
            if len(got) == count:
                break
        return got

    async def scenario() -> tuple[list[GateEvent], list[GateEvent], str | None]:
        async with AsyncLedgerClient(base, key) as ledger:
            cross_budget(ours[:3])
            cross_budget(["g0"], other_key)
            await asyncio.to_thread(wait_processed, settings, worker)
            async with ledger.gates(from_beginning=True) as first_stream:
                before = await asyncio.wait_for(read(first_stream, 3), 60)
            cursor = first_stream.last_event_id  # the consumer stops here ...
            cross_budget(ours[3:])  # ... while more gates happen
            await asyncio.to_thread(wait_processed, settings, worker)
            expected = sum(1 for g in await asyncio.to_thread(gates, settings) if g.tenant == tenant_id(settings))
            # Resume, then stop again every two events: mid-poll, with more events already sent by the server.
            after: list[GateEvent] = []
            resume_from = cursor
            while len(before) + len(after) < expected:
                async with ledger.gates(last_event_id=resume_from) as resumed:
                    after += await asyncio.wait_for(read(resumed, min(2, expected - len(before) - len(after))), 60)
                resume_from = resumed.last_event_id
        return before, after, cursor

    before, after, cursor = asyncio.run(scenario())

    truth = sorted(g.gate_id for g in gates(settings) if g.tenant == tenant_id(settings))
    received = [g.gate_id for g in before + after]
    print(f"\ngate stream: {len(before)} events, stopped, resumed {(len(after) + 1) // 2} times for {len(after)} more; "
          f"{len(truth)} gate events of the tenant in the topic, {len(received) - len(set(received))} repeated")
    assert cursor == before[-1].cursor
    assert len(truth) == 2 * len(ours)  # soft and hard for each of our users; globex's never reach us
    assert sorted(received) == truth and len(set(received)) == len(received)
    assert {g.user for g in after} >= set(ours[3:])


def test_a_stream_without_a_cursor_starts_with_new_events(settings, worker, ledger_api):
    base, key = ledger_api
    subscribe(base, key, ["old", "new"])
    with LedgerClient(base, key) as ledger:
        ledger.record_usage("old", "m", BUDGET_TOKENS, 0)
    wait_processed(settings, worker)

    async def first_two() -> list[str]:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http, \
                http.stream("GET", "/gates/stream") as response:
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("id: ")  # positions are fixed before the first byte
            assert await anext(lines) == ": stream open"
            await asyncio.to_thread(lambda: LedgerClient(base, key).record_usage("new", "m", BUDGET_TOKENS, 0))
            users: list[str] = []
            async for line in lines:
                if line.startswith("data: "):
                    users.append(msgspec.json.decode(line[6:], type=GateEvent).user)
                    if len(users) == 2:
                        return users
        return users

    assert asyncio.run(asyncio.wait_for(first_two(), 60)) == ["new", "new"]


def chat(model: FakeModel, name: str) -> dict[str, object]:
    response = httpx.post(f"{model.url}/chat/completions", json={"model": name, "messages": [
        {"role": "user", "content": "hello"}]})
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def test_the_wrapper_records_what_the_model_used_and_never_calls_it_once_blocked(settings, worker, ledger_api):
    base, key = ledger_api
    subscribe(base, key, ["w", "s"])
    with FakeModel({"prompt_tokens": 5_000, "completion_tokens": 5_000}) as model, LedgerClient(base, key) as ledger:
        # Reserve $0.90, use $0.10: once the usage settles the reservation, $0.85 more fits in the $1.00 budget.
        with metered_call(ledger, "s", "m", input_tokens=90_000) as settled:
            settled.record(chat(model, "m"))
        assert ledger.check("s", "m", input_tokens=85_000).decision == "warn"

        model.usage = {"prompt_tokens": BUDGET_TOKENS // 2, "completion_tokens": BUDGET_TOKENS // 2}
        with metered_call(ledger, "w", "m", input_tokens=1000) as call:
            call.record(chat(model, "m"))
        assert call.outcome is not None and call.outcome.status == "accepted"
        assert call.reservation.decision == "allow" and call.reservation.reservation_id

        with pytest.raises(Blocked) as blocked, metered_call(ledger, "w", "m", input_tokens=1000) as never:
            never.record(chat(model, "m"))
        assert model.requests == 2, "the model was called although the check answered 402"
    wait_processed(settings, worker)
    assert blocked.value.dimension == "period_spend"
    (entry,) = [e for e in entries(settings) if e.user == "w"]
    assert (entry.input_tokens, entry.output_tokens, entry.cost) == (BUDGET_TOKENS // 2, BUDGET_TOKENS // 2,
                                                                     Decimal("1.00"))


def test_spend_and_history_through_the_client_agree_after_the_projector_catches_up(settings, worker, ledger_api):
    from projections.projector import Projector

    base, key = ledger_api
    subscribe(base, key, ["reader"])
    with LedgerClient(base, key, retry=FAST_RETRY) as ledger:
        outcomes = [ledger.record_usage("reader", "m", 100 * n, 50 * n) for n in range(1, 8)]
        assert {o.status for o in outcomes} == {"accepted"}
        live = ledger.spend("reader")  # asked after the usage, in the same partition: it includes all of it
        assert live.period_spend == sum(Decimal(150 * n) / 100_000 for n in range(1, 8))  # $0.01 per 1K tokens
        asyncio.run(Projector(settings).run(until_caught_up=True))
        rows = list(ledger.history("reader", start=live.period_start, end=live.period_end, page_size=1,
                                   group_by="model"))
    assert [(r.model, r.calls) for r in rows] == [("m", 7)]
    assert sum(r.spend for r in rows) == live.period_spend
    assert live.model_tokens == {"m": sum(r.input_tokens + r.output_tokens for r in rows)}


def test_a_reserving_check_whose_answer_was_lost_is_retried_and_holds_its_estimate_once(settings, worker, ledger_api):
    base, key = ledger_api
    subscribe(base, key, ["holder"])
    lossy = LoseTheFirstAnswer("/check", accepted=200)
    with LedgerClient(base, key, retry=FAST_RETRY, transport=lossy) as ledger:
        held = ledger.reserve("holder", "m", input_tokens=10_000, output_tokens=0)  # $0.10 of METERED
        assert held.decision == "allow" and held.reservation_id is not None
        assert len(lossy.usage_bodies) == 2 and lossy.usage_bodies[0] == lossy.usage_bodies[1]
        assert ledger.spend("holder").reserved == Decimal("0.10")  # held once, not twice
        # The call's usage settles it; a retry of the check after that holds nothing.
        ledger.record_usage("holder", "m", 10_000, 0, reservation_id=held.reservation_id)
        assert ledger.spend("holder").reserved == 0
