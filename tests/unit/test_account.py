"""Scenario tables for the account fold: given a plan and events, then these outcomes."""

from datetime import timedelta
from decimal import Decimal

import msgspec
import pytest

from ledger.account import DEDUP_WINDOW_EVENTS_PER_USER, Result, within_horizon
from ledger.events import PlanPublished
from tests.factories import T0, TENANT, Ledger, assigned, ok, published, seed_plans, usage


@pytest.fixture
def ledger() -> Ledger:
    led = Ledger()
    for plan in seed_plans().values():
        ok(led.apply(published(plan)))
    return led


def gates_of(decisions):
    return [(g.kind, g.dimension, g.model, g.used) for d in decisions for g in d.gates]


def test_free_user_soft_at_8000_tokens_and_hard_at_10000(ledger):
    plans = seed_plans()
    ok(ledger.apply(assigned("u", plans["free"])))
    decisions = [ok(ledger.apply(usage("u", n))) for n in range(1, 8)]
    assert [d.entry.cost for d in decisions] == [Decimal("0.00075")] * 7
    assert gates_of(decisions) == [
        ("soft_warning", "model_tokens", "gpt-4o-mini", Decimal(8000)),
        ("hard_block", "model_tokens", "gpt-4o-mini", Decimal(10000)),
    ]
    assert [i for i, d in enumerate(decisions, 1) if d.gates] == [4, 5]
    assert ledger.account("u").period_spend == Decimal("0.00525")


@pytest.mark.parametrize("calls, input_tokens, expected", [
    # pro: gpt-4o-mini 200k quota, session cap $5, period cap $49
    (1, 161_000, [("soft_warning", "model_tokens")]),
    (1, 200_000, [("soft_warning", "model_tokens"), ("hard_block", "model_tokens")]),
    (2, 100_000, [("soft_warning", "model_tokens"), ("hard_block", "model_tokens")]),
    (3, 50_000, []),
])
def test_pro_model_quota(ledger, calls, input_tokens, expected):
    ok(ledger.apply(assigned("p", seed_plans()["pro"])))
    decisions = [ok(ledger.apply(usage("p", n, input_tokens=input_tokens, output_tokens=0)))
                 for n in range(calls)]
    assert [(k, dim) for k, dim, *_ in gates_of(decisions) if dim == "model_tokens"] == expected


def test_session_spend_gates_fire_once_per_session_and_again_in_a_new_session(ledger):
    ok(ledger.apply(assigned("p", seed_plans()["pro"])))
    # gpt-4o at 100k input = $0.25 per call; session cap $5: soft at $4 (16 calls), hard at $5 (20 calls)
    first = [ok(ledger.apply(usage("p", n, model="gpt-4o", input_tokens=100_000, output_tokens=0,
                                   at=T0 + timedelta(minutes=n)))) for n in range(1, 22)]
    session_gates = [(k, u) for k, dim, _, u in gates_of(first) if dim == "session_spend"]
    assert session_gates == [("soft_warning", Decimal("4.00")), ("hard_block", Decimal("5.00"))]
    # 31 minutes of silence (timeout 30): same session id, a new session
    later = T0 + timedelta(minutes=21 + 31)
    second = [ok(ledger.apply(usage("p", 100 + n, model="gpt-4o", input_tokens=100_000, output_tokens=0,
                                    at=later + timedelta(minutes=n)))) for n in range(16)]
    assert [(k, dim) for k, dim, *_ in gates_of(second) if dim == "session_spend"] == [("soft_warning", "session_spend")]
    assert second[0].entry.session_spend == Decimal("0.25")
    assert len({g.gate_id for d in first + second for g in d.gates}) == len(gates_of(first + second))


def test_a_new_period_resets_spend_and_gates(ledger):
    ok(ledger.apply(assigned("u", seed_plans()["free"])))
    november = [ok(ledger.apply(usage("u", n))) for n in range(1, 6)]
    december = [ok(ledger.apply(usage("u", 100 + n, at=T0 + timedelta(days=30, minutes=n)))) for n in range(1, 6)]
    assert november[-1].entry.period_model_tokens == december[-1].entry.period_model_tokens == 10_000
    assert december[0].entry.period_spend == Decimal("0.00075")
    # The first call of December lifts November's block: one unblocked event, then December's own crossings.
    assert [(k, used) for k, _, _, used in gates_of(december)] == [
        ("unblocked", Decimal(0)), ("soft_warning", Decimal(8000)), ("hard_block", Decimal(10000))]
    assert {g.gate_id for d in november for g in d.gates}.isdisjoint(g.gate_id for d in december for g in d.gates)


def test_a_late_event_from_a_closed_period_is_history_not_live_spend(ledger):
    ok(ledger.apply(assigned("u", seed_plans()["free"])))
    ok(ledger.apply(usage("u", 1, at=T0 + timedelta(days=31))))
    late = ok(ledger.apply(usage("u", 2, at=T0 + timedelta(days=2))))
    assert late.entry.late and late.entry.period_start == T0 and late.gates == ()
    assert ledger.account("u").period_spend == Decimal("0.00075")


@pytest.mark.parametrize("event, code", [
    (usage("nobody", 1), "no_plan"),
    (usage("u", 1, model="gpt-4o"), "model_not_allowed"),
    (usage("u", 1, model="claude-opus"), "model_not_allowed"),
    (usage("u", 1, at=T0 - timedelta(seconds=1)), "before_subscription"),
])
def test_rejections_leave_the_account_untouched(ledger, event, code):
    ok(ledger.apply(assigned("u", seed_plans()["free"])))
    before = msgspec.json.encode(ledger.account("u"))
    decision = ledger.apply(event)
    assert (decision.result, decision.code) == (Result.rejected, code)
    assert decision.account is None and decision.entry is None
    assert msgspec.json.encode(ledger.account("u")) == before


def test_duplicates_and_conflicts(ledger):
    ok(ledger.apply(assigned("u", seed_plans()["free"])))
    ok(ledger.apply(usage("u", 1)))
    before = msgspec.json.encode(ledger.account("u"))
    assert ledger.apply(usage("u", 1)).result is Result.duplicate
    conflict = ledger.apply(usage("u", 1, input_tokens=999))
    assert conflict.result is Result.conflict and "different payload" in conflict.reason
    assert msgspec.json.encode(ledger.account("u")) == before


def test_the_dedup_window_is_bounded(ledger):
    ok(ledger.apply(assigned("u", seed_plans()["pro"])))
    for n in range(DEDUP_WINDOW_EVENTS_PER_USER + 10):
        ok(ledger.apply(usage("u", n, input_tokens=1, output_tokens=0, at=T0 + timedelta(seconds=n))))
    account = ledger.account("u")
    held = [event_id for (_t, _u, event_id), seen in ledger.seen.items() if within_horizon(account, seen)]
    assert len(held) == DEDUP_WINDOW_EVENTS_PER_USER
    assert ledger.apply(usage("u", DEDUP_WINDOW_EVENTS_PER_USER + 9, input_tokens=1, output_tokens=0,
                              at=T0 + timedelta(seconds=DEDUP_WINDOW_EVENTS_PER_USER + 9))).result is Result.duplicate
    # The oldest ids have left the horizon: the same event again is applied as new.
    assert ledger.apply(usage("u", 0, input_tokens=1, output_tokens=0, at=T0)).result is Result.ok


def test_a_session_keeps_its_plan_version_and_a_new_session_uses_the_newest(ledger):
    pro = seed_plans()["pro"]
    ok(ledger.apply(assigned("u", pro)))
    ok(ledger.apply(usage("u", 1, model="gpt-4o", input_tokens=40_000, output_tokens=0, session="old")))
    v2 = msgspec.structs.replace(pro, version=2, model_limits={
        **pro.model_limits, "gpt-4o": msgspec.convert({"max_tokens_per_period": 75_000}, type(pro.model_limits["gpt-4o"]))})
    ok(ledger.apply(PlanPublished(event_id="pro-v2", tenant=TENANT, occurred_at=T0, plan=v2)))
    old = ok(ledger.apply(usage("u", 2, model="gpt-4o", input_tokens=10_000, output_tokens=0, session="old")))
    assert old.entry.plan_version == 1
    assert [(g.kind, g.limit) for g in old.gates] == [("hard_block", Decimal(50_000))]
    new = ok(ledger.apply(usage("u", 3, model="gpt-4o", input_tokens=10_000, output_tokens=0, session="new")))
    assert new.entry.plan_version == 2
    assert [(g.kind, g.limit) for g in new.gates] == [("soft_warning", Decimal(75_000))]


def test_republishing_a_plan_version_is_a_duplicate_and_changing_it_a_conflict(ledger):
    free = seed_plans()["free"]
    assert ledger.apply(published(free)).result is Result.duplicate
    changed = msgspec.structs.replace(free, max_spend_per_period=Decimal(6))
    assert ledger.apply(published(changed)).result is Result.conflict
