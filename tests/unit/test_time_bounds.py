"""Every time a command may carry keeps the period arithmetic inside datetime's range.

A subscription starting 9999-12-31 once made the processor compute year 10000 (OverflowError), and every later
question about the user timed out. Commands now carry times in [TIMESTAMP_MIN, TIMESTAMP_MAX) only.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.events import TIMESTAMP_MAX, TIMESTAMP_MIN, AnyCommand, PlanAssigned, UsageRecorded
from ledger.periods import billing_period

OUTSIDE = ["9999-12-31T23:59:59Z", "9999-12-31T23:59:59-05:00", "2100-01-01T00:00:00Z", "1969-12-31T23:59:59Z",
           "0001-01-01T00:00:00+05:00"]


def _assigned(period_start: str, occurred_at: str = "2026-11-01T00:00:00Z") -> bytes:
    return msgspec.json.encode({"type": "plan_assigned", "event_id": "a1", "tenant": "t", "user": "u", "plan_id": "p",
                                "period_start": period_start, "occurred_at": occurred_at})


@pytest.mark.parametrize("when", OUTSIDE)
def test_a_command_outside_the_bounds_does_not_decode(when):
    with pytest.raises(msgspec.ValidationError, match="outside the times the ledger accepts"):
        msgspec.json.decode(_assigned(when), type=AnyCommand)
    with pytest.raises(msgspec.ValidationError, match="occurred_at"):
        msgspec.json.decode(_assigned("2026-11-01T00:00:00Z", occurred_at=when), type=AnyCommand)
    with pytest.raises(ValueError, match="period_start"):
        PlanAssigned(event_id="a1", tenant="t", user="u", plan_id="p", period_start=datetime.fromisoformat(when),
                     occurred_at=datetime(2026, 11, 1, tzinfo=UTC))


def test_the_bounds_themselves():
    assert msgspec.json.decode(_assigned(TIMESTAMP_MIN.isoformat()), type=AnyCommand)
    last = (TIMESTAMP_MAX - timedelta(microseconds=1)).isoformat()
    assert msgspec.json.decode(_assigned(last, occurred_at=last), type=AnyCommand)
    with pytest.raises(ValueError):
        UsageRecorded(event_id="e", tenant="t", user="u", model="m", input_tokens=1, output_tokens=1,
                      occurred_at=TIMESTAMP_MAX)


times = st.datetimes(min_value=TIMESTAMP_MIN.replace(tzinfo=None),
                     max_value=(TIMESTAMP_MAX - timedelta(microseconds=1)).replace(tzinfo=None), timezones=st.just(UTC))


@given(anchor=times, at=times, trial_days=st.integers(0, 366), interval=st.sampled_from(["month", "year"]))
def test_no_accepted_time_overflows_the_period_arithmetic(anchor, at, trial_days, interval):
    if at < anchor:
        anchor, at = at, anchor
    start, end = billing_period(anchor, interval, trial_days, at)
    assert start <= at < end
