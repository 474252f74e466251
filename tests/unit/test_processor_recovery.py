"""The processor applied again after a crash at any point of its state writes: same state, no new facts.

The worker sends a batch's outputs, then its state in ``Batch.state_in_write_order``,
then its position, in one transaction per partition; a restore reads committed
state only, so it finds all of a partition's writes or none. The order is kept so
that even a prefix would be safe: re-reading from the stored position must give the state of a run that
never crashed, and every output it emits again must be one already emitted, byte
for byte. Here the changelog is a dict and the log a list, so every prefix is tried.
"""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from ledger.account import Account, clone, decide
from ledger.events import ClockTicked, LedgerEntry, Rejection, user_key
from streams.codecs import encode, table_form
from streams.pending import PendingState
from streams.processor import (
    ALREADY_APPLIED,
    DEAD_LETTER_PAYLOAD_CHARS_MAX,
    RECORD_BYTES_MAX,
    Batch,
    Record,
    UsageProcessor,
    merged,
)
from streams.publisher import CLOCK_KEY, PLANS_KEY
from streams.state import Position, position_key
from streams.topics import Topics
from tests.factories import T0, assigned, published, seed_plans, usage

TOPICS = Topics.for_namespace("t")
P = 3  # the partition every record here is in


def log_of(commands: list) -> list[Record]:  # type: ignore[type-arg]
    records = []
    for offset, c in enumerate(commands):
        if isinstance(c, ClockTicked):
            key = CLOCK_KEY
        elif hasattr(c, "user"):
            key = user_key(c.tenant, c.user).encode()
        else:
            key = PLANS_KEY
        records.append(Record(TOPICS.usage, P, offset, key, encode(c)))
    return records


def workload() -> list[Record]:
    plans = seed_plans()
    free, pro = plans["free"], plans["pro"]
    newer_free = msgspec.structs.replace(free, version=2, max_spend_per_session=free.max_spend_per_session)
    commands = [published(free), published(pro), assigned("ann", free), assigned("bob", pro)]
    commands += [usage("ann", n, input_tokens=1500, output_tokens=1500) for n in range(2)]
    commands += [published(newer_free), usage("bob", 0, model="gpt-4o", input_tokens=30_000, output_tokens=30_000)]
    commands += [usage("ann", n, input_tokens=1500, output_tokens=1500, session=f"s{n}") for n in range(2, 5)]
    commands += [ClockTicked(event_id="tick-1", occurred_at=T0 + timedelta(days=40))]
    commands += [usage("ann", 9, at=T0 + timedelta(days=40, minutes=1)), usage("ann", 9)]  # a late retry: duplicate
    return log_of(commands)


class Changelog:
    """The table as a restore sees it: the last value written per key."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}

    def processor(self) -> UsageProcessor:
        return UsageProcessor(TOPICS, self.values.get,
                              lambda prefix: [(k, v) for k, v in self.values.items() if k.startswith(prefix)],
                              partitions=8)

    def store(self, writes: list[tuple[str, object]]) -> None:
        for key, value in writes:
            if value is None:  # a tombstone
                self.values.pop(key, None)
            else:
                self.values[key] = value

    def position(self) -> int:
        stored = self.values.get(position_key(P))
        return stored.next_offset if isinstance(stored, Position) else 0

    def encoded(self) -> dict[str, bytes]:
        return {k: encode(v) for k, v in sorted(self.values.items())}


def run_in_batches(log: list[Record], changelog: Changelog, size: int) -> list[bytes]:
    outputs = []
    start = changelog.position()
    for i in range(start, len(log), size):
        batch = changelog.processor().run(log[i:i + size])
        outputs += [value for _topic, _key, value in batch.outputs]
        changelog.store(batch.state_in_write_order())
    return outputs


@pytest.mark.parametrize("size", [4, 7, 100])
def test_a_crash_after_any_prefix_of_a_batchs_state_writes_changes_nothing_on_re_reading(size: int) -> None:
    log = workload()
    clean = Changelog()
    clean_outputs = run_in_batches(log, clean, size)

    for batch_start in range(0, len(log), size):
        before = Changelog()
        run_in_batches(log[:batch_start], before, size)
        batch = before.processor().run(log[batch_start:batch_start + size])
        writes = batch.state_in_write_order()
        for kept in range(len(writes)):  # the crash leaves writes[:kept] in the changelog, not the position
            crashed = Changelog()
            crashed.values = dict(before.values)
            crashed.store(writes[:kept])
            assert crashed.position() == before.position()
            again = run_in_batches(log, crashed, size)
            assert crashed.encoded() == clean.encoded(), (batch_start, kept)
            assert set(again) <= set(clean_outputs), (batch_start, kept)


@pytest.mark.parametrize(("size", "group"), [(1, 5), (3, 4), (4, 100)])
def test_batches_folded_ahead_and_stored_together_store_what_storing_each_stores(size: int, group: int) -> None:
    """The worker folds batches over the state still being written (PendingState) and stores the batches
    queued meanwhile in one transaction per partition (``merged``): the same state, outputs and position as
    storing every batch before folding the next."""
    log = workload()
    clean = Changelog()
    clean_outputs = run_in_batches(log, clean, size)

    grouped = Changelog()
    pending = PendingState(lambda: grouped.values)
    processor = UsageProcessor(TOPICS, pending.get, pending.scan, partitions=8)
    outputs: list[bytes] = []
    queued: list[tuple[int, Batch]] = []
    stored_groups = 0
    for number, start in enumerate(range(0, len(log), size)):
        batch = processor.run(log[start:start + size])
        pending.stage(number, ((key, value, batch.encoded[key]) for key, value in batch.writes.items()))
        outputs += [value for _topic, _key, value in batch.outputs]
        queued.append((number, batch))
        if len(queued) == group or start + size >= len(log):
            state = merged([b for _n, b in queued])
            grouped.store([(k, table_form(v, state.encoded[k])) for k, v in state.writes.items()])  # None: tombstone
            for n, b in queued:
                pending.settle(n, b.writes)
            queued, stored_groups = [], stored_groups + 1
    assert stored_groups < len(range(0, len(log), size))  # batches were stored together
    assert len(pending) == 0
    assert grouped.position() == clean.position() == len(log)
    assert outputs == clean_outputs
    assert {k: encode(v) if not isinstance(v, bytes) else v for k, v in sorted(grouped.values.items())} == \
        {k: encode(v) for k, v in sorted(clean.values.items())}


def test_records_read_again_below_a_values_stamp_are_recognised_by_offset_however_many() -> None:
    log = workload()
    changelog = Changelog()
    run_in_batches(log, changelog, 5)
    again = changelog.processor().run(log)  # everything re-read from offset 0 (commits lost)
    assert again.outputs == []
    assert again.results[ALREADY_APPLIED] == sum(1 for r in log if r.key not in (CLOCK_KEY,))
    assert all(not isinstance(v, Account) for v in again.writes.values())


def test_the_fold_of_a_batch_never_changes_the_stored_accounts() -> None:
    log = workload()
    changelog = Changelog()
    run_in_batches(log[:6], changelog, 100)
    before = changelog.encoded()
    changelog.processor().run(log[6:])  # not stored
    assert changelog.encoded() == before


def test_clone_shares_nothing_the_fold_changes() -> None:
    plans = seed_plans()
    history = {p.plan_id: decide(None, published(p), lambda t, i: None).plan_history for p in plans.values()}
    account = decide(None, assigned("ann", plans["free"]), lambda t, i: history[i]).account
    for n in range(3):
        account = decide(account, usage("ann", n, input_tokens=3000), lambda t, i: history[i]).account
    frozen = encode(account)
    copy = clone(account)
    decide(copy, usage("ann", 7, input_tokens=9000, session="s2"), lambda t, i: history[i])
    decide(copy, ClockTicked(event_id="t", occurred_at=T0 + timedelta(days=45)), lambda t, i: history[i])
    assert encode(account) == frozen
    assert encode(copy) != frozen


def test_a_plan_that_would_be_stored_past_the_record_limit_is_dead_lettered_alone() -> None:
    plans = seed_plans()
    free = plans["free"]
    huge = msgspec.structs.replace(free, version=2, cost_rates={
        f"model-{i:06d}-{'x' * 100}": free.cost_rates["gpt-4o-mini"] for i in range(RECORD_BYTES_MAX // 150)})
    log = log_of([published(free), assigned("ann", free), published(huge), usage("ann", 0)])
    changelog = Changelog()
    batch = changelog.processor().run(log)
    assert batch.dead_letters == {"too_large": 1}
    assert batch.results["ok"] == 3
    assert all(len(encode(v)) <= RECORD_BYTES_MAX for _k, v in batch.state_in_write_order())


def test_a_dead_letter_quotes_at_most_its_bound_of_a_huge_record() -> None:
    raw = b'{"type": "usage", "junk": "' + b"x" * 2_000_000 + b'"}'
    batch = Changelog().processor().run([Record(TOPICS.usage, P, 0, b"k", raw)])
    [(_topic, _key, value)] = batch.outputs
    assert len(value) < DEAD_LETTER_PAYLOAD_CHARS_MAX + 4096
    assert b"payload truncated" in value


def test_a_command_that_makes_the_core_raise_is_dead_lettered_alone_on_its_first_attempt(monkeypatch) -> None:
    """A poison pill (a bug the command triggers in the core) costs one attempt: it is dead-lettered as
    internal_error, its neighbours are applied, and the batch is stored, so nothing retries it forever."""
    from streams.processor import decide as core

    def failing_on_ann_1(account, command, *args):  # type: ignore[no-untyped-def]
        if getattr(command, "event_id", None) == "ann-1":
            raise ZeroDivisionError("a bug the command triggers")
        return core(account, command, *args)

    monkeypatch.setattr("streams.processor.decide", failing_on_ann_1)
    free = seed_plans()["free"]
    log = log_of([published(free), assigned("ann", free)] + [usage("ann", n) for n in range(3)])
    batch = Changelog().processor().run(log)

    assert batch.dead_letters == {"internal_error": 1}
    assert batch.results == {"ok": 4, "rejected": 1}
    [rejection] = [msgspec.json.decode(v, type=Rejection) for t, _k, v in batch.outputs if t == TOPICS.rejected]
    assert (rejection.event_id, rejection.code, rejection.source_offset) == ("ann-1", "internal_error", 3)
    entries = [msgspec.json.decode(v, type=LedgerEntry) for t, _k, v in batch.outputs if t == TOPICS.entries]
    assert [e.event_id for e in entries] == ["ann-0", "ann-2"]
    assert batch.next_offsets == {P: len(log)}  # the position moves past it: it is not read again
