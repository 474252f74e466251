"""The fault matrix beyond kill -9 of the worker (see test_crash.py and test_rebalance.py).

Each scenario ends in the same audit: the account table (as a restore reads the
changelog), the entries and gates topics and DuckDB equal an independent oracle,
every repeat is byte-identical under its id, and the group's committed lag is 0.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from ledger.events import UsageRecorded
from ledger.settings import Settings
from streams.kafka_local import LocalBroker
from streams.progress import processor_group
from streams.topics import Topics, ensure_topics
from tests.conftest import ROOT, ProjectorProcess, free_port, new_settings, wait_processed
from tests.kafka_io import publish, read_partitions
from tests.reliability.audit import audit, wait_for_entries, workload

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SESSION_TIMEOUT_S = 10  # the worker's broker_session_timeout (streams/app.py)


def run_to_the_end(settings: Settings, worker, projector: ProjectorProcess) -> None:  # type: ignore[no-untyped-def]
    wait_processed(settings, worker, timeout_s=300)
    projector.wait_caught_up()
    projector.stop()


def published_workload(settings: Settings, users: int, events: int, envelopes: bool = True
                       ) -> tuple[dict[str, str], list[UsageRecorded]]:
    """The standard workload (tests/reliability/audit.py) in the usage log: its users' plans, then their events."""
    plan_of, setup, usage = workload(users, events)  # user -> plan name
    publish(settings, setup)
    publish(settings, usage, envelopes=envelopes)
    return plan_of, usage


def exit_and_restart(settings: Settings, worker_factory, env: dict[str, str], code: int, says: str) -> None:  # type: ignore[no-untyped-def]
    """A worker with a fault hook exits with ``code``, its log saying ``says``; a fresh worker then finishes the log."""
    dying = worker_factory(settings, env=env).start()
    projector = ProjectorProcess(settings).start()
    assert dying.wait_exit(timeout_s=120) == code, dying.log_tail()
    assert says in dying.log_tail(200)
    run_to_the_end(settings, worker_factory(settings).start(), projector)


def test_an_exception_mid_batch_stops_the_worker_and_a_restart_loses_nothing(settings, worker_factory):
    # Given a worker whose 3rd batch fails after sending half of its outputs
    # (a batch is at most 5,000 records, one event each here, so 20,000 events make at least 4 batches;
    # a batch is what one fetch brought, so a busy worker may well make no more than that),
    users, events = published_workload(settings, 200, 20_000, envelopes=False)
    # then the worker exits non-zero rather than acknowledging the batch,
    # and a restarted worker applies the batch again: nothing lost, nothing counted twice.
    exit_and_restart(settings, worker_factory, {"LEDGER_TEST_FAIL_BATCH": "3"}, 70,
                     "processing failed; stopping the worker")
    audit(settings, users, events)


def test_a_worker_killed_inside_a_state_transaction_leaves_nothing_a_restore_uses(settings, worker_factory):
    # Given a worker that dies inside the state transaction of a partition's last batch, its records in the log
    # (the batch is the last to touch its users: no later batch writes their accounts again),
    users, events = published_workload(settings, 100, 5_000)
    usage = Topics.for_namespace(settings.namespace).usage
    p, rows = max(read_partitions(settings, usage).items(), key=lambda kv: len(kv[1]))
    # then the next worker aborts that transaction and restores none of it: it applies the batch again,
    exit_and_restart(settings, worker_factory, {"LEDGER_TEST_EXIT_IN_TXN": f"{p}:{len(rows) - 1}"}, 75,
                     "test hook: exiting inside the state transaction")
    # and the committed changelog, all that Kafka's log cleaner leaves of it, holds every event.
    audit(settings, users, events)


def test_records_faust_fails_to_deliver_are_fetched_again_in_order(settings, worker_factory):
    # Given a worker that ignores the first delivery of three records (as Faust's consumer has been seen to),
    users, events = published_workload(settings, 100, 5_000)
    usage = Topics.for_namespace(settings.namespace).usage
    by_partition = read_partitions(settings, usage)
    dropped = [(p, len(rows) // 2) for p, rows in sorted(by_partition.items())[:2]]
    dropped.append((sorted(by_partition)[-1], len(by_partition[sorted(by_partition)[-1]]) - 1))  # a partition's last
    hook = ",".join(f"{p}:{o}" for p, o in dropped)
    worker = worker_factory(settings, env={"LEDGER_TEST_DROP_RECORDS": hook}).start()
    projector = ProjectorProcess(settings).start()
    run_to_the_end(settings, worker, projector)
    # then each hole is noticed and filled (the last one by the idle check), and nothing is missing.
    log = worker.log_tail(100_000)
    assert log.count("test hook: dropping") == 3
    assert "fetching the hole" in log and "nothing past" in log
    audit(settings, users, events)


def test_a_user_with_5000_events_between_two_good_commits_is_not_double_counted(settings, worker_factory):
    # Given one user whose 5,000 events are all applied,
    users, events = published_workload(settings, 1, 5_000)
    worker = worker_factory(settings).start()
    projector = ProjectorProcess(settings).start()
    wait_processed(settings, worker, timeout_s=180)
    # when the worker is killed and the group's committed offsets are lost (as if no commit had succeeded),
    worker.kill9()
    time.sleep(SESSION_TIMEOUT_S + 2)  # until the dead member leaves the group, which then accepts a plain commit
    asyncio.run(commit_offsets(settings, 0))
    worker.start()
    # then the restart reads all 5,000 again (more than the 1,000-id dedup window) and applies none of them twice.
    run_to_the_end(settings, worker, projector)
    audit(settings, users, events, dimensions={"session_spend", "model_tokens", "period_spend"})


async def commit_offsets(settings: Settings, offset: int) -> None:
    usage = Topics.for_namespace(settings.namespace).usage
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=processor_group(settings),
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(usage, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.commit({tp: offset for tp in tps})
    finally:
        await consumer.stop()


def test_a_paused_worker_that_comes_back_after_its_partitions_moved_corrupts_nothing(settings, worker_factory):
    # Given two workers sharing the log,
    users, events = published_workload(settings, 1000, 100_000)
    zombie = worker_factory(settings, "0").start()
    other = worker_factory(settings, "1").start()
    projector = ProjectorProcess(settings).start()

    def healthy() -> None:
        assert other.alive(), other.log_tail()

    try:
        # when one is paused mid-batch past its session timeout, so that the other takes its partitions over,
        wait_for_entries(settings, 0.2 * len(events), healthy)
        zombie.pause()
        time.sleep(SESSION_TIMEOUT_S + 5)
        wait_for_entries(settings, 0.5 * len(events), healthy)
        # and then resumes with its batch in hand (its late writes reach the broker),
        zombie.resume()
        wait_processed(settings, other, timeout_s=300)
        projector.wait_caught_up()
    finally:
        zombie.resume()
        projector.stop()
    # then the state and outputs equal the oracle,
    audit(settings, users, events)
    # and a worker restoring the table from the changelog alone still agrees (the audit reads it the same way).
    zombie.kill9()
    other.kill9()


@pytest.fixture
def private_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A broker of this test's own (the suite's broker is shared), on free ports, with the jars already fetched."""
    shared = LocalBroker(Path(os.environ.get("LEDGER_HOME", ROOT / ".ledger")) / "kafka")
    broker = LocalBroker(tmp_path / "kafka", port=free_port(), controller_port=free_port())
    broker.home.mkdir(parents=True)
    if shared.lib_dir.exists() and not broker.lib_dir.exists():
        shutil.copytree(shared.lib_dir, broker.lib_dir)
    broker.start()
    yield broker
    broker.stop()


def test_kill_9_of_the_broker_while_a_worker_processes_loses_nothing(private_broker, tmp_path, worker_factory):
    settings = new_settings(private_broker.bootstrap, tmp_path / "home")
    settings.home.mkdir(parents=True)
    asyncio.run(ensure_topics(settings))
    users, events = published_workload(settings, 500, 50_000)
    worker = worker_factory(settings).start()
    projector = ProjectorProcess(settings).start()
    restarts = 0

    def healthy() -> None:
        assert worker.alive(), f"the worker died before the broker did:\n{worker.log_tail()}"

    try:
        wait_for_entries(settings, 0.3 * len(events), healthy)
        # When the broker is killed with -9 mid-run and comes back a few seconds later,
        pid = private_broker.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        time.sleep(3)
        private_broker.start()
        # then the worker and projector carry on, or exit and are restarted (a supervisor's job),
        deadline = time.monotonic() + 300
        while True:
            if not worker.alive():
                restarts += 1
                worker.start()
            if projector.proc is not None and projector.proc.poll() is not None:
                projector.start()
            try:
                wait_processed(settings, worker, timeout_s=5)
                break
            except AssertionError:
                assert time.monotonic() < deadline, worker.log_tail()
        projector.wait_caught_up()
    finally:
        projector.stop()
    print(f"\nbroker kill: the worker was restarted {restarts} time(s)")
    audit(settings, users, events)
