"""Three workers in one consumer group; one is killed with kill -9 and another joins mid-run.

Partitions and their table partitions move twice while events flow in; the
account table, the gate events and the DuckDB history still equal the oracle:
nothing lost, nothing double-counted.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ProjectorProcess, free_port, wait_processed
from tests.kafka_io import publish
from tests.reliability.audit import audit, wait_for_entries, workload

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = 3000
EVENTS = 300_000
PHASES = 3  # the log grows in three slices, so each change of membership happens with work still ahead
SECONDS_BETWEEN = 0.5  # each user's events are 25 minutes apart: one session, one period


def test_workers_join_and_die_while_partitions_move(settings, worker_factory):
    users, setup, events = workload(USERS, EVENTS, SECONDS_BETWEEN)
    slices = [events[i * EVENTS // PHASES:(i + 1) * EVENTS // PHASES] for i in range(PHASES)]
    publish(settings, setup)
    publish(settings, slices[0], envelopes=False)  # one command per record here; the crash test's are enveloped

    workers = [worker_factory(settings, str(i)).start() for i in range(3)]
    projector = ProjectorProcess(settings).start()

    def healthy() -> None:
        for w in workers:
            assert w.alive() or w is workers[1], f"worker {w.worker_id} died:\n{w.log_tail()}"

    try:
        # Given three workers sharing the first slice,
        # when one of them is killed halfway through it,
        wait_for_entries(settings, len(slices[0]) / 2, healthy)
        workers[1].kill9()
        publish(settings, slices[1], envelopes=False)
        # and a fourth joins halfway through the second slice,
        wait_for_entries(settings, len(slices[0]) + len(slices[1]) / 2, healthy)
        joined_port = free_port()
        workers.append(worker_factory(settings, "3", env={"LEDGER_METRICS_PORT": str(joined_port)}).start())
        publish(settings, slices[2], envelopes=False)
        for w in (workers[0], workers[2], workers[3]):
            wait_processed(settings, w, timeout_s=300)
        projector.wait_caught_up()
        joined = httpx.get(f"http://127.0.0.1:{joined_port}/metrics", timeout=5).text
    finally:
        projector.stop()
    # The worker that joined took partitions over and did part of the work.
    assert sum(s.value for f in text_string_to_metric_families(joined) for s in f.samples
               if s.name == "ledger_events_processed_total") > 0

    # then the table, the topics and the history equal the oracle.
    repeated = audit(settings, users, events)
    print(f"\nrebalance test: {repeated['gates']} gate events; {repeated['entries_repeated']} entries and "
          f"{repeated['gates_repeated']} gate events repeated under their ids")
