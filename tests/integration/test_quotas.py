"""Quotas, rate limits and plan bounds at the API (docs/limits.md), against a real broker and database.

Each bound answers a 4xx whose message names it: a hostile tenant cannot grow the control plane or
the usage log (kept forever) without bound, nor spend another tenant's request budget.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from ledger.api.app import create_api
from ledger.control import quotas
from ledger.control.store import ControlStore
from ledger.plans import (
    MODEL_NAME_LENGTH_MAX,
    PLAN_DOCUMENT_BYTES_MAX,
    PLAN_MAP_ENTRIES_MAX,
    PLANS_PER_FILE_MAX,
    TOOL_NAME_LENGTH_MAX,
)
from ledger.settings import Settings
from tests.kafka_io import usage_log

pytestmark = pytest.mark.integration
RATE = {"input": 1, "output": 2}


@pytest.fixture
def api(settings: Settings) -> Iterator[tuple[TestClient, ControlStore]]:
    store = ControlStore(settings.control_url)
    # Private webhook addresses allowed: the webhook quota test registers loopback ones (nothing is delivered).
    with TestClient(create_api(dataclasses.replace(settings, webhook_allow_private=True), store=store)) as client:
        yield client, store


class Tenant:
    def __init__(self, client: TestClient, tenant_id: str, key: str) -> None:
        self.client, self.id, self.key = client, tenant_id, key

    def call(self, method: str, path: str, **kwargs):  # type: ignore[no-untyped-def]
        return self.client.request(method, f"/api/v1{path}", headers={"Authorization": f"Bearer {self.key}",
                                                                       **kwargs.pop("headers", {})}, **kwargs)


def new_tenant(api: tuple[TestClient, ControlStore], name: str) -> Tenant:
    client, store = api
    with store.session() as session:
        return Tenant(client, *session.create_tenant(name))


def refused(response, status: int, bound: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status and bound in response.json()["detail"], response.text


def log_size(settings: Settings) -> int:
    """How many commands the usage log holds (an envelope holds many)."""
    return len(usage_log(settings))


# -- rate per key ---------------------------------------------------------------------------------------------------


def stop_the_refill(client: TestClient) -> None:
    """The rate limiter's clock stands still: a bucket then holds its burst and never refills, so what a test
    sends is refused exactly past the burst, however slowly a loaded machine answers (at 1/s, six requests
    taking more than a second would otherwise earn one back)."""
    client.app.state.rate_limits.clock = lambda: 0.0  # type: ignore[attr-defined]


def test_a_key_past_its_rate_gets_429_with_retry_after_and_another_tenants_key_is_unaffected(api):
    a, b = new_tenant(api, "tenant-a"), new_tenant(api, "tenant-b")
    _, store = api
    with store.session() as session:
        session.set_rate(a.id, requests_per_s=1, burst=5)
    stop_the_refill(api[0])

    answers = [a.call("GET", "/config/plans") for _ in range(8)]
    assert [r.status_code for r in answers[:5]] == [200] * 5  # the burst
    throttled = answers[5]
    refused(throttled, 429, "rate_per_key")
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60
    # Tenant B's key (the settings' default: 250/s, bursts of 500) is not throttled by A's traffic.
    others = [b.call("GET", "/config/plans").status_code for _ in range(20)]
    assert others == [200] * 20
    print(f"\ntenant A at 1/s, burst 5: {[r.status_code for r in answers]} (Retry-After "
          f"{throttled.headers['Retry-After']} s); tenant B meanwhile: {others}")


def test_the_rate_is_per_key_and_a_tenant_without_its_own_rate_gets_the_settings_default(settings):
    from dataclasses import replace

    from ledger.control.keys import ALL_SCOPES

    store = ControlStore(settings.control_url)
    with TestClient(create_api(replace(settings, rate_per_key_per_s=1, rate_burst=2), store=store)) as client:
        tenant = new_tenant((client, store), "acme")
        with store.session() as session:
            spare = session.create_key(tenant.id, ALL_SCOPES)
        stop_the_refill(client)
        assert [tenant.call("GET", "/config/plans").status_code for _ in range(3)] == [200, 200, 429]
        second = client.get("/api/v1/config/plans", headers={"Authorization": f"Bearer {spare}"})
        assert second.status_code == 200


# -- per-tenant quotas ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_quotas(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same limits with small values, so a test reaches each one in a few requests."""
    for name, value in (("PLANS_PER_TENANT", 3), ("VERSIONS_PER_PLAN", 3), ("USERS_PER_TENANT", 3),
                        ("TIERS_PER_TENANT", 2), ("WEBHOOKS_PER_TENANT", 2)):
        limit = getattr(quotas, name)
        monkeypatch.setattr(quotas, name, quotas.Limit(limit.name, value, limit.what))


def test_plans_users_versions_tiers_and_webhooks_per_tenant_are_capped_with_a_named_409(api, small_quotas):
    a, b = new_tenant(api, "tenant-a"), new_tenant(api, "tenant-b")
    plans = a.call("POST", "/config/plans", json={"plans": [{"name": f"p{n}"} for n in range(3)]})
    assert plans.status_code == 201
    refused(a.call("POST", "/config/plans", json={"plans": [{"name": "one-more"}]}), 409, "plans_per_tenant_max")
    assert len(a.call("GET", "/config/plans").json()["plans"]) == 3

    plan_id = plans.json()["plans"][0]["id"]
    assert [a.call("PATCH", f"/config/plans/{plan_id}", json={"trial_days": n}).status_code
            for n in (1, 2)] == [200, 200]
    refused(a.call("PATCH", f"/config/plans/{plan_id}", json={"trial_days": 3}), 409, "versions_per_plan_max")
    assert a.call("GET", f"/config/plans/{plan_id}").json()["version"] == 3

    assert [a.call("POST", "/users", json={"external_id": f"u{n}"}).status_code for n in range(3)] == [201] * 3
    refused(a.call("POST", "/users", json={"external_id": "u3"}), 409, "users_per_tenant_max")

    for n in range(2):
        assert a.call("POST", "/webhooks", json={"url": f"http://127.0.0.1:9/{n}"}).status_code == 201
    refused(a.call("POST", "/webhooks", json={"url": "http://127.0.0.1:9/x"}), 409, "webhooks_per_tenant_max")

    # Tenant B's quotas are its own.
    tiers = b.call("POST", "/config/tiers", json=[{"tier_code": f"t{n}", "display_name": "T", "models": ["gpt-4o"]}
                                                  for n in range(2)])
    assert tiers.status_code == 201, tiers.text
    refused(b.call("POST", "/config/tiers", json={"tier_code": "t2", "display_name": "T", "models": ["gpt-4o"]}),
            409, "tiers_per_tenant_max")
    assert b.call("POST", "/users", json={"external_id": "u0"}).status_code == 201


# -- plan bounds ----------------------------------------------------------------------------------------------------


def test_the_critical_repro_plan_of_6200_long_cost_rates_is_refused_and_nothing_is_logged(api, settings):
    """~980 KB: 6,200 cost_rates with 128-character names. It used to be accepted, and its history in the
    processor's state passed Kafka's message size, which silently dropped another tenant's usage."""
    b = new_tenant(api, "tenant-b")
    rates = {f"{n:06d}".ljust(MODEL_NAME_LENGTH_MAX, "m"): RATE for n in range(6200)}
    body = json.dumps({"plans": [{"name": "huge", "cost_rates": rates}]}).encode()
    assert 900_000 < len(body) < 1024 * 1024

    refused(b.call("POST", "/config/plans", content=body), 422, "plan_map_entries_max")
    assert b.call("GET", "/config/plans").json() == {"plans": []}
    assert log_size(settings) == 0


@pytest.mark.parametrize("plan, bound", [
    ({"cost_rates": {f"m{n}": RATE for n in range(PLAN_MAP_ENTRIES_MAX + 1)}}, "plan_map_entries_max"),
    ({"default_cost_rate": RATE, "model_limits": {f"m{n}": {"max_tokens_per_period": 1}
                                                  for n in range(PLAN_MAP_ENTRIES_MAX + 1)}}, "plan_map_entries_max"),
    ({"tool_costs": {f"t{n}": 1 for n in range(PLAN_MAP_ENTRIES_MAX + 1)}}, "plan_map_entries_max"),
    ({"cost_rates": {"m" * (MODEL_NAME_LENGTH_MAX + 1): RATE}}, "model_name_length_max"),
    ({"default_cost_rate": RATE, "model_limits": {"m" * (MODEL_NAME_LENGTH_MAX + 1): {"max_tokens_per_period": 1}}},
     "model_name_length_max"),
    ({"tool_costs": {"t" * (TOOL_NAME_LENGTH_MAX + 1): 1}}, "tool_name_length_max"),
    # Every map within its bounds, the whole version past the document bound.
    ({"cost_rates": {f"{n:04d}".ljust(MODEL_NAME_LENGTH_MAX, "m"): RATE for n in range(PLAN_MAP_ENTRIES_MAX)},
      "model_limits": {f"{n:04d}".ljust(MODEL_NAME_LENGTH_MAX, "m"): {"max_tokens_per_period": 1}
                       for n in range(PLAN_MAP_ENTRIES_MAX)},
      "tool_costs": {f"{n:04d}".ljust(TOOL_NAME_LENGTH_MAX, "t"): 1 for n in range(PLAN_MAP_ENTRIES_MAX)}},
     "plan_document_bytes_max"),
], ids=["cost_rates", "model_limits", "tool_costs", "model name", "limit name", "tool name", "document"])
def test_a_plan_past_a_bound_is_refused_on_post_and_on_patch_naming_the_bound(api, plan, bound):
    a = new_tenant(api, "acme")
    refused(a.call("POST", "/config/plans", json={"plans": [{"name": "big", **plan}]}), 422, bound)
    small = a.call("POST", "/config/plans", json={"plans": [{"name": "small"}]}).json()["plans"][0]
    refused(a.call("PATCH", f"/config/plans/{small['id']}", json=plan), 422, bound)
    assert a.call("GET", f"/config/plans/{small['id']}").json()["version"] == 1


def test_every_map_at_its_entry_bound_with_ordinary_names_fits_the_document_bound(api):
    a = new_tenant(api, "acme")
    names = [f"provider/model-{n}" for n in range(PLAN_MAP_ENTRIES_MAX)]
    plan = {"name": "wide", "cost_rates": dict.fromkeys(names, RATE),
            "model_limits": {n: {"max_tokens_per_period": 1000} for n in names},
            "tool_costs": dict.fromkeys((f"tool-{n}" for n in range(PLAN_MAP_ENTRIES_MAX)), 1)}
    assert len(json.dumps(plan)) < PLAN_DOCUMENT_BYTES_MAX
    assert a.call("POST", "/config/plans", json={"plans": [plan]}).status_code == 201


def test_a_request_of_more_plans_or_tiers_than_the_bound_is_refused_and_writes_nothing(api, settings):
    """One 86 KB request of 1,000 plans used to write 8,000 records to the usage log, which is kept forever."""
    a = new_tenant(api, "acme")
    plans = {"plans": [{"name": f"p{n}"} for n in range(1000)]}
    refused(a.call("POST", "/config/plans", json=plans), 422, "plans_per_file_max")
    tiers = "\n---\n".join(f"tier_code: t{n}\ndisplay_name: T\nmodels: [gpt-4o]" for n in range(PLANS_PER_FILE_MAX + 1))
    refused(a.call("POST", "/config/tiers", content=tiers, headers={"Content-Type": "application/yaml"}), 422,
            "tiers_per_file_max")
    assert log_size(settings) == 0
    assert a.call("POST", "/config/plans", json={"plans": plans["plans"][:PLANS_PER_FILE_MAX]}).status_code == 201
    published = [command for _p, _key, command in usage_log(settings)]
    assert len(published) == PLANS_PER_FILE_MAX * settings.partitions


def test_versions_of_a_large_plan_stop_at_the_history_bound_the_processor_can_store(api):
    """Every version of a plan is one value of the processor's state: 100 versions of 64 KiB would not fit in a
    Kafka record, and the processor would refuse (too_large) what the API had accepted."""
    a = new_tenant(api, "acme")
    names = [f"{n:04d}".ljust(MODEL_NAME_LENGTH_MAX, "m") for n in range(PLAN_MAP_ENTRIES_MAX)]
    plan = {"name": "wide", "cost_rates": dict.fromkeys(names, RATE)}
    created = a.call("POST", "/config/plans", json={"plans": [plan]})
    assert created.status_code == 201
    plan_id = created.json()["plans"][0]["id"]
    answers = [a.call("PATCH", f"/config/plans/{plan_id}", json={"trial_days": n}) for n in range(1, 40)]
    accepted = [r for r in answers if r.status_code == 200]
    assert 5 < len(accepted) < len(answers)
    refused(answers[len(accepted)], 409, "plan_history_bytes_max")
    assert all(r.status_code == 409 for r in answers[len(accepted):])
    versions = a.call("GET", f"/config/plans/{plan_id}").json()["version"]
    assert versions == len(accepted) + 1 < quotas.VERSIONS_PER_PLAN.value
