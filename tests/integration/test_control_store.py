"""The control-plane store's contract, written once and run against SQLite and a real PostgreSQL.

Every test gets a fresh, empty database through ``store_url`` (tests/conftest.py); the
PostgreSQL server is ``LEDGER_TEST_DATABASE_URL`` or a throwaway one (tests/pg.py).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from sqlalchemy import String, inspect, text

from ledger.control.keys import ALL_SCOPES, KEY_LENGTH_MAX, Scope, new_key
from ledger.control.store import Conflict, ControlStore
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
