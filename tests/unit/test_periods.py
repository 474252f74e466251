from datetime import UTC, datetime, timedelta

import pytest

from ledger.periods import add_months, period_bounds, session_expired

UTC = UTC


def d(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize("anchor, months, expected", [
    (d(2026, 1, 31), 1, d(2026, 2, 28)),
    (d(2026, 1, 31), 2, d(2026, 3, 31)),      # from the anchor, never step by step
    (d(2028, 1, 31), 1, d(2028, 2, 29)),      # leap year
    (d(2026, 11, 15), 2, d(2027, 1, 15)),
    (d(2026, 3, 31), 12, d(2027, 3, 31)),
])
def test_add_months_clamps_to_month_end(anchor, months, expected):
    assert add_months(anchor, months) == expected


@pytest.mark.parametrize("anchor, interval, at, start, end", [
    (d(2026, 11, 1), "month", d(2026, 11, 1), d(2026, 11, 1), d(2026, 12, 1)),
    (d(2026, 11, 1), "month", d(2026, 11, 30, 23, 59), d(2026, 11, 1), d(2026, 12, 1)),
    (d(2026, 11, 1), "month", d(2026, 12, 1), d(2026, 12, 1), d(2027, 1, 1)),
    (d(2026, 1, 31), "month", d(2026, 3, 1), d(2026, 2, 28), d(2026, 3, 31)),
    (d(2026, 1, 31), "month", d(2026, 2, 27), d(2026, 1, 31), d(2026, 2, 28)),
    (d(2026, 11, 15, 12), "month", d(2026, 12, 15, 11), d(2026, 11, 15, 12), d(2026, 12, 15, 12)),
    (d(2026, 2, 10), "year", d(2027, 2, 9), d(2026, 2, 10), d(2027, 2, 10)),
    (d(2026, 2, 10), "year", d(2027, 2, 10), d(2027, 2, 10), d(2028, 2, 10)),
])
def test_period_bounds(anchor, interval, at, start, end):
    assert period_bounds(anchor, interval, at) == (start, end)
    assert start <= at < end


def test_every_instant_of_a_long_span_is_in_exactly_one_period():
    anchor = d(2026, 1, 31, 9)
    at, seen = anchor, set()
    while at < d(2028, 6, 1):
        start, end = period_bounds(anchor, "month", at)
        assert start <= at < end
        seen.add(start)
        at += timedelta(hours=13)
    assert len(seen) == 29


def test_session_expiry_is_strictly_after_the_timeout():
    t = d(2026, 11, 1)
    assert not session_expired(t, t + timedelta(minutes=30), timedelta(minutes=30))
    assert session_expired(t, t + timedelta(minutes=30, seconds=1), timedelta(minutes=30))
