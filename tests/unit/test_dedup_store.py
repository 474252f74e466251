"""Remembered command ids live beside the account, one value per id, within a horizon of the account's count.

An account used to carry its last 1,000 ids: 28.7 KB, rewritten to the changelog on
every batch that touched the user. Here the account stays small whatever its
history, dedup still holds across batches and restores, and sweeping ids past the
horizon changes no outcome.
"""

from __future__ import annotations

from datetime import timedelta

from ledger.account import DEDUP_WINDOW_EVENTS_PER_USER, Account, Seen
from streams.codecs import decode_state, encode
from streams.processor import Record
from streams.state import account_key, dedup_key, dedup_owner
from tests.factories import T0, TENANT, assigned, published, seed_plans, usage
from tests.unit.test_processor_recovery import Changelog, P, log_of


def busy_user_log(events: int, user: str = "ann") -> list[Record]:
    plans = seed_plans()
    commands = [published(plans["pro"]), assigned(user, plans["pro"])]
    commands += [usage(user, n, input_tokens=10, output_tokens=10, session=f"s{n // 50}", at=T0 + timedelta(minutes=n))
                 for n in range(events)]
    return log_of(commands)


def run(log: list[Record], changelog: Changelog, size: int) -> list[bytes]:
    outputs = []
    processor = changelog.processor()
    for i in range(changelog.position(), len(log), size):
        batch = processor.run(log[i:i + size])
        outputs += [value for _topic, _key, value in batch.outputs]
        changelog.store(batch.state_in_write_order())
    return outputs


def test_an_account_whose_horizon_is_full_stays_under_a_kilobyte() -> None:
    changelog = Changelog()
    run(busy_user_log(DEDUP_WINDOW_EVENTS_PER_USER + 200), changelog, 100)
    account = changelog.values[account_key(P, TENANT, "ann")]
    assert isinstance(account, Account) and account.remembered == DEDUP_WINDOW_EVENTS_PER_USER + 201
    assert len(encode(account)) <= 1024, len(encode(account))


def test_an_account_past_both_models_hard_limits_with_a_full_horizon_stays_under_a_kilobyte() -> None:
    """The heaviest account the seeds make: every threshold of both models crossed (four crossings, two blocks in
    force) and a full horizon. As an object it took 1,155 bytes (the pipeline benchmark's largest, 1,219)."""
    plans = seed_plans()
    events = DEDUP_WINDOW_EVENTS_PER_USER + 200
    log = log_of([published(plans["pro"]), assigned("ann", plans["pro"])]
                 + [usage("ann", n, model=("gpt-4o", "gpt-4o-mini")[n % 2], input_tokens=400, output_tokens=300,
                          session=f"s{n // 400}", at=T0 + timedelta(minutes=n)) for n in range(events)])
    changelog = Changelog()
    run(log, changelog, 100)
    account = changelog.values[account_key(P, TENANT, "ann")]
    assert isinstance(account, Account) and account.remembered == events + 1
    assert len(account.blocks) == 2 and len(account.crossed) == 4
    assert len(encode(account)) <= 1024, len(encode(account))


def test_a_retry_in_a_later_batch_is_a_duplicate_and_a_changed_payload_a_conflict() -> None:
    log = busy_user_log(10)
    changelog = Changelog()
    run(log, changelog, 4)
    again = changelog.processor().run([Record(r.topic, r.partition, r.offset + len(log), r.key, r.value)
                                       for r in log_of([usage("ann", 3, input_tokens=10, output_tokens=10,
                                                              session="s0", at=T0 + timedelta(minutes=3)),
                                                        usage("ann", 4, input_tokens=11, output_tokens=10,
                                                              session="s0", at=T0 + timedelta(minutes=4))])])
    assert again.results == {"duplicate": 1, "conflict": 1}
    assert {k for k in again.writes if ":d:" in k} == set()


def test_an_id_stored_without_its_account_is_not_seen() -> None:
    """A crash between a batch's ids and its account: the ids are numbered past the account's count."""
    log = busy_user_log(3)
    changelog = Changelog()
    run(log[:4], changelog, 100)  # the plan, the assignment and usage 0, 1
    orphan = dedup_key(P, TENANT, "ann", "ann-2")
    changelog.values[orphan] = Seen(n=4, digest="whatever")  # the account counts 3
    batch = changelog.processor().run(log[4:])
    assert batch.results == {"ok": 1}


def test_sweeping_ids_past_the_horizon_bounds_the_table_and_changes_no_outcome() -> None:
    events = 2 * DEDUP_WINDOW_EVENTS_PER_USER
    log = busy_user_log(events)
    # Retries of ids inside and outside the horizon, after it has moved on.
    retries = log_of([usage("ann", n, input_tokens=10, output_tokens=10, session=f"s{n // 50}",
                            at=T0 + timedelta(minutes=n)) for n in (5, events - 5)])
    log += [Record(r.topic, r.partition, len(log) + i, r.key, r.value) for i, r in enumerate(retries)]

    unswept, swept = Changelog(), Changelog()
    plain = run(log, unswept, 250)
    processor = swept.processor()
    processor.sweep_ids_min = 100
    outputs = []
    for i in range(0, len(log), 250):
        batch = processor.run(log[i:i + 250])
        outputs += [value for _topic, _key, value in batch.outputs]
        swept.store(batch.state_in_write_order())

    assert outputs == plain  # the old retry is applied again in both, the recent one is a duplicate in both
    held = [k for k in swept.values if ":d:" in k]
    assert len(held) <= DEDUP_WINDOW_EVENTS_PER_USER + 250 + processor.sweep_ids_min
    assert len([k for k in unswept.values if ":d:" in k]) == events + 1  # the assignment too; a retry reuses its key
    assert all(dedup_owner(k) == account_key(P, TENANT, "ann") for k in held)


def test_a_user_name_or_event_id_with_colons_keeps_its_owner() -> None:
    key = dedup_key(7, "acme", "a:b/c", "x:1:y")
    assert dedup_owner(key) == account_key(7, "acme", "a:b/c")
    assert decode_state(encode(Seen(n=3, digest="ab"))) == Seen(n=3, digest="ab")
