"""The slice end to end on the real broker: usage in, priced entries, gates and dead letters out, DuckDB history."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from decimal import Decimal

import pytest

from ledger.settings import Settings
from projections.projector import Projector, connect
from tests.conftest import outputs, replay_from_offset_0, wait_processed
from tests.factories import T0, assigned, published, seed_plans, usage
from tests.kafka_io import entries, gates, publish, publish_raw, rejections

pytestmark = pytest.mark.integration


def project(settings: Settings) -> Projector:
    projector = Projector(settings)
    asyncio.run(projector.run(until_caught_up=True))
    return projector


def setup_users(settings: Settings, users: dict[str, str]) -> None:
    plans = seed_plans()
    publish(settings, [published(p) for p in plans.values()] + [assigned(u, plans[p]) for u, p in users.items()])


def test_free_user_gets_one_soft_warning_at_8000_tokens_and_one_hard_block_at_10000(settings, worker):
    setup_users(settings, {"ana": "free"})
    publish(settings, [usage("ana", n) for n in range(1, 9)])
    wait_processed(settings, worker)

    priced = sorted(entries(settings), key=lambda e: e.seq)
    assert [e.cost for e in priced] == [Decimal("0.00075")] * 8
    assert [e.period_model_tokens for e in priced] == [2000 * n for n in range(1, 9)]
    raised = [(g.kind, g.used, g.limit, g.cause_event_id) for g in gates(settings)]
    assert sorted(raised) == [("hard_block", Decimal(10000), Decimal(10000), "ana-5"),
                              ("soft_warning", Decimal(8000), Decimal(10000), "ana-4")]

    project(settings)
    with connect(settings.history_path, read_only=True) as con:
        assert con.execute("SELECT sum(cost), count(*) FROM ledger_entries").fetchone() == (Decimal("0.006"), 8)
        assert con.execute("SELECT kind, used FROM gate_events ORDER BY used").fetchall() == [
            ("soft_warning", Decimal(8000)), ("hard_block", Decimal(10000))]


def test_bad_input_lands_in_the_dead_letter_topic_and_the_stream_moves_on(settings, worker):
    setup_users(settings, {"bo": "free"})
    good = usage("bo", 99)
    publish_raw(settings, [
        (b"acme/bo", b"\xff\xfe not json at all"),
        (b"acme/bo", b'{"type": "usage", "event_id": "m1", "tenant": "acme", "user": "bo"}'),
        (b"acme/bo", b'{"type": "usage", "event_id": "n1", "tenant": "acme", "user": "bo", "model": "gpt-4o-mini",'
                     b' "input_tokens": -5, "output_tokens": 1, "occurred_at": "2026-11-02T00:00:00Z"}'),
        (b"acme/bo", b'{"type": "usage", "event_id": "t1", "tenant": "acme", "user": "bo", "model": "gpt-4o-mini",'
                     b' "input_tokens": 5, "output_tokens": 1, "occurred_at": "2026-11-02T00:00:00"}'),
    ])
    publish(settings, [usage("bo", 1, model="gpt-9-unknown"), usage("nobody", 1), good])
    wait_processed(settings, worker)

    by_reason = sorted((r.code, r.reason) for r in rejections(settings))
    codes = [code for code, _ in by_reason]
    assert codes == ["invalid_event"] * 4 + ["model_not_allowed", "no_plan"]
    reasons = " | ".join(reason for _, reason in by_reason)
    for fragment in ("malformed", "missing required field `model`", "`$.input_tokens`", "`$.occurred_at`",
                     "'gpt-9-unknown' is not allowed on plan 'free'", "user nobody has no plan"):
        assert fragment in reasons
    binary = next(r for r in rejections(settings) if r.payload_encoding == "base64")
    assert binary.source_partition >= 0 and binary.key == "acme/bo"
    assert [e.event_id for e in entries(settings)] == [good.event_id]


def test_republishing_ten_percent_of_events_with_the_same_ids_changes_no_total(settings, worker):
    users = {f"u{i}": ("free" if i % 2 else "pro") for i in range(20)}
    setup_users(settings, users)
    rng = random.Random(7)
    events = [usage(u, n, input_tokens=rng.randint(0, 900), output_tokens=rng.randint(0, 900),
                    at=T0 + timedelta(seconds=n)) for n in range(30) for u in users]
    publish(settings, events)
    publish(settings, rng.sample(events, len(events) // 10))
    wait_processed(settings, worker)

    assert sorted(e.event_id for e in entries(settings)) == sorted(e.event_id for e in events)
    project(settings)
    from ledger.pricing import price
    plans = seed_plans()
    expected = sum(price(plans[users[e.user]], e.model, e.input_tokens, e.output_tokens, {}) for e in events)
    with connect(settings.history_path, read_only=True) as con:
        assert con.execute("SELECT sum(cost), count(*) FROM ledger_entries").fetchone() == (expected, len(events))


def test_a_fresh_worker_and_fresh_duckdb_replaying_the_log_reproduce_every_output(settings, worker_factory, tmp_path):
    users = {f"r{i}": ("free" if i % 3 else "pro") for i in range(30)}
    setup_users(settings, users)
    rng = random.Random(11)
    publish(settings, [usage(u, n, model=rng.choice(["gpt-4o-mini", "gpt-4o"]) if users[u] == "pro" else "gpt-4o-mini",
                             input_tokens=rng.randint(0, 3000), output_tokens=rng.randint(0, 3000),
                             at=T0 + timedelta(minutes=n)) for n in range(40) for u in users])
    first = worker_factory(settings).start()
    wait_processed(settings, first)
    first.stop()

    replay = replay_from_offset_0(settings, tmp_path / "replay", worker_factory)
    for name in ("entries", "gates", "rejected"):
        assert outputs(settings, name) == outputs(replay, name), name
    assert len(gates(settings)) > 10

    project(settings), project(replay)
    query = "SELECT * FROM {} ORDER BY ALL"
    with connect(settings.history_path, read_only=True) as a, connect(replay.history_path, read_only=True) as b:
        for table in ("ledger_entries", "gate_events"):
            assert a.execute(query.format(table)).fetchall() == b.execute(query.format(table)).fetchall()
