"""kill -9 the worker (three times) and the projector while they work: nothing lost, nothing double-counted."""

from __future__ import annotations

import pytest

from tests.conftest import ProjectorProcess, wait_processed
from tests.kafka_io import publish
from tests.reliability.audit import audit, wait_for_entries, workload

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = 1000
EVENTS = 100_000
KILLS_AT = (0.15, 0.4, 0.65)  # fractions of the entries produced when the worker is killed


def test_kill_9_during_processing_loses_nothing_and_double_counts_nothing(settings, worker_factory):
    users, setup, events = workload(USERS, EVENTS)
    publish(settings, setup)
    publish(settings, events)

    worker = worker_factory(settings).start()
    projector = ProjectorProcess(settings).start()

    def healthy() -> None:
        assert worker.alive(), worker.log_tail()

    try:
        for kills, fraction in enumerate(KILLS_AT, start=1):
            wait_for_entries(settings, fraction * EVENTS, healthy)
            worker.kill9()
            if kills == 2:
                projector.kill9()
                projector.start()
            worker.start()
        wait_processed(settings, worker, timeout_s=300)
        projector.wait_caught_up()
    finally:
        projector.stop()
    assert worker.starts == 4

    repeated = audit(settings, users, events)
    print(f"\ncrash test: {repeated['entries_repeated']} entries and {repeated['gates_repeated']} gate events "
          f"repeated under their ids after {len(KILLS_AT)} kills")
