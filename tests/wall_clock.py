"""The wall clock against the tests' dated workloads: a ticking worker must not end a test's period under it.

A worker with ``LEDGER_TICK_SECONDS`` above 0 writes a ``ClockTicked`` dated ``now`` to every partition. A
workload dated in a period the wall clock has already left is then closed mid-test: its blocks lift, its
reservations expire, and the outcome depends on the day the suite runs. Workers in tests therefore tick only
when a test opts in, and only over a workload the wall clock has not left (see docs/time-in-tests.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from ledger.periods import add_months

TICK_SETTING = "LEDGER_TICK_SECONDS"
TICKS_OFF = {TICK_SETTING: "0"}


def tick_seconds(env: Mapping[str, str]) -> int:
    """How often a process started with ``env`` ticks (0: never); the worker's own default when unset."""
    from ledger.settings import Settings

    return Settings.from_env({TICK_SETTING: env[TICK_SETTING]} if TICK_SETTING in env else {}).tick_seconds


def ticking_problem(workload_start: datetime, now: datetime) -> str | None:
    """Why a worker ticking from ``now`` would disagree with a workload dated from ``workload_start``, or None.

    The shortest period a plan has is a month anchored at the subscription start: once the wall clock is past
    the month that starts with the workload, the first wall-clock tick ends that period.
    """
    period_end = add_months(workload_start, 1)
    if now < period_end:
        return None
    return (f"a worker ticking from the wall clock ({now.isoformat()}) would end the period of this test's workload "
            f"({workload_start.isoformat()} to {period_end.isoformat()}) mid-test: leave {TICK_SETTING}=0 (the "
            "tests' default) and publish ClockTicked events dated in the workload, or date the workload relative "
            "to now")
