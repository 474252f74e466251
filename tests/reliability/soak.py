"""`make soak`: the crash-exact issue's repro and the fault matrix, looped, with a tally of what went wrong.

Each run does:

- the repro: 100,000 usage events over 2,000 users (the pipeline benchmark's
  workload) in a fresh namespace, one worker with ticks off, kill -9 after 9 s,
  a restart, then an audit of every event's entry, each account's spend and
  the group's committed lag;
- the crash test (ten kill -9 at points seeded anew per run) and every test of
  the fault matrix (`tests/reliability/test_faults.py`, `test_rebalance.py`).

It prints, per scenario, how many runs lost or double-counted anything (the
audit failed) and how many failed otherwise. Asserts nothing; exits 1 if any run
was not clean.

    python -m tests.reliability.soak [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import msgspec

from ledger.account import Account
from ledger.events import LedgerEntry
from streams.progress import processor_lag
from streams.topics import changelog_topic, ensure_topics
from tests.benchmarks.pipeline import workload
from tests.conftest import ROOT, WorkerProcess, delete_namespaces, new_settings
from tests.kafka_io import publish, read_all, read_partitions
from tests.reliability.audit import stored_accounts

REPRO_USERS, REPRO_EVENTS = 2000, 100_000
REPRO_KILL_AFTER_S, REPRO_WAIT_S = 9, 300  # the issue waited 45 s; a loaded machine needs longer to finish
PYTEST_SCENARIOS = ("tests/reliability/test_crash.py", "tests/reliability/test_faults.py",
                    "tests/reliability/test_rebalance.py")


def repro(bootstrap: str, home: Path) -> tuple[int, int, int]:
    """(events without an entry, accounts whose spend is off, committed lag) after one kill -9 and a restart.

    Counted once the committed lag is 0 (or after REPRO_WAIT_S): a record still unprocessed is not lost.
    """
    settings = new_settings(bootstrap, home)
    asyncio.run(ensure_topics(settings))
    try:
        setup, events = workload(REPRO_USERS, REPRO_EVENTS)
        publish(settings, setup)
        publish(settings, events, envelopes=False)  # the repro: one event per record
        worker = WorkerProcess(settings, env={"LEDGER_TICK_SECONDS": "0"}).start()
        time.sleep(REPRO_KILL_AFTER_S)
        worker.kill9()
        worker.start()
        deadline = time.monotonic() + REPRO_WAIT_S
        while time.monotonic() < deadline and asyncio.run(processor_lag(settings)) > 0:
            time.sleep(1)
        lag = asyncio.run(processor_lag(settings))
        worker.stop()
        entries = {msgspec.json.decode(raw, type=LedgerEntry) for raw in read_all(settings, f"{settings.namespace}.entries")}
        by_id = {e.event_id: e for e in entries}
        lost = sum(1 for e in events if e.event_id not in by_id)
        expected: dict[str, Decimal] = defaultdict(Decimal)
        for e in events:
            if e.event_id in by_id:
                expected[e.user] += by_id[e.event_id].cost
        accounts: dict[str, Account] = {}
        for records in read_partitions(settings, changelog_topic(settings.namespace)).values():
            for account in stored_accounts(records):
                accounts[account.user] = account
        off = sum(1 for u, spend in expected.items() if u not in accounts or accounts[u].period_spend != spend)
        return lost, off, lag
    finally:
        delete_namespaces(bootstrap, {settings.namespace})


def pytest_run(path: str, seed: int) -> dict[str, str]:
    """test id -> passed, audit (lost or double-counted) or failed."""
    report = Path(tempfile.mkdtemp()) / "report.txt"
    env = {**os.environ, "LEDGER_CRASH_SEED": str(seed)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", path],  # -rA: a line per test
                          cwd=ROOT, env=env, capture_output=True, text=True)
    report.write_text(proc.stdout + proc.stderr)
    outcomes: dict[str, str] = {}
    sections = re.split(r"^_{3,} (\S+) _{3,}$", proc.stdout, flags=re.MULTILINE)
    failures = dict(zip(sections[1::2], sections[2::2], strict=True))  # test name -> its traceback
    for line in proc.stdout.splitlines():
        # -rA's summary lines; a captured log line ("ERROR    aiokafka:...") is not one.
        summary = re.match(r"(PASSED|FAILED|ERROR) (tests/\S+)", line)
        if summary:
            word, test = summary.groups()
            # Lost or double-counted, not a timeout waiting for progress.
            audit_failed = word == "FAILED" and "AuditFailed" in failures.get(test.split("::")[-1], "")
            outcomes[test] = "passed" if word == "PASSED" else ("audit" if audit_failed else "failed")
    if not outcomes:
        outcomes[path] = "failed"
    if any(v != "passed" for v in outcomes.values()):
        print(f"    details: {report}")
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("SOAK_RUNS", "10")))
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    tally: dict[str, Counter[str]] = defaultdict(Counter)
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory() as home:
            lost, off, lag = repro(bootstrap, Path(home))
        clean = lost == 0 and off == 0 and lag == 0
        tally["repro (kill -9 after 9 s)"]["passed" if clean else ("audit" if lost or off else "failed")] += 1
        print(f"run {run}: repro lost {lost} event(s), {off} account(s) off, committed lag {lag}")
        for path in PYTEST_SCENARIOS:
            for test, outcome in pytest_run(path, seed=2026 + run).items():
                tally[test][outcome] += 1
                print(f"run {run}: {test}: {outcome}")
    print(f"\nsoak: {args.runs} run(s)")
    print(f"{'scenario':<100} {'clean':>6} {'lost or double-counted':>23} {'other failure':>14}")
    for name, counts in tally.items():
        print(f"{name:<100} {counts['passed']:>6} {counts['audit']:>23} {counts['failed']:>14}")
    sys.exit(0 if all(set(c) == {"passed"} for c in tally.values()) else 1)


if __name__ == "__main__":
    main()
