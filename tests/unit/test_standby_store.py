"""The worker's table store keeps what a standby has read, so a takeover reads only the changelog's tail."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from faust.types import TP

from ledger.settings import Settings
from streams.app import StandbyMemoryStore, create_app
from streams.topics import ACCOUNTS_TABLE, changelog_topic

CHANGELOG = changelog_topic("ns")


def changelog_record(partition: int, offset: int, key: str, value: str) -> SimpleNamespace:
    return SimpleNamespace(key=key, value=value, message=SimpleNamespace(partition=partition, offset=offset, value=value))


def test_a_standby_partition_survives_recovery_and_resumes_at_its_last_offset(tmp_path: Path) -> None:
    app = create_app(Settings(home=tmp_path, namespace="ns"))
    store = app.tables[ACCOUNTS_TABLE].data
    assert isinstance(store, StandbyMemoryStore)
    assert app.tables[ACCOUNTS_TABLE].changelog_topic.get_topic_name() == CHANGELOG  # the name ensure_topics checks

    # Given this worker owns partition 0 and follows partitions 1 and 2 as a standby,
    store.apply_changelog_batch([changelog_record(1, 0, "1:a:acme/u1", "v0"), changelog_record(1, 7, "1:a:acme/u1", "v7"),
                                 changelog_record(2, 3, "2:a:acme/u2", "w3")], lambda k: k, lambda v: v)
    store["0:a:acme/u0"] = "written by the processor"
    store.written(0, 41)
    # when a rebalance leaves it partition 0 and the standby of 1, and takes 2 away,
    asyncio.run(store.on_recovery_completed({TP(CHANGELOG, 0)}, {TP(CHANGELOG, 1)}))

    # then recovery starts partition 1 after the standby's last record and 0 after its own last write,
    assert store.persisted_offset(TP(CHANGELOG, 1)) == 7
    assert store.persisted_offset(TP(CHANGELOG, 0)) == 41
    assert store["1:a:acme/u1"] == "v7" and store["0:a:acme/u0"] == "written by the processor"
    # and partition 2 is forgotten, so it would be read from the start if it came back.
    assert "2:a:acme/u2" not in store
    assert store.persisted_offset(TP(CHANGELOG, 2)) is None


def test_a_tombstone_in_the_changelog_deletes_its_key_and_no_key_index_is_kept(tmp_path: Path) -> None:
    app = create_app(Settings(home=tmp_path, namespace="ns"))
    store = app.tables[ACCOUNTS_TABLE].data
    key = "1:d:6:acme/ue-1"
    store.apply_changelog_batch([changelog_record(1, 0, key, "[1,\"ab\"]"), changelog_record(1, 1, "1:a:acme/u", "v")],
                                lambda k: k, lambda v: v)
    assert key in store
    store.apply_changelog_batch([changelog_record(1, 2, key, None)], lambda k: k, lambda v: v)  # type: ignore[arg-type]
    assert key not in store and store["1:a:acme/u"] == "v"
    assert store.persisted_offset(TP(CHANGELOG, 1)) == 2
    assert store._key_partition == {}


def test_the_worker_restores_and_follows_the_changelog_read_committed(tmp_path: Path) -> None:
    # A killed worker's open transaction is aborted by the next owner; read uncommitted, a restore applied it
    # anyway, and Kafka's log cleaner later dropped what that restore had built on (docs/crash-safety.md, point 3).
    async def isolation_level() -> str:
        app = create_app(Settings(home=tmp_path, namespace="ns", external_bootstrap="127.0.0.1:1"))
        consumer = app.consumer._thread._create_worker_consumer(app.transport)  # built, never started
        try:
            return consumer._isolation_level
        finally:
            await consumer.stop()

    assert asyncio.run(isolation_level()) == "read_committed"
