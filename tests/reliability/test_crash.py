"""kill -9 the worker ten times at seeded random points (and the projector once): nothing lost, nothing double-counted.

``LEDGER_CRASH_SEED`` picks other points (``make soak`` sets a new one per run); a
failure prints its seed so that it replays.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.conftest import ProjectorProcess, wait_processed
from tests.kafka_io import publish
from tests.reliability.audit import audit, wait_for_entries, workload

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = 1000
EVENTS = 100_000
KILLS = 10


def kill_points(seed: int) -> list[float]:
    """Fractions of the entries produced when the worker is killed: sorted, spread over the run."""
    rng = random.Random(seed)
    return sorted(rng.uniform(0.02, 0.95) for _ in range(KILLS))


def test_kill_9_at_seeded_points_loses_nothing_and_double_counts_nothing(settings, worker_factory):
    seed = int(os.environ.get("LEDGER_CRASH_SEED", "2026"))
    points = kill_points(seed)
    print(f"\ncrash seed {seed}: kills at {[round(p, 3) for p in points]}")
    users, setup, events = workload(USERS, EVENTS)
    publish(settings, setup)
    publish(settings, events)

    worker = worker_factory(settings).start()
    projector = ProjectorProcess(settings).start()

    def healthy() -> None:
        assert worker.alive(), worker.log_tail()

    try:
        for kills, fraction in enumerate(points, start=1):
            wait_for_entries(settings, fraction * EVENTS, healthy)
            worker.kill9()
            if kills == KILLS // 2:
                projector.kill9()
                projector.start()
            worker.start()
        wait_processed(settings, worker, timeout_s=300)
        projector.wait_caught_up()
    finally:
        projector.stop()
    assert worker.starts == KILLS + 1

    repeated = audit(settings, users, events)
    print(f"crash test (seed {seed}): {repeated['entries_repeated']} entries and {repeated['gates_repeated']} "
          f"gate events repeated under their ids after {KILLS} kills")
