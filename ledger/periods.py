"""Billing periods anchored at the subscription start, and session windows.

Everything here takes time as an argument (event time); nothing reads a clock.
"""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta
from typing import Literal

Interval = Literal["month", "year"]


def add_months(anchor: datetime, months: int) -> datetime:
    """``anchor`` moved by whole months, clamped to the month's last day.

    Always computed from the anchor (never step by step), so a subscription
    started on the 31st renews on Feb 28/29, then on Mar 31 again.
    """
    month_index = anchor.month - 1 + months
    year, month = anchor.year + month_index // 12, month_index % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_bounds(anchor: datetime, interval: Interval, at: datetime) -> tuple[datetime, datetime]:
    """The period ``[start, end)`` that contains ``at``; ``at`` must not precede ``anchor``."""
    if at < anchor:
        raise ValueError("time precedes the subscription start")
    step = 12 if interval == "year" else 1
    n = ((at.year - anchor.year) * 12 + at.month - anchor.month) // step
    start = add_months(anchor, n * step)
    if start > at:
        n -= 1
        start = add_months(anchor, n * step)
    end = add_months(anchor, (n + 1) * step)
    if end <= at:  # clamping can leave `at` just past the computed end
        start, end = end, add_months(anchor, (n + 2) * step)
    return start, end


def session_expired(last_at: datetime, at: datetime, timeout: timedelta) -> bool:
    """A session ends after ``timeout`` without events, in event time."""
    return at - last_at > timeout


def billing_period(anchor: datetime, interval: Interval, trial_days: int, at: datetime) -> tuple[datetime, datetime]:
    """The period containing ``at``: a trial of ``trial_days`` first, then periods anchored at its end."""
    if trial_days:
        trial_end = anchor + timedelta(days=trial_days)
        if at < trial_end:
            if at < anchor:
                raise ValueError("time precedes the subscription start")
            return anchor, trial_end
        anchor = trial_end
    return period_bounds(anchor, interval, at)
