"""The control-plane store's contract, written once and run against SQLite and a real PostgreSQL.

Every test gets a fresh, empty database through ``store_url`` (tests/conftest.py); the
PostgreSQL server is ``LEDGER_TEST_DATABASE_URL`` or a throwaway one (tests/pg.py).
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from sqlalchemy import String, inspect, text

from ledger.control.keys import ALL_SCOPES, KEY_LENGTH_MAX, Scope, new_key
from ledger.control.store import (
    WEBHOOKS_PER_TENANT_MAX,
    Conflict,
    ControlStore,
    DeliveryState,
    Outbound,
)
from ledger.plans import Plan
from tests.factories import seed_plans

LIVE_PREFIX = "pg_live_"
TOKEN_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")


@pytest.fixture
def store(store_url: str) -> Iterator[ControlStore]:
    s = ControlStore(store_url)
    s.create_schema()
    try:
        yield s
    finally:
        s.dispose()


def new_tenant(store: ControlStore, name: str) -> tuple[str, str]:
    with store.session() as db:
        return db.create_tenant(name)


def plans_of(tenant: str) -> tuple[Plan, Plan]:
    """Two of the plans guide's plans with ids of their own per tenant (version 1)."""
    seeds = seed_plans(tenant)
    return seeds["free"], seeds["pro"]


def next_version(plan: Plan, **changes: object) -> Plan:
    return msgspec.structs.replace(plan, version=plan.version + 1, **changes)


def text_values(store: ControlStore) -> list[tuple[str, str, str]]:
    """(table, column, value) for every non-null value of every text column of every table."""
    found: list[tuple[str, str, str]] = []
    names = inspect(store.engine).get_table_names()
    assert {"tenants", "api_keys", "plans", "plan_versions", "users"} <= set(names)
    with store.engine.connect() as conn:
        for name in names:
            for column in inspect(store.engine).get_columns(name):
                if not isinstance(column["type"], String):  # String covers VARCHAR, TEXT, CHAR
                    continue
                query = text(f'SELECT "{column["name"]}" FROM "{name}"')
                found += [(name, column["name"], v) for (v,) in conn.execute(query) if v is not None]
    return found


# -- tenants and keys -----------------------------------------------------------------------------------------------


def test_create_tenant_gives_a_live_key_with_at_least_256_random_bits(store: ControlStore) -> None:
    tenant_id, key = new_tenant(store, "acme")
    _, other = new_tenant(store, "globex")

    assert tenant_id
    assert key.startswith(LIVE_PREFIX) and len(key) <= KEY_LENGTH_MAX
    body = key.removeprefix(LIVE_PREFIX)
    assert len(body) >= 43 and TOKEN_ALPHABET.fullmatch(body)
    assert len(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) * 8 >= 256
    assert other != key


def test_no_key_is_stored_anywhere_in_the_database(store: ControlStore) -> None:
    tenant_id, first = new_tenant(store, "acme")
    with store.session() as db:
        second = db.create_key(tenant_id, frozenset({Scope.ingest}), label="ingest only")
        revoked = db.create_key(tenant_id, ALL_SCOPES, label="old")
        assert db.revoke_key(tenant_id, revoked)

    values = text_values(store)
    for key in (first, second, revoked):
        body = key.removeprefix(LIVE_PREFIX)
        leaks = [(t, c) for t, c, v in values if key in v or body in v]
        assert not leaks, f"key stored in {leaks}"
        # The scan does reach the key table: the key's digest is there.
        assert any(v == hashlib.sha256(key.encode()).hexdigest() for _, _, v in values)


def test_the_right_key_authenticates_as_its_tenant_with_all_scopes(store: ControlStore) -> None:
    tenant_id, key = new_tenant(store, "acme")
    new_tenant(store, "globex")

    with store.session() as db:
        who = db.authenticate(key)

    assert who is not None
    assert (who.tenant_id, who.tenant_name) == (tenant_id, "acme")
    assert who.scopes == ALL_SCOPES == frozenset(Scope)
    assert who.key_id


WRONG_KEYS: dict[str, Callable[[str], str]] = {
    "empty": lambda key: "",
    "prefix only": lambda key: LIVE_PREFIX,
    "not a key": lambda key: "not-a-key",
    "with a scheme": lambda key: f"Bearer {key}",
    "leading space": lambda key: f" {key}",
    "one char more": lambda key: key + "x",
    "one char less": lambda key: key[:-1],
    "test prefix": lambda key: "pg_test_" + key.removeprefix(LIVE_PREFIX),
    "other case": lambda key: LIVE_PREFIX + key.removeprefix(LIVE_PREFIX).swapcase(),
    "too long": lambda key: LIVE_PREFIX + "A" * KEY_LENGTH_MAX,
    "never issued": lambda key: new_key(),
}


@pytest.mark.parametrize("wrong", WRONG_KEYS.values(), ids=WRONG_KEYS.keys())
def test_a_wrong_or_malformed_key_authenticates_as_nobody(store: ControlStore, wrong: Callable[[str], str]) -> None:
    _, key = new_tenant(store, "acme")
    candidate = wrong(key)
    assert candidate != key

    with store.session() as db:
        assert db.authenticate(candidate) is None


def test_a_revoked_key_authenticates_as_nobody_and_other_keys_still_work(store: ControlStore) -> None:
    tenant_id, key = new_tenant(store, "acme")
    other_tenant, _ = new_tenant(store, "globex")
    with store.session() as db:
        spare = db.create_key(tenant_id, ALL_SCOPES)
        assert not db.revoke_key(other_tenant, key), "a tenant revoked another tenant's key"
        assert db.revoke_key(tenant_id, key)

    with store.session() as db:
        assert db.authenticate(key) is None
        assert not db.revoke_key(tenant_id, key), "revoked twice"
        who = db.authenticate(spare)
        assert who is not None and who.tenant_id == tenant_id


def test_a_key_with_only_the_ingest_scope_has_only_that_scope(store: ControlStore) -> None:
    tenant_id, _ = new_tenant(store, "acme")
    with store.session() as db:
        key = db.create_key(tenant_id, frozenset({Scope.ingest}), label="backend")

    with store.session() as db:
        who = db.authenticate(key)
    assert who is not None and who.tenant_id == tenant_id
    assert who.scopes == frozenset({Scope.ingest})


def test_a_duplicate_tenant_name_is_a_conflict(store: ControlStore) -> None:
    tenant_id, _ = new_tenant(store, "acme")

    with pytest.raises(Conflict), store.session() as db:
        db.create_tenant("acme")
    with store.session() as db:
        assert db.tenant_id("acme") == tenant_id
        assert db.tenant_id("globex") is None


# -- plans ------------------------------------------------------------------------------------------------------------


def test_plans_lists_the_newest_version_of_each_of_the_callers_plans_only(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    b, _ = new_tenant(store, "globex")
    free_a, pro_a = plans_of(a)
    free_a2 = next_version(free_a, max_spend_per_period=free_a.max_spend_per_period * 2)
    (free_b, _) = plans_of(b)
    with store.session() as db:
        db.add_plan_version(a, free_a)
        db.add_plan_version(a, pro_a)
        db.add_plan_version(b, free_b)
    with store.session() as db:
        db.add_plan_version(a, free_a2)

    with store.session() as db:
        assert db.plans(a) == [free_a2, pro_a]  # by name; decimals and nested structs round-trip exactly
        assert db.plans(b) == [free_b]
        assert db.plan(a, free_a.plan_id) == free_a2
        assert db.plan(a, pro_a.plan_id) == pro_a
        assert db.plan_names(a) == {"free", "pro"}


def test_a_plan_is_invisible_to_other_tenants(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    b, _ = new_tenant(store, "globex")
    free_a, _ = plans_of(a)
    with store.session() as db:
        db.add_plan_version(a, free_a)
        db.add_plan_version(a, next_version(free_a))

    with store.session() as db:
        assert db.plan(b, free_a.plan_id) is None
        assert db.plan(b, free_a.plan_id, for_update=True) is None
        assert db.plans(b) == []
        assert db.plan_names(b) == set()
        locked = db.plan(a, free_a.plan_id, for_update=True)  # SELECT ... FOR UPDATE OF plans on PostgreSQL
        assert locked is not None and locked.version == 2


def test_a_plan_built_by_hand_round_trips(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    plan = Plan(plan_id="11111111-2222-3333-4444-555555555555", name="basic", version=1)
    with store.session() as db:
        db.add_plan_version(a, plan)
    with store.session() as db:
        assert db.plans(a) == [plan]


# -- users and subscriptions ------------------------------------------------------------------------------------------


def test_an_external_id_is_unique_within_a_tenant_only(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    b, _ = new_tenant(store, "globex")
    with store.session() as db:
        first = db.create_user(a, "u42")

    with pytest.raises(Conflict), store.session() as db:
        db.create_user(a, "u42")
    with store.session() as db:
        other = db.create_user(b, "u42")

    assert other.id != first.id and other.external_id == first.external_id == "u42"
    with store.session() as db:
        assert db.user(a, first.id) == first
        assert db.user(b, other.id) == other


def test_a_user_is_invisible_to_other_tenants(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    b, _ = new_tenant(store, "globex")
    with store.session() as db:
        user = db.create_user(a, "u42")

    with store.session() as db:
        assert db.user(b, user.id) is None
        found = db.user(a, user.id)
    assert found is not None and found.external_id == "u42" and found.plan_id is None and found.period_start is None
    assert found.created_at.tzinfo is not None


def test_set_subscription_round_trips_an_aware_utc_period_start(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    free, _ = plans_of(a)
    start = datetime(2026, 11, 1, 0, 0, 0, 123456, tzinfo=UTC)
    with store.session() as db:
        db.add_plan_version(a, free)
        user = db.create_user(a, "u42")
        returned = db.set_subscription(a, user.id, free.plan_id, start)
    assert returned.plan_id == free.plan_id and returned.period_start == start

    with store.session() as db:
        found = db.user(a, user.id)
    assert found is not None and found.plan_id == free.plan_id
    assert found.period_start == start
    assert found.period_start is not None and found.period_start.utcoffset() == timedelta(0)


def test_set_subscription_keeps_the_instant_of_a_period_start_in_another_zone(
        store: ControlStore, store_url: str, request: pytest.FixtureRequest) -> None:
    a, _ = new_tenant(store, "acme")
    free, _ = plans_of(a)
    start = datetime(2026, 11, 1, 2, 0, tzinfo=timezone(timedelta(hours=2)))  # 2026-11-01T00:00Z
    with store.session() as db:
        db.add_plan_version(a, free)
        user = db.create_user(a, "u42")
        db.set_subscription(a, user.id, free.plan_id, start)

    with store.session() as db:
        found = db.user(a, user.id)
    assert found is not None and found.period_start == start


# -- ingested usage ---------------------------------------------------------------------------------------------------


def test_ingested_event_ids_are_remembered_per_tenant_with_their_first_digest(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    b, _ = new_tenant(store, "globex")
    with store.session() as db:
        db.remember_ingested(a, {"e1": "d1", "e2": "d2"})
    with store.session() as db:
        db.remember_ingested(a, {"e2": "other", "e3": "d3"})  # e2 again: the first digest stays

    with store.session() as db:
        assert db.ingested(a, ["e1", "e2", "e3", "e4", "nul\x00"]) == {"e1": "d1", "e2": "d2", "e3": "d3"}
        assert db.ingested(b, ["e1", "e2", "e3"]) == {}
        assert db.ingested(a, []) == {}


def test_the_ingested_record_keeps_only_the_newest_ids_of_each_tenant(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    b, _ = new_tenant(store, "globex")
    with store.session() as db:
        db.remember_ingested(b, {"b1": "d"}, keep=3)
        for n in range(5):
            db.remember_ingested(a, {f"a{n}": "d"}, keep=3)

    with store.session() as db:
        assert sorted(db.ingested(a, [f"a{n}" for n in range(5)])) == ["a2", "a3", "a4"]
        assert db.ingested(b, ["b1"]) == {"b1": "d"}  # another tenant's ids do not push these out


# -- webhooks and their delivery log ----------------------------------------------------------------------------------

# Endpoints are created at the wall clock's now; gate events are written (and attempts made) after that.
T_WEBHOOK = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)


def gate(tenant_id: str, n: int, written_at: datetime = T_WEBHOOK) -> Outbound:
    return Outbound(tenant_id=tenant_id, event_id=f"gate-{n}", payload=f'{{"gate_id":"gate-{n}","used":1.10}}',
                    written_at=written_at)


def test_a_webhook_secret_is_whsec_and_at_least_24_random_bytes_and_never_listed(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    with store.session() as db:
        first, secret = db.create_webhook(a, "https://example.com/hooks", "billing")
        second, other_secret = db.create_webhook(a, "http://127.0.0.1:9/hooks")

    assert secret.startswith("whsec_") and secret != other_secret
    assert 24 <= len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) <= 64
    with store.session() as db:
        listed = db.webhooks(a)
        assert listed == [first, second]
        assert db.webhook(a, first.id) == first
    assert (first.url, first.description, first.enabled) == ("https://example.com/hooks", "billing", True)
    assert first.created_at.tzinfo is not None
    assert not any(secret in repr(w) for w in listed)


def test_a_webhook_is_invisible_and_undeletable_to_other_tenants(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    b, _ = new_tenant(store, "globex")
    with store.session() as db:
        hook, _ = db.create_webhook(a, "https://example.com/hooks")
        db.record_deliveries([gate(a, 1)], T_WEBHOOK)

    with store.session() as db:
        assert db.webhook(b, hook.id) is None
        assert db.webhooks(b) == []
        assert db.deliveries(b, hook.id) == []
        assert not db.delete_webhook(b, hook.id)
        assert db.webhook(a, hook.id) == hook and len(db.deliveries(a, hook.id)) == 1
        assert db.webhook(a, "no\x00such") is None


def test_a_tenant_has_a_bounded_number_of_webhooks(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    b, _ = new_tenant(store, "globex")
    with store.session() as db:
        for n in range(WEBHOOKS_PER_TENANT_MAX):
            db.create_webhook(a, f"https://example.com/{n}")
    with pytest.raises(Conflict, match=str(WEBHOOKS_PER_TENANT_MAX)), store.session() as db:
        db.create_webhook(a, "https://example.com/one-too-many")
    with store.session() as db:
        assert len(db.webhooks(a)) == WEBHOOKS_PER_TENANT_MAX
        db.create_webhook(b, "https://example.com/0")  # the bound is per tenant


def test_each_gate_event_becomes_one_pending_delivery_per_endpoint_of_its_tenant_once(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    b, _ = new_tenant(store, "globex")
    with store.session() as db:
        a1, _ = db.create_webhook(a, "https://a.example/1")
        a2, _ = db.create_webhook(a, "https://a.example/2")
        b1, _ = db.create_webhook(b, "https://b.example/1")
    events = [gate(a, 1), gate(a, 2), gate(b, 3)]

    with store.session() as db:
        assert db.record_deliveries(events, T_WEBHOOK) == 5
    with store.session() as db:  # the same batch read again after a crash adds nothing
        assert db.record_deliveries(events, T_WEBHOOK + timedelta(minutes=1)) == 0
        assert db.record_deliveries([], T_WEBHOOK) == 0

    with store.session() as db:
        logged = {h.id: sorted((d.event_id, d.state, d.attempts, d.next_attempt_at) for d in db.deliveries(t, h.id))
                  for t, h in ((a, a1), (a, a2), (b, b1))}
    pending = DeliveryState.pending
    assert logged == {a1.id: [("gate-1", pending, 0, T_WEBHOOK), ("gate-2", pending, 0, T_WEBHOOK)],
                      a2.id: [("gate-1", pending, 0, T_WEBHOOK), ("gate-2", pending, 0, T_WEBHOOK)],
                      b1.id: [("gate-3", pending, 0, T_WEBHOOK)]}


def test_an_endpoint_gets_only_gate_events_written_after_it_was_registered(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    with store.session() as db:
        hook, _ = db.create_webhook(a, "https://a.example/1")
    before, after = hook.created_at - timedelta(seconds=1), hook.created_at + timedelta(seconds=1)

    with store.session() as db:
        assert db.record_deliveries([gate(a, 1, before), gate(a, 2, after)], after) == 1
        assert [d.event_id for d in db.deliveries(a, hook.id)] == ["gate-2"]


def test_a_due_delivery_is_claimed_once_until_its_lease_ends(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    with store.session() as db:
        hook, secret = db.create_webhook(a, "https://a.example/1")
        db.record_deliveries([gate(a, 1)], T_WEBHOOK)
    lease_end = T_WEBHOOK + timedelta(seconds=60)

    with store.session() as db:
        assert db.claim_due(T_WEBHOOK - timedelta(seconds=1), lease_end, 10) == []  # not due yet
        (claimed,) = db.claim_due(T_WEBHOOK, lease_end, 10)
    assert (claimed.webhook_id, claimed.event_id, claimed.url, claimed.secret, claimed.attempts) == (
        hook.id, "gate-1", "https://a.example/1", secret, 0)
    assert claimed.payload == gate(a, 1).payload
    with store.session() as db:
        assert db.claim_due(T_WEBHOOK + timedelta(seconds=59), lease_end, 10) == []  # leased to the first claimant
    with store.session() as db:  # the claimant died: when the lease ends, the delivery is due again
        (again,) = db.claim_due(lease_end, lease_end + timedelta(seconds=60), 10)
    assert again.event_id == "gate-1"


def test_two_claimants_at_once_never_get_the_same_delivery(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    with store.session() as db:
        db.create_webhook(a, "https://a.example/1")
        db.record_deliveries([gate(a, n) for n in range(40)], T_WEBHOOK)
    start = threading.Barrier(2)
    claimed: list[list[str]] = []

    def claimant() -> None:
        start.wait()
        with store.session() as db:
            got = db.claim_due(T_WEBHOOK, T_WEBHOOK + timedelta(seconds=60), 40)
        claimed.append([d.event_id for d in got])

    threads = [threading.Thread(target=claimant) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert len(claimed) == 2
    everything = claimed[0] + claimed[1]
    assert len(everything) == len(set(everything)), "a delivery was claimed twice"
    assert set(everything) == {f"gate-{n}" for n in range(40)}


def test_a_fair_claim_goes_round_the_tenants_and_leaves_a_busy_tenant_its_share_only(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    b, _ = new_tenant(store, "globex")
    with store.session() as db:
        db.create_webhook(a, "https://a.example/1")
        db.create_webhook(b, "https://b.example/1")
        db.record_deliveries([gate(b, n) for n in range(30)], T_WEBHOOK)  # b's backlog came first
        db.record_deliveries([Outbound(a, "gate-a", "{}", T_WEBHOOK)], T_WEBHOOK)
    lease = T_WEBHOOK + timedelta(seconds=60)
    with store.session() as db:
        # b already has 2 of its 3 attempts in flight: it gets 1 more, and a's delivery is not queued behind b's.
        claimed = db.claim_due(T_WEBHOOK, lease, 10, tenant_limit=3, busy={b: 2})
    assert sorted(d.tenant_id for d in claimed) == sorted([a, b])
    assert {d.event_id for d in claimed if d.tenant_id == a} == {"gate-a"}
    with store.session() as db:  # free of in-flight attempts, b gets its share and no more
        assert len(db.claim_due(T_WEBHOOK, lease, 10, tenant_limit=3, busy={})) == 3


def test_attempts_are_logged_until_delivered_or_given_up(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    with store.session() as db:
        hook, _ = db.create_webhook(a, "https://a.example/1")
        db.record_deliveries([gate(a, 1), gate(a, 2)], T_WEBHOOK)
    retry_at = T_WEBHOOK + timedelta(seconds=5)

    with store.session() as db:
        assert db.record_attempt(hook.id, "gate-1", state=DeliveryState.pending, at=T_WEBHOOK, status=500,
                                 error="HTTP 500" + "!" * 1000, next_attempt_at=retry_at)
        assert db.record_attempt(hook.id, "gate-2", state=DeliveryState.failed, at=T_WEBHOOK, status=None,
                                 error="connection refused", next_attempt_at=None)
    with store.session() as db:
        assert db.claim_due(T_WEBHOOK, retry_at + timedelta(minutes=1), 10) == []  # gate-1 waits, gate-2 gave up
        (due,) = db.claim_due(retry_at, retry_at + timedelta(minutes=1), 10)
        assert (due.event_id, due.attempts) == ("gate-1", 1)
        db.record_attempt(hook.id, "gate-1", state=DeliveryState.delivered, at=retry_at, status=204, error=None,
                          next_attempt_at=None)

    with store.session() as db:
        log = {d.event_id: d for d in db.deliveries(a, hook.id)}
        assert db.claim_due(retry_at + timedelta(days=1), retry_at + timedelta(days=2), 10) == []
    one, two = log["gate-1"], log["gate-2"]
    assert (one.state, one.attempts, one.last_status, one.delivered_at, one.next_attempt_at) == (
        DeliveryState.delivered, 2, 204, retry_at, None)
    assert one.last_error is None
    assert (two.state, two.attempts, two.last_status, two.last_error, two.delivered_at) == (
        DeliveryState.failed, 1, None, "connection refused", None)


def test_a_disabled_webhook_gets_nothing_more_and_its_pending_deliveries_fail(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    with store.session() as db:
        gone, _ = db.create_webhook(a, "https://a.example/gone")
        kept, _ = db.create_webhook(a, "https://a.example/kept")
        db.record_deliveries([gate(a, 1), gate(a, 2)], T_WEBHOOK)
        db.record_attempt(gone.id, "gate-1", state=DeliveryState.delivered, at=T_WEBHOOK, status=200, error=None,
                          next_attempt_at=None)

    with store.session() as db:
        assert db.disable_webhook(gone.id, "answered 410") == 1
    with store.session() as db:
        assert db.record_deliveries([gate(a, 3)], T_WEBHOOK) == 1  # for the enabled endpoint only
        claimed = db.claim_due(T_WEBHOOK, T_WEBHOOK + timedelta(minutes=1), 10)
        log = {d.event_id: (d.state, d.last_error) for d in db.deliveries(a, gone.id)}
        assert db.webhook(a, gone.id) == replace(gone, enabled=False)
    assert sorted((d.webhook_id, d.event_id) for d in claimed) == [(kept.id, f"gate-{n}") for n in (1, 2, 3)]
    assert log == {"gate-1": (DeliveryState.delivered, None), "gate-2": (DeliveryState.failed, "answered 410")}


def test_pruning_forgets_old_finished_deliveries_only(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    with store.session() as db:
        hook, _ = db.create_webhook(a, "https://a.example/1")
        db.record_deliveries([gate(a, n) for n in range(5)], T_WEBHOOK)
        db.record_deliveries([gate(a, 9)], T_WEBHOOK + timedelta(days=2))
        for n, state in ((0, DeliveryState.delivered), (1, DeliveryState.failed), (2, DeliveryState.delivered),
                         (9, DeliveryState.delivered)):
            db.record_attempt(hook.id, f"gate-{n}", state=state, at=T_WEBHOOK, status=None, error=None,
                              next_attempt_at=None)
    cutoff = T_WEBHOOK + timedelta(days=1)

    with store.session() as db:
        assert db.prune_deliveries(cutoff, limit=2) == 2  # bounded per call
    with store.session() as db:
        assert db.prune_deliveries(cutoff, limit=100) == 1
        assert db.prune_deliveries(cutoff, limit=100) == 0
    with store.session() as db:
        # Pending ones (3, 4) stay whatever their age, and so does the recent delivered one (9).
        assert sorted(d.event_id for d in db.deliveries(a, hook.id)) == ["gate-3", "gate-4", "gate-9"]


def test_deleting_a_webhook_drops_its_deliveries_and_their_retries(store: ControlStore) -> None:
    a, _ = new_tenant(store, "acme")
    with store.session() as db:
        gone, _ = db.create_webhook(a, "https://a.example/gone")
        kept, _ = db.create_webhook(a, "https://a.example/kept")
        db.record_deliveries([gate(a, 1)], T_WEBHOOK)

    with store.session() as db:
        assert db.delete_webhook(a, gone.id)
        assert not db.delete_webhook(a, gone.id)
    with store.session() as db:
        assert [w.id for w in db.webhooks(a)] == [kept.id]
        assert db.deliveries(a, gone.id) == []
        assert [d.webhook_id for d in db.claim_due(T_WEBHOOK, T_WEBHOOK + timedelta(minutes=1), 10)] == [kept.id]
        assert not db.record_attempt(gone.id, "gate-1", state=DeliveryState.delivered, at=T_WEBHOOK, status=200,
                                     error=None, next_attempt_at=None)
