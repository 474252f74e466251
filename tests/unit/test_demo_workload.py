"""The demo's workload is dated relative to the day it runs: right after `make demo` its usage is live and the
local stack's wall-clock tick ends no period under it, on whatever day the demo runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ledger.cli.demo import USERS, demo_start, demo_usage
from ledger.events import ClockTicked, SpendAnswer, SpendQueried
from ledger.periods import add_months
from tests.factories import TENANT, Ledger, assigned, published, seed_plans

# The day the fixed 2026-11-01 workload broke (a tick ended its period), the 1st of a month just after midnight,
# mid-month, the last second of a month, a leap day, the last day of a year.
NOWS = [datetime(2026, 12, 1, 11, 16, tzinfo=UTC), datetime(2027, 1, 1, 0, 0, 30, tzinfo=UTC),
        datetime(2027, 3, 15, 12, tzinfo=UTC), datetime(2027, 4, 30, 23, 59, 59, tzinfo=UTC),
        datetime(2028, 2, 29, 8, tzinfo=UTC), datetime(2027, 12, 31, 18, tzinfo=UTC)]


def run_demo(now: datetime) -> tuple[Ledger, list]:  # type: ignore[type-arg]
    """The demo as the processor folds it: plans, every user on their plan from the demo's start, the usage."""
    start = demo_start(now)
    plans = seed_plans()
    led = Ledger()
    for plan in plans.values():
        led.apply(published(plan))
    for user, (plan_name, _) in USERS.items():
        led.apply(assigned(user, plans[plan_name], start=start))
    gates = [g for d in led.apply_all(list(demo_usage(TENANT, start))) for g in d.gates]
    return led, gates


@pytest.mark.parametrize("now", NOWS, ids=lambda now: now.isoformat())
def test_every_event_lies_before_now_in_the_period_the_users_start_on(now):
    start = demo_start(now)
    times = [c.occurred_at for c in demo_usage(TENANT, start)]
    assert start <= min(times) and max(times) < now
    assert now < add_months(start, 1)  # the first period is still open when the demo runs


@pytest.mark.parametrize("now", NOWS, ids=lambda now: now.isoformat())
def test_after_the_demo_live_spend_shows_its_usage_and_a_wall_clock_tick_unblocks_nobody(now):
    led, gates = run_demo(now)
    assert {g.kind for g in gates} == {"soft_warning", "hard_block"}  # the demo's users do cross their limits

    tick = led.apply(ClockTicked(event_id=f"tick-{now.isoformat()}", occurred_at=now))

    assert [g for g in tick.gates if g.kind == "unblocked"] == []
    answer = led.apply(SpendQueried(event_id="q", request_id="q", tenant=TENANT, user="carol", occurred_at=now)).reply
    assert isinstance(answer, SpendAnswer)
    assert answer.period_start == demo_start(now) and answer.period_spend > 0 and answer.status == "blocked"


def test_the_same_day_gives_the_same_events_and_another_day_new_ids():
    morning, evening = datetime(2027, 3, 15, 0, 5, tzinfo=UTC), datetime(2027, 3, 15, 23, 55, tzinfo=UTC)
    assert demo_usage(TENANT, demo_start(morning)) == demo_usage(TENANT, demo_start(evening))
    today = {c.event_id for c in demo_usage(TENANT, demo_start(morning))}
    tomorrow = {c.event_id for c in demo_usage(TENANT, demo_start(morning + timedelta(days=1)))}
    assert today.isdisjoint(tomorrow)
