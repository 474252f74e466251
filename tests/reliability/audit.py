"""The seeded workload of the reliability tests and the audit of what the ledger made of it.

The audit compares the account table (the last changelog value of every key, as a
restore would see it), the entries and gate topics, and the DuckDB history with
an independent Fraction oracle: nothing lost, nothing double-counted.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import msgspec

from ledger.account import Account
from ledger.events import AnyCommand, GateEvent, LedgerEntry, UsageRecorded
from ledger.settings import Settings
from projections.projector import connect
from streams.codecs import decode_state, is_account
from streams.progress import end_offsets, processor_lag
from streams.topics import Topics, changelog_topic
from tests.factories import T0, assigned, published, seed_plans, usage
from tests.kafka_io import read_all, read_partitions
from tests.oracle import UserOracle

HEAVY_EVERY = 50  # every 50th user is a pro user running up the $5 session cap
PROGRESS_POLL_S = 0.2
# A processor that adds no entry for this long while entries are due has stalled (a restart and its recovery
# take about 15 s here).
STALL_S = 60.0
ENTRIES_WAIT_S_MAX = 900.0


def workload(users: int, events: int, seconds_between: float = 1.0, seed: int = 2026
             ) -> tuple[dict[str, str], list[AnyCommand], list[UsageRecorded]]:
    """Half the users on free, half on pro; one event every ``seconds_between`` overall, round robin over users.

    Each user's events are ``users * seconds_between`` apart: keep that under the plans'
    30-minute session timeout so the oracle's one-session, one-period model holds.
    """
    assert users * seconds_between < 30 * 60, "users' events would fall into several sessions"
    rng = random.Random(seed)
    plans = seed_plans()
    names = {f"user{i:04d}": ("free" if i % 2 else "pro") for i in range(users)}
    heavy = {u for i, u in enumerate(names) if i % HEAVY_EVERY == 0}
    calls = []
    for n in range(events):
        user = f"user{n % users:04d}"
        if names[user] == "free":
            model, i, o = "gpt-4o-mini", rng.randint(0, 200), rng.randint(0, 200)
        elif user in heavy:
            model, i, o = "gpt-4o", 20_000, 10_000
        else:
            model, i, o = rng.choice(["gpt-4o-mini", "gpt-4o"]), rng.randint(0, 1500), rng.randint(0, 1500)
        calls.append(usage(user, n, model=model, input_tokens=i, output_tokens=o,
                           at=T0 + timedelta(seconds=n * seconds_between)))
    setup: list[AnyCommand] = [published(p) for p in plans.values()]
    setup += [assigned(u, plans[p]) for u, p in names.items()]
    return names, setup, calls


def produced(settings: Settings, topic: str) -> int:
    return sum(asyncio.run(end_offsets(settings, (topic,))).values())


def wait_for_entries(settings: Settings, count: float, healthy: Callable[[], None], stall_s: float = STALL_S,
                     timeout_s: float = ENTRIES_WAIT_S_MAX) -> None:
    """Wait until the entries topic holds ``count`` records, calling ``healthy()`` (which raises) meanwhile.

    Fails when no entry has been added for ``stall_s`` (a stalled processor: what these waits are for), or after
    ``timeout_s`` in all. A fixed budget for the whole wait failed a healthy but slow run: in `make test`, the
    broker holds the suite's ~7,000 partitions by the time the reliability tests run, and the rebalance test's
    two workers applied single-command records at about 60% of their rate on a fresh broker.
    """
    entries = Topics.for_namespace(settings.namespace).entries
    started = last_change = time.monotonic()
    last = -1
    while (n := produced(settings, entries)) < count:
        healthy()
        now = time.monotonic()
        if n != last:
            last, last_change = n, now
        assert now - last_change < stall_s, f"no new entry for {stall_s:.0f} s, at {n:,} of {count:,.0f}"
        assert now - started < timeout_s, f"{count:,.0f} entries not reached in {timeout_s:.0f} s (at {n:,})"
        time.sleep(PROGRESS_POLL_S)


def stored_accounts(records: list[tuple[bytes | None, bytes | None]]) -> Iterator[Account]:
    """The accounts among a changelog partition's records, in order (beside them: ids, plans, positions, tombstones)."""
    for _key, value in records:
        if value is not None and is_account(value):
            account = decode_state(value)
            assert isinstance(account, Account)
            yield account


class AuditFailed(AssertionError):
    """The audit found a difference from the oracle (`make soak` counts these apart from other failures)."""


def audit(settings: Settings, users: dict[str, str], events: list[UsageRecorded],
          dimensions: set[str] | None = None) -> dict[str, Any]:
    """Assert that table, topics and history equal the oracle; return how many outputs were repeated.

    ``dimensions``: the gate dimensions the workload must have crossed (default: the standard workload's).
    """
    try:
        return _audit(settings, users, events, dimensions)
    except AssertionError as exc:
        raise AuditFailed(f"the audit found a difference from the oracle: {exc}") from exc


def _audit(settings: Settings, users: dict[str, str], events: list[UsageRecorded],
           dimensions: set[str] | None) -> dict[str, Any]:
    # Committed offsets are the bound of what a restart reads again: once everything is processed, none.
    assert asyncio.run(processor_lag(settings)) == 0, "the group's committed offsets trail the log"
    topics = Topics.for_namespace(settings.namespace)
    oracle = {u: UserOracle(plan) for u, plan in users.items()}
    for e in events:
        oracle[e.user].apply(e.event_id, e.model, e.input_tokens, e.output_tokens)

    changelog = changelog_topic(settings.namespace)
    accounts: dict[str, Account] = {}
    stamps: dict[str, list[int]] = defaultdict(list)  # each user's applied_to, in changelog order
    for records in read_partitions(settings, changelog).values():
        for account in stored_accounts(records):
            accounts[account.user] = account
            stamps[account.user].append(account.applied_to)
    off = {u: (a.period_spend, oracle[u].spend_decimal) for u, a in accounts.items()
           if u in oracle and a.period_spend != oracle[u].spend_decimal}
    # A value written after a newer one of the same key (a stamp going down) is a late write from a stale owner.
    stale = {u: s[-5:] for u, s in stamps.items() if any(b < a for a, b in zip(s, s[1:], strict=False))}
    assert not off and accounts.keys() == oracle.keys(), (
        f"{len(off)} account(s) off (stored, expected): {dict(list(off.items())[:5])}; "
        f"missing {sorted(oracle.keys() - accounts.keys())[:5]}; stale writes (last stamps): {dict(list(stale.items())[:5])}")
    assert {u: dict(a.period_tokens) for u, a in accounts.items()} == {u: dict(o.tokens) for u, o in oracle.items()}

    # Entries: every event present; any repeat is the same bytes (same deterministic content).
    raw_entries = read_all(settings, topics.entries)
    by_id: dict[str, set[bytes]] = defaultdict(set)
    for raw in raw_entries:
        by_id[msgspec.json.decode(raw, type=LedgerEntry).event_id].add(raw)
    assert len(by_id) == len(events) and all(len(v) == 1 for v in by_id.values())

    # Gates: exactly the oracle's crossings; repeats only under the same id with the same content.
    raw_gates = read_all(settings, topics.gates)
    gates_by_id: dict[str, set[bytes]] = defaultdict(set)
    for raw in raw_gates:
        gates_by_id[msgspec.json.decode(raw, type=GateEvent).gate_id].add(raw)
    assert all(len(v) == 1 for v in gates_by_id.values())
    distinct = [msgspec.json.decode(next(iter(v)), type=GateEvent) for v in gates_by_id.values()]
    assert sorted((g.user, g.kind, g.dimension, g.model, g.cause_event_id) for g in distinct) == sorted(
        (u, kind, dim, model, cause) for u, o in oracle.items() for (kind, dim, model), cause in o.crossings.items())
    assert {g.dimension for g in distinct} == (dimensions or {"model_tokens", "session_spend"})

    with connect(settings.history_path, read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT event_id) FROM ledger_entries").fetchone() == (
            len(events), len(events))
        spend = dict(con.execute("SELECT user_id, sum(cost) FROM ledger_entries GROUP BY user_id").fetchall())
        assert spend == {u: o.spend_decimal for u, o in oracle.items()}
        assert con.execute("SELECT count(*) FROM gate_events").fetchone()[0] == len(distinct)
    return {"entries_repeated": len(raw_entries) - len(events), "gates_repeated": len(raw_gates) - len(distinct),
            "gates": len(distinct)}
