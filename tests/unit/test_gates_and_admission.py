"""Scenario tables for unblocks, pay-as-you-go, trials, and pre-call checks with reservations."""

from datetime import timedelta
from decimal import Decimal

import msgspec
import pytest

from ledger.account import Result
from ledger.events import CheckRequested, ClockTicked, ToppedUp
from ledger.plans import CostRate, ModelLimit, Plan
from tests.factories import T0, TENANT, Ledger, assigned, ok, published, seed_plans, usage

TINY = Plan(plan_id="tiny", name="tiny", version=1, max_spend_per_period=Decimal("1.00"),
            cost_rates={"m": CostRate(input=Decimal("0.01"), output=Decimal("0.01"))},
            model_limits={"m": ModelLimit(max_tokens_per_period=1_000_000)})
PAYGO = msgspec.structs.replace(TINY, plan_id="paygo", name="paygo", billing_mode="paygo", max_spend_per_period=None)
TRIAL = msgspec.structs.replace(TINY, plan_id="trial", name="trial", trial_days=7)


def ledger_with(*plans: Plan) -> Ledger:
    led = Ledger()
    for plan in plans:
        ok(led.apply(published(plan)))
    return led


def tick(at, n=0):  # type: ignore[no-untyped-def]
    return ClockTicked(event_id=f"tick-{n}", occurred_at=at)


def check(user: str, n: int, *, tokens: int = 10_000, reserve: bool = True, at=None, model="m", session="s1"):  # type: ignore[no-untyped-def]
    return CheckRequested(event_id=f"res-{user}-{n}", request_id=f"req-{n}", tenant=TENANT, user=user, model=model,
                          session_id=session, input_tokens=tokens, output_tokens=0, reserve=reserve,
                          occurred_at=at or T0 + timedelta(seconds=n))


def kinds(decisions):  # type: ignore[no-untyped-def]
    return [(g.kind, g.dimension) for d in decisions for g in d.gates]


def test_a_user_blocked_at_period_end_is_unblocked_by_the_clock_once():
    led = ledger_with(TINY)
    ok(led.apply(assigned("u", TINY)))
    spent = [ok(led.apply(usage("u", n, model="m", input_tokens=25_000, output_tokens=0))) for n in range(4)]
    assert kinds(spent)[-1] == ("hard_block", "period_spend")
    assert kinds([led.apply(tick(T0 + timedelta(days=29)))]) == []                 # still November
    december = [led.apply(tick(T0 + timedelta(days=30, seconds=1), 1)),
                led.apply(tick(T0 + timedelta(days=30, seconds=2), 2))]
    assert kinds(december) == [("unblocked", "period_spend")]
    assert led.account("u").period_spend == 0 and led.account("u").blocks == {}


def test_an_upgrade_that_lifts_the_limit_unblocks():
    pro = seed_plans()["pro"]
    led = ledger_with(TINY, pro)
    ok(led.apply(assigned("u", TINY)))
    blocked = [ok(led.apply(usage("u", n, model="m", input_tokens=50_000, output_tokens=0))) for n in range(2)]
    assert ("hard_block", "period_spend") in kinds(blocked)
    upgrade = ok(led.apply(assigned("u", pro, event_id="upgrade")))   # $49 cap: $1.00 spent is well under
    assert kinds([upgrade]) == [("unblocked", "period_spend")]
    assert upgrade.gates[0].cause_event_id == "upgrade"


def test_a_downgrade_keeps_a_block_that_still_holds():
    led = ledger_with(TINY, msgspec.structs.replace(TINY, plan_id="tinier", name="tinier",
                                                    max_spend_per_period=Decimal("0.50")))
    ok(led.apply(assigned("u", TINY)))
    ok(led.apply(usage("u", 1, model="m", input_tokens=100_000, output_tokens=0)))
    tinier = led.plans[(TENANT, "tinier")].newest
    assert ok(led.apply(assigned("u", tinier, event_id="down"))).gates == ()


def test_paygo_top_ups_add_usage_deducts_blocked_at_zero_and_a_top_up_unblocks():
    led = ledger_with(PAYGO)
    ok(led.apply(assigned("u", PAYGO)))
    ok(led.apply(ToppedUp(event_id="t1", tenant=TENANT, user="u", amount=Decimal("0.30"), occurred_at=T0)))
    calls = [ok(led.apply(usage("u", n, model="m", input_tokens=10_000, output_tokens=0))) for n in range(1, 5)]
    assert [c.gates for c in calls[:2]] == [(), ()]
    assert kinds(calls) == [("hard_block", "balance")]                # at 0.30 - 3 x 0.10 = 0
    assert led.account("u").balance == Decimal("-0.10")
    short = ok(led.apply(ToppedUp(event_id="t2", tenant=TENANT, user="u", amount=Decimal("0.05"), occurred_at=T0)))
    assert short.gates == ()                                          # -0.05: still out of money
    enough = ok(led.apply(ToppedUp(event_id="t3", tenant=TENANT, user="u", amount=Decimal("1"), occurred_at=T0)))
    assert kinds([enough]) == [("unblocked", "balance")]
    again = [ok(led.apply(usage("u", n, model="m", input_tokens=100_000, output_tokens=0))) for n in range(10, 12)]
    assert kinds(again) == [("hard_block", "balance")]                # a new crossing, with a new id
    ids = [g.gate_id for d in calls + [enough] + again for g in d.gates]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("amount", ["0", "-1", "1000001", "NaN"])
def test_invalid_top_ups_are_rejected(amount):
    led = ledger_with(PAYGO)
    ok(led.apply(assigned("u", PAYGO)))
    decision = led.apply(ToppedUp(event_id="t", tenant=TENANT, user="u", amount=Decimal(amount), occurred_at=T0))
    assert (decision.result, decision.code) == (Result.rejected, "invalid_amount")


def test_a_trial_is_its_own_period_then_periods_start_when_it_ends():
    led = ledger_with(TRIAL)
    ok(led.apply(assigned("u", TRIAL)))
    in_trial = ok(led.apply(usage("u", 1, model="m", at=T0 + timedelta(days=6))))
    after = ok(led.apply(usage("u", 2, model="m", at=T0 + timedelta(days=7))))
    assert (in_trial.entry.period_start, in_trial.entry.period_end) == (T0, T0 + timedelta(days=7))
    assert (after.entry.period_start, after.entry.period_end) == (T0 + timedelta(days=7), T0 + timedelta(days=37))


def test_reserving_checks_admit_exactly_what_the_budget_covers():
    led = ledger_with(TINY)
    ok(led.apply(assigned("u", TINY)))
    # $1.00 cap, each check holds 10k tokens x $0.01/1K = $0.10: ten fit, the eleventh does not.
    answers = [ok(led.apply(check("u", n))).reply for n in range(15)]
    assert [a.decision for a in answers] == ["allow"] * 7 + ["warn"] * 3 + ["block"] * 5
    assert answers[9].remaining["period_spend"] == 0 and answers[10].dimension == "period_spend"
    assert len(led.account("u").reservations) == 10


def test_usage_settles_its_reservation_at_the_actual_cost_and_frees_the_rest():
    led = ledger_with(TINY)
    ok(led.apply(assigned("u", TINY)))
    for n in range(10):
        ok(led.apply(check("u", n)))
    assert ok(led.apply(check("u", 10))).reply.decision == "block"
    settled = usage("u", 100, model="m", input_tokens=2_000, output_tokens=0, at=T0 + timedelta(seconds=20))
    ok(led.apply(msgspec.structs.replace(settled, reservation_id="res-u-0")))   # $0.02 actual for a $0.10 hold
    assert "res-u-0" not in led.account("u").reservations
    assert ok(led.apply(check("u", 11, tokens=8_000, at=T0 + timedelta(seconds=21)))).reply.decision == "warn"


def test_an_unsettled_reservation_expires_in_event_time():
    led = ledger_with(TINY)
    ok(led.apply(assigned("u", TINY)))
    for n in range(10):
        ok(led.apply(check("u", n)))
    late = T0 + timedelta(seconds=10 + 600)   # default ttl 600 s
    assert ok(led.apply(check("u", 20, at=late))).reply.decision == "allow"
    assert set(led.account("u").reservations) == {"res-u-20"}


def test_a_non_reserving_check_holds_nothing_and_a_blocked_user_is_refused():
    led = ledger_with(TINY)
    ok(led.apply(assigned("u", TINY)))
    assert ok(led.apply(check("u", 1, reserve=False))).reply.reservation_id is None
    assert led.account("u").reservations == {}
    for n in range(4):
        ok(led.apply(usage("u", n, model="m", input_tokens=25_000, output_tokens=0)))
    answer = ok(led.apply(check("u", 2, tokens=0, reserve=False, at=T0 + timedelta(minutes=10)))).reply
    assert (answer.decision, answer.dimension) == ("block", "period_spend")


def test_a_blocked_user_is_told_they_are_blocked_and_since_which_gate_not_what_the_call_would_reach():
    led = ledger_with(TINY)
    ok(led.apply(assigned("u", TINY)))
    for n in range(4):  # 4 x 0.25 = 1.00: the hard block at the limit
        ok(led.apply(usage("u", n, model="m", input_tokens=25_000, output_tokens=0)))
    answer = ok(led.apply(check("u", 2, tokens=2_000, reserve=False, at=T0 + timedelta(minutes=10)))).reply
    assert answer.decision == "block" and answer.dimension == "period_spend"
    assert answer.reason.startswith("user u is blocked on period_spend since its hard block at 1.00")
    assert "would reach" not in answer.reason
    # A user who is not blocked yet still hears what the call would bring them to.
    fresh = ledger_with(TINY)
    ok(fresh.apply(assigned("v", TINY)))
    over = ok(fresh.apply(check("v", 3, tokens=200_000, reserve=False))).reply
    assert over.decision == "block" and "would reach 2.000000000000 of its hard limit 1.00" in over.reason


@pytest.mark.parametrize("user, model, reason", [
    ("nobody", "m", "no plan"),
    ("u", "gpt-4o", "not allowed"),
])
def test_checks_that_cannot_pass(user, model, reason):
    led = ledger_with(TINY)
    ok(led.apply(assigned("u", TINY)))
    answer = ok(led.apply(check(user, 1, model=model))).reply
    assert answer.decision == "block" and reason in answer.reason


def test_a_late_event_that_crosses_a_threshold_in_a_closed_period_is_reported_as_a_correction():
    free = seed_plans()["free"]
    led = ledger_with(free)
    ok(led.apply(assigned("u", free)))
    november = [ok(led.apply(usage("u", n))) for n in range(1, 5)]           # 8,000 tokens: soft warning
    assert kinds(november) == [("soft_warning", "model_tokens")]
    ok(led.apply(usage("u", 10, at=T0 + timedelta(days=31))))               # December begins
    late = ok(led.apply(usage("u", 5, at=T0 + timedelta(days=2))))           # a November call arrives late
    assert late.entry.late and late.entry.period_start == T0
    (correction,) = late.gates
    assert (correction.kind, correction.used, correction.correction) == ("hard_block", Decimal(10_000), True)
    assert correction.scope == f"period:{T0.isoformat()}" and led.account("u").period_tokens == {"gpt-4o-mini": 2000}
    assert ok(led.apply(usage("u", 6, at=T0 + timedelta(days=3)))).gates == ()   # one event per crossing
    assert led.account("u").blocks == {}                                        # a closed period blocks nothing


def test_a_new_version_that_only_respells_a_threshold_raises_no_second_gate():
    free = seed_plans()["free"]
    respelled = msgspec.structs.replace(free, version=2, soft_gate_at=Decimal("0.8"), hard_gate_at=Decimal("1"))
    led = ledger_with(free)
    ok(led.apply(assigned("u", free)))
    first = [ok(led.apply(usage("u", n, session="a"))) for n in range(1, 5)]      # 8,000 tokens on v1: soft
    ok(led.apply(published(respelled)))
    later = ok(led.apply(usage("u", 5, session="b")))                               # a v2 session: 10,000 tokens
    assert kinds(first) == [("soft_warning", "model_tokens")]
    assert kinds([later]) == [("hard_block", "model_tokens")]


def test_a_retried_check_is_recognised_by_its_id_and_never_holds_the_estimate_twice():
    led = ledger_with(TINY)
    ok(led.apply(assigned("u", TINY)))
    first = ok(led.apply(check("u", 1, tokens=10_000)))
    assert first.reply is not None and first.reply.reservation_id == "res-u-1"
    # The same check again (the client lost the answer): another request id and time, the same id.
    retry = led.apply(msgspec.structs.replace(check("u", 1, tokens=10_000), request_id="req-again",
                                              occurred_at=T0 + timedelta(seconds=30)))
    assert retry.result is Result.duplicate and retry.account is None and not retry.gates
    assert retry.reply is not None and retry.reply.request_id == "req-again"
    assert (retry.reply.decision, retry.reply.reservation_id) == ("allow", "res-u-1")
    assert list(led.account("u").reservations) == ["res-u-1"]
    # Once settled, a retry holds nothing and says so.
    ok(led.apply(msgspec.structs.replace(usage("u", 1, model="m", input_tokens=10_000, output_tokens=0),
                                         reservation_id="res-u-1")))
    late = led.apply(msgspec.structs.replace(check("u", 1, tokens=10_000), request_id="req-late"))
    assert late.reply is not None and (late.reply.decision, late.reply.dimension) == ("block", "reservations")
    assert led.account("u").reservations == {}


def test_a_plain_check_asked_again_under_the_same_id_is_simply_answered_again():
    led = ledger_with(TINY)
    ok(led.apply(assigned("u", TINY)))
    for n in range(2):
        again = led.apply(msgspec.structs.replace(check("u", 1, tokens=10_000, reserve=False), request_id=f"req-{n}",
                                                  occurred_at=T0 + timedelta(seconds=n)))
        assert again.result is Result.ok and again.reply is not None
        assert (again.reply.request_id, again.reply.decision, again.reply.reservation_id) == (f"req-{n}", "allow", None)
    assert led.account("u").reservations == {}
