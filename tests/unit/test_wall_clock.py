"""Workers started by tests tick only when a test says so, and never over a workload the wall clock has left."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ledger.settings import Settings
from tests.conftest import WorkerProcess
from tests.factories import T0
from tests.wall_clock import tick_seconds, ticking_problem


@pytest.mark.parametrize("now, disagrees", [
    (T0 - timedelta(days=30), False),                        # the workload lies ahead: a tick changes nothing
    (T0 + timedelta(days=29, hours=23, minutes=59), False),  # still in the workload's first month
    (datetime(2026, 12, 1, tzinfo=UTC), True),               # the first instant of the next period
    (datetime(2026, 12, 1, 11, 16, tzinfo=UTC), True),       # the day the suite broke
    (datetime(2027, 3, 15, 12, tzinfo=UTC), True),
])
def test_a_wall_clock_past_the_workload_s_first_period_disagrees_with_it(now, disagrees):
    assert (ticking_problem(T0, now) is not None) is disagrees


def test_a_worker_ticks_only_when_the_test_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("LEDGER_TICK_SECONDS", "60")  # e.g. exported in the developer's shell
    settings = Settings(home=tmp_path, namespace="ns")
    assert tick_seconds(WorkerProcess(settings).environment()) == 0
    assert tick_seconds(WorkerProcess(settings, env={"LEDGER_TICK_SECONDS": "1"}).environment()) == 1


def test_a_ticking_worker_over_a_workload_the_wall_clock_has_left_refuses_to_start(tmp_path):
    settings = Settings(home=tmp_path, namespace="ns")
    now = datetime.now(UTC)
    stale = WorkerProcess(settings, env={"LEDGER_TICK_SECONDS": "1"}, workload_start=now - timedelta(days=40))
    with pytest.raises(pytest.fail.Exception, match="would end the period of this test's workload"):
        stale.start()
    assert stale.proc is None
    assert ticking_problem(now - timedelta(days=1), now) is None  # a workload dated relative to now may tick
