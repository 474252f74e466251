"""Live spend read from the account: totals, what is left of each limit, status, and that reading changes nothing."""

from datetime import timedelta
from decimal import Decimal

import msgspec

from ledger.events import SpendAnswer, SpendQueried, ToppedUp
from tests.factories import T0, TENANT, assigned, ok, usage
from tests.unit.test_gates_and_admission import PAYGO, TINY, check, ledger_with


def ask(led, user: str, at) -> SpendAnswer:  # type: ignore[no-untyped-def]
    before = msgspec.json.encode(led.accounts.get((TENANT, user)))
    decision = ok(led.apply(SpendQueried(event_id=f"q-{at}", request_id="r", tenant=TENANT, user=user, occurred_at=at)))
    assert decision.account is None and not decision.gates and decision.entry is None
    assert msgspec.json.encode(led.accounts.get((TENANT, user))) == before  # a question changes nothing
    assert isinstance(decision.reply, SpendAnswer)
    return decision.reply


def limit(answer: SpendAnswer, dimension: str):  # type: ignore[no-untyped-def]
    (found,) = [u for u in answer.limits if u.dimension == dimension]
    return found


def test_a_user_without_a_plan_is_reported_as_such():
    assert ask(ledger_with(TINY), "nobody", T0).status == "no_plan"


def test_spend_and_what_is_left_follow_the_usage_through_warning_and_block():
    led = ledger_with(TINY)  # $1.00 a period, soft 0.80, hard 1.00; 20,000 input tokens of "m" cost $0.20
    ok(led.apply(assigned("u", TINY)))
    statuses = []
    for n in range(5):
        ok(led.apply(usage("u", n, model="m", input_tokens=20_000, output_tokens=0)))
        answer = ask(led, "u", T0 + timedelta(minutes=n, seconds=30))
        period = limit(answer, "period_spend")
        assert answer.period_spend == period.used == Decimal("0.20") * (n + 1)
        assert period.remaining == Decimal("1.00") - period.used
        assert answer.model_tokens == {"m": 20_000 * (n + 1)}
        assert limit(answer, "model_tokens").used == 20_000 * (n + 1)
        statuses.append(answer.status)
    assert statuses == ["ok", "ok", "ok", "warning", "blocked"]
    assert [(s.session_id, s.spend) for s in answer.sessions] == [("s1", Decimal("1.00"))]
    assert (answer.period_start, answer.period_end) == (T0, T0 + timedelta(days=30))


def test_a_question_after_the_period_ended_sees_the_new_empty_period_and_no_period_block():
    led = ledger_with(TINY)
    ok(led.apply(assigned("u", TINY)))
    for n in range(4):
        ok(led.apply(usage("u", n, model="m", input_tokens=25_000, output_tokens=0)))
    december = ask(led, "u", T0 + timedelta(days=31))
    assert december.status == "ok" and december.period_spend == 0 and december.model_tokens == {}
    assert december.period_start == T0 + timedelta(days=30)
    assert december.sessions == []  # the November session timed out long ago
    assert led.account("u").period_spend == Decimal("1.00")  # the stored account did not roll


def test_reservations_and_the_prepaid_balance_are_shown():
    led = ledger_with(TINY, PAYGO)
    ok(led.apply(assigned("u", PAYGO)))
    ok(led.apply(ToppedUp(event_id="top", tenant=TENANT, user="u", amount=Decimal("0.30"), occurred_at=T0)))
    ok(led.apply(check("u", 1, tokens=10_000)))  # holds $0.10 for 600 s
    held = ask(led, "u", T0 + timedelta(seconds=5))
    assert (held.balance, held.reserved, held.status) == (Decimal("0.30"), Decimal("0.10"), "ok")
    assert ask(led, "u", T0 + timedelta(seconds=700)).reserved == 0  # expired in event time
    ok(led.apply(usage("u", 1, model="m", input_tokens=30_000, output_tokens=0)))
    assert ask(led, "u", T0 + timedelta(minutes=2)).status == "blocked"


def test_a_subscription_that_starts_later_shows_its_first_period_empty():
    led = ledger_with(TINY)
    ok(led.apply(assigned("u", TINY, start=T0 + timedelta(days=10))))
    early = ask(led, "u", T0)  # the question precedes the subscription (or the API's clock is behind)
    assert (early.status, early.period_spend, early.period_start) == ("ok", 0, T0 + timedelta(days=10))


def test_a_re_anchored_subscription_starts_an_empty_period_and_lifts_the_old_period_s_block():
    led = ledger_with(TINY)
    ok(led.apply(assigned("u", TINY)))
    for n in range(5):
        ok(led.apply(usage("u", n, model="m", input_tokens=20_000, output_tokens=0)))
    assert ask(led, "u", T0 + timedelta(hours=1)).status == "blocked"
    new_anchor = T0 + timedelta(days=3)
    ok(led.apply(assigned("u", TINY, start=new_anchor)))
    fresh = ask(led, "u", new_anchor + timedelta(hours=1))
    assert (fresh.status, fresh.period_spend, fresh.period_start) == ("ok", 0, new_anchor)
    # The next call is admitted, and the block of the old period is lifted once, with an event.
    admitted = ok(led.apply(check("u", 99, tokens=1_000, at=new_anchor + timedelta(hours=2))))
    assert admitted.reply is not None and admitted.reply.decision == "allow"
    assert [(g.kind, g.dimension) for g in admitted.gates] == [("unblocked", "period_spend")]
