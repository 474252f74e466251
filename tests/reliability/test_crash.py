"""kill -9 the worker (three times) and the projector while they work: nothing lost, nothing double-counted."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import timedelta

import msgspec
import pytest

from ledger.account import Account
from ledger.events import GateEvent, LedgerEntry
from projections.projector import connect
from streams.progress import end_offsets, projector_lag
from streams.topics import Topics
from tests.conftest import ROOT, wait_processed
from tests.factories import T0, assigned, published, seed_plans, usage
from tests.kafka_io import publish, read_all
from tests.oracle import UserOracle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = 1000
EVENTS = 100_000
KILLS_AT = (0.15, 0.4, 0.65)  # fractions of the entries produced when the worker is killed


def workload(seed: int = 2026):
    rng = random.Random(seed)
    plans = seed_plans()
    users = {f"user{i:04d}": ("free" if i % 2 else "pro") for i in range(USERS)}
    heavy = {u for i, u in enumerate(users) if i % 50 == 0}  # pro users running up their $5 session cap
    events = []
    for n in range(EVENTS):
        user = f"user{n % USERS:04d}"
        if users[user] == "free":
            model, i, o = "gpt-4o-mini", rng.randint(0, 200), rng.randint(0, 200)
        elif user in heavy:
            model, i, o = "gpt-4o", 20_000, 10_000
        else:
            model, i, o = rng.choice(["gpt-4o-mini", "gpt-4o"]), rng.randint(0, 1500), rng.randint(0, 1500)
        # One event per second overall: each user's gaps are 1,000 s, inside one session and one period.
        events.append(usage(user, n, model=model, input_tokens=i, output_tokens=o, at=T0 + timedelta(seconds=n)))
    setup = [published(p) for p in plans.values()] + [assigned(u, plans[p]) for u, p in users.items()]
    return users, setup, events


def produced(settings, topic: str) -> int:
    return sum(asyncio.run(end_offsets(settings, (topic,))).values())


def test_kill_9_during_processing_loses_nothing_and_double_counts_nothing(settings, worker_factory):
    users, setup, events = workload()
    publish(settings, setup)
    publish(settings, events)
    topics = Topics.for_namespace(settings.namespace)

    worker = worker_factory(settings).start()
    env = {**os.environ, "LEDGER_HOME": str(settings.home), "LEDGER_NAMESPACE": settings.namespace,
           "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap}
    projector_log = open(settings.home / "projector.log", "ab")

    def start_projector() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "ledger.cli.main", "projector"], env=env, cwd=ROOT,
                                stdout=projector_log, stderr=subprocess.STDOUT)

    projector = start_projector()
    kills = 0
    for fraction in KILLS_AT:
        deadline = time.monotonic() + 180
        while produced(settings, topics.entries) < fraction * EVENTS:
            assert worker.alive(), worker.log_tail()
            assert time.monotonic() < deadline, f"no progress to {fraction:.0%}\n{worker.log_tail()}"
            time.sleep(0.2)
        worker.kill9()
        kills += 1
        if kills == 2:
            projector.send_signal(signal.SIGKILL)
            projector.wait()
            projector = start_projector()
        worker.start()
    wait_processed(settings, worker, timeout_s=300)
    deadline = time.monotonic() + 120
    while asyncio.run(projector_lag(settings, settings.history_path)) > 0:
        assert time.monotonic() < deadline and projector.poll() is None
        time.sleep(0.5)
    projector.send_signal(signal.SIGTERM)
    projector.wait(timeout=30)
    assert worker.starts == 4

    oracle = {u: UserOracle(plan) for u, plan in users.items()}
    for e in events:
        oracle[e.user].apply(e.event_id, e.model, e.input_tokens, e.output_tokens)

    # The table: the last changelog value of every key, as a restore would see it.
    changelog = f"{settings.namespace}-processor-accounts-changelog"
    accounts: dict[str, Account] = {}
    from tests.kafka_io import read_partitions
    for records in read_partitions(settings, changelog).values():
        for _key, value in records:
            decoded = msgspec.json.decode(value)
            if decoded.get("type") == "account":
                accounts[decoded["user"]] = msgspec.json.decode(value, type=Account)
    assert {u: a.period_spend for u, a in accounts.items()} == {u: o.spend_decimal for u, o in oracle.items()}
    assert {u: dict(a.period_tokens) for u, a in accounts.items()} == {u: dict(o.tokens) for u, o in oracle.items()}

    # Entries: every event present; any repeat is the same bytes (same deterministic content).
    raw_entries = read_all(settings, topics.entries)
    by_id: dict[str, set[bytes]] = defaultdict(set)
    for raw in raw_entries:
        by_id[msgspec.json.decode(raw, type=LedgerEntry).event_id].add(raw)
    assert len(by_id) == EVENTS and all(len(v) == 1 for v in by_id.values())

    # Gates: exactly the oracle's crossings; repeats only under the same id with the same content.
    raw_gates = read_all(settings, topics.gates)
    gates_by_id: dict[str, set[bytes]] = defaultdict(set)
    for raw in raw_gates:
        gates_by_id[msgspec.json.decode(raw, type=GateEvent).gate_id].add(raw)
    assert all(len(v) == 1 for v in gates_by_id.values())
    distinct = [msgspec.json.decode(next(iter(v)), type=GateEvent) for v in gates_by_id.values()]
    assert sorted((g.user, g.kind, g.dimension, g.model, g.cause_event_id) for g in distinct) == sorted(
        (u, kind, dim, model, cause) for u, o in oracle.items() for (kind, dim, model), cause in o.crossings.items())
    assert {g.dimension for g in distinct} == {"model_tokens", "session_spend"}

    with connect(settings.history_path, read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT event_id) FROM ledger_entries").fetchone() == (EVENTS, EVENTS)
        spend = dict(con.execute("SELECT user_id, sum(cost) FROM ledger_entries GROUP BY user_id").fetchall())
        assert spend == {u: o.spend_decimal for u, o in oracle.items()}
        assert con.execute("SELECT count(*) FROM gate_events").fetchone()[0] == len(distinct)
    print(f"\ncrash test: {len(raw_entries) - EVENTS} entries and {len(raw_gates) - len(distinct)} gate events "
          f"repeated under their ids after {kills} kills")
