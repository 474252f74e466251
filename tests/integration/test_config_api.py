"""The configuration API against a real broker and a real database (SQLite here)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ledger.api.app import create_api
from ledger.control.keys import Scope
from ledger.control.store import ControlStore
from ledger.settings import Settings
from tests.conftest import wait_processed
from tests.factories import SEED_PLANS_JSON, T0, usage
from tests.kafka_io import gates, publish

pytestmark = pytest.mark.integration

PATCH_BODY = {"model_limits": {"gpt-4o": {"max_tokens_per_period": 75000},
                               "gpt-4o-mini": {"max_tokens_per_period": 300000}}}


class Tenant:
    def __init__(self, client: TestClient, tenant_id: str, key: str) -> None:
        self.client, self.id, self.key = client, tenant_id, key

    def call(self, method: str, path: str, key: str | None = "default", headers: dict[str, str] | None = None,
             **kwargs):  # type: ignore[no-untyped-def]
        auth = {} if key is None else {"Authorization": f"Bearer {self.key if key == 'default' else key}"}
        return self.client.request(method, f"/api/v1{path}", headers={**auth, **(headers or {})}, **kwargs)


@pytest.fixture
def api(settings: Settings) -> Iterator[tuple[TestClient, ControlStore]]:
    store = ControlStore(settings.control_url)
    with TestClient(create_api(settings, store=store)) as client:
        yield client, store


def new_tenant(api: tuple[TestClient, ControlStore], name: str) -> Tenant:
    client, store = api
    with store.session() as session:
        tenant_id, key = session.create_tenant(name)
    return Tenant(client, tenant_id, key)


def test_the_plans_guide_config_posted_verbatim_creates_two_plans_and_again_only_duplicates(api):
    acme = new_tenant(api, "acme")
    first = acme.call("POST", "/config/plans", content=SEED_PLANS_JSON)
    assert first.status_code == 201, first.text
    plans = {p["name"]: p["id"] for p in first.json()["plans"]}
    assert set(plans) == {"free", "pro"} and all(plans.values())
    assert first.json()["duplicates"] == []
    listed = acme.call("GET", "/config/plans").json()

    again = acme.call("POST", "/config/plans", content=SEED_PLANS_JSON)
    assert again.status_code == 200
    assert again.json() == {"plans": [], "duplicates": [{"name": "free", "id": plans["free"]},
                                                        {"name": "pro", "id": plans["pro"]}]}
    assert acme.call("GET", "/config/plans").json() == listed


def test_get_fills_every_default(api):
    acme = new_tenant(api, "acme")
    acme.call("POST", "/config/plans", content=b'{"plans": [{"name": "bare"}]}')
    (plan,) = acme.call("GET", "/config/plans").json()["plans"]
    assert plan["soft_gate_at"] == 0.80 and plan["hard_gate_at"] == 1.00
    assert plan == {"id": plan["id"], "name": "bare", "version": 1, "max_spend_per_period": None,
                    "max_spend_per_session": None, "model_limits": {}, "cost_rates": {}, "default_cost_rate": None,
                    "tool_costs": {}, "soft_gate_at": 0.80, "hard_gate_at": 1.00, "session_timeout_minutes": 30,
                    "markup": 1, "period_interval": "month", "billing_mode": "subscription", "trial_days": 0,
                    "pre_call_estimate": None}
    raw = acme.call("GET", "/config/plans").text
    assert '"soft_gate_at":0.80' in raw  # decimals are written as the exact numbers, never via float


@pytest.mark.parametrize("body, field", [
    (b'{"plans": [{"name": "a", "soft_gate_at": 0.9, "hard_gate_at": 0.8}]}', "soft_gate_at"),
    (b'{"plans": [{"name": "a", "cost_rates": {"m": {"input": -0.1, "output": 1}}}]}', "cost_rates.m.input"),
    (b'{"plans": [{"name": "a", "model_limits": {"m": {"max_tokens_per_period": -1}}}]}', "max_tokens_per_period"),
    (b'{"plans": [{"name": "a", "period_interval": "fortnight"}]}', "period_interval"),
    (b'{"plans": "nope"}', "plans"),
    (b'{"plans": [{"nmae": "a"}]}', "nmae"),
    (b'{"plans": [', "not valid JSON"),
])
def test_invalid_plans_answer_422_naming_the_field(api, body, field):
    acme = new_tenant(api, "acme")
    response = acme.call("POST", "/config/plans", content=body)
    assert response.status_code == 422 and field in response.json()["detail"], response.text
    assert acme.call("GET", "/config/plans").json() == {"plans": []}


def test_subscription_to_an_unknown_plan_answers_422_naming_plan_id(api):
    acme = new_tenant(api, "acme")
    user = acme.call("POST", "/users", json={"external_id": "u1"}).json()
    response = acme.call("POST", f"/users/{user['id']}/subscription", json={"plan_id": "no-such-plan"})
    assert response.status_code == 422 and "plan_id" in response.json()["detail"]


def test_an_existing_external_id_answers_409(api):
    acme = new_tenant(api, "acme")
    assert acme.call("POST", "/users", json={"external_id": "u1"}).status_code == 201
    assert acme.call("POST", "/users", json={"external_id": "u1"}).status_code == 409


def test_isolation_scopes_and_keys(api, settings, worker):
    a, b = new_tenant(api, "tenant-a"), new_tenant(api, "tenant-b")
    plan_id = a.call("POST", "/config/plans", content=SEED_PLANS_JSON).json()["plans"][0]["id"]
    user_id = a.call("POST", "/users", json={"external_id": "alice", "plan_id": plan_id}).json()["id"]
    tier_id = a.call("POST", "/config/tiers", content=b'tier_code: t\ndisplay_name: T\nmodels: [gpt-4o]\n',
                     headers=YAML).json()["tiers"][0]["id"]
    calls = [("GET", f"/config/plans/{plan_id}", None), ("PATCH", f"/config/plans/{plan_id}", PATCH_BODY),
             ("GET", f"/users/{user_id}", None), ("POST", f"/users/{user_id}/subscription", {"plan_id": plan_id}),
             ("GET", f"/config/tiers/{tier_id}", None), ("POST", f"/users/{user_id}/topups", {"amount": 5})]
    for method, path, body in calls:
        assert b.call(method, path, json=body).status_code == 404, (method, path)
        assert a.call(method, path, key=None, json=body).status_code == 401
        assert a.call(method, path, key="pg_live_not-a-real-key", json=body).status_code == 401
    assert b.call("GET", "/config/plans").json() == {"plans": []}
    assert b.call("GET", "/config/tiers").json() == {"tiers": []}
    # A check names the user in its body: under B's key, A's user is unknown (no plan), and nothing of A leaks.
    blocked = b.call("POST", "/check", json={"user": "alice", "model": "gpt-4o-mini", "input_tokens": 10})
    assert blocked.status_code == 402 and blocked.json()["dimension"] == "plan"

    _, store = api
    with store.session() as session:
        ingest_only = session.create_key(a.id, frozenset({Scope.ingest}))
    for method, path, body in [("POST", "/config/plans", None), *calls[1:2], ("POST", "/users", {"external_id": "x"}),
                               *calls[5:6], ("POST", "/config/tiers", None)]:
        assert a.call(method, path, key=ingest_only, json=body).status_code == 403, (method, path)

    with store.session() as session:
        assert session.revoke_key(a.id, ingest_only)
    assert a.call("GET", "/config/plans", key=ingest_only).status_code == 401

    dump = "\n".join(sqlite3.connect(settings.control_url.removeprefix("sqlite:///")).iterdump())
    assert a.key not in dump and a.key.removeprefix("pg_live_") not in dump


def test_patch_makes_a_new_version_that_only_new_sessions_use(api, settings, worker):
    """The guide's PATCH: a running session keeps its quota (50k gpt-4o), a new one gets 75k."""
    acme = new_tenant(api, "acme")
    pro = next(p for p in acme.call("POST", "/config/plans", content=SEED_PLANS_JSON).json()["plans"]
               if p["name"] == "pro")
    acme.call("POST", "/users", json={"external_id": "old", "plan_id": pro["id"], "period_start": T0.isoformat()})
    acme.call("POST", "/users", json={"external_id": "new", "plan_id": pro["id"], "period_start": T0.isoformat()})

    def call(user: str, n: int, session: str, minutes: int):  # type: ignore[no-untyped-def]
        return usage(user, n, model="gpt-4o", input_tokens=20_000, output_tokens=0, session=session,
                     tenant=acme.id, at=T0 + timedelta(minutes=minutes))

    publish(settings, [call("old", 1, "before", 1)])  # the "before" session starts on version 1
    wait_processed(settings, worker)
    patched = acme.call("PATCH", f"/config/plans/{pro['id']}", json=PATCH_BODY)
    assert patched.status_code == 200 and patched.json()["version"] == 2
    assert patched.json()["model_limits"]["gpt-4o"] == {"max_tokens_per_period": 75000}
    assert patched.json()["max_spend_per_period"] == 49.00  # untouched fields stay

    publish(settings, [call("old", n, "before", n) for n in range(2, 5)]       # 80k tokens in the old session
            + [call("new", n, "after", n) for n in range(1, 5)])              # 80k tokens in a new session
    wait_processed(settings, worker)
    raised = sorted((g.user, g.kind, int(g.limit), g.plan_version) for g in gates(settings))
    assert raised == [("new", "hard_block", 75000, 2), ("new", "soft_warning", 75000, 2),
                      ("old", "hard_block", 50000, 1), ("old", "soft_warning", 50000, 1)]


YAML = {"Content-Type": "application/yaml"}
TIERS_YAML = (Path(__file__).resolve().parents[2] / "examples" / "tiers.yaml").read_bytes()


def test_the_tiers_guide_five_tiers_load_with_the_guide_margins(api):
    acme = new_tenant(api, "acme")
    created = acme.call("POST", "/config/tiers", content=TIERS_YAML, headers=YAML)
    assert created.status_code == 201, created.text
    by_code = {t["tier_code"]: t for t in acme.call("GET", "/config/tiers").json()["tiers"]}
    assert set(by_code) == {"starter", "pro", "business", "free", "paygo"}
    margins = {code: (t["margin"]["profit_usd"], t["margin"]["margin_pct"]) if t["margin"] else None
               for code, t in by_code.items()}
    assert margins == {"starter": (13.32, 46), "pro": (36.30, 37), "business": (90.00, 30),
                       "free": (-5.23, None), "paygo": None}
    assert by_code["free"]["margin"]["cost_usd"] == 5.23
    # Each tier is a plan: its budget the period limit, its models the only ones priced (catalog rate x 1.045).
    plan = acme.call("GET", f"/config/plans/{by_code['starter']['plan_id']}").json()
    assert plan["max_spend_per_period"] == 15 and plan["markup"] == 1.045 and set(plan["cost_rates"]) == {"claude-sonnet-4-5"}
    again = acme.call("POST", "/config/tiers", content=TIERS_YAML, headers=YAML)
    assert again.status_code == 200 and len(again.json()["duplicates"]) == 5


@pytest.mark.parametrize("body, field", [
    (b'tier_code: x\ndisplay_name: X\nbilling_mode: credit\nmodels: [gpt-4o]\n', "billing_mode"),
    (b'tier_code: x\ndisplay_name: X\nspend_limit_cents: -1\nmodels: [gpt-4o]\n', "spend_limit_cents"),
    (b'tier_code: x\ndisplay_name: X\nmodels: [no-such-model-9]\n', "no-such-model-9"),
])
def test_invalid_tiers_answer_422_naming_the_field(api, body, field):
    acme = new_tenant(api, "acme")
    response = acme.call("POST", "/config/tiers", content=body, headers=YAML)
    assert response.status_code == 422 and field in response.json()["detail"], response.text
