"""Spend over HTTP on the real broker: live spend from the processor agrees with the projected history."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import random
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient

from ledger.api.app import create_api
from ledger.control.store import ControlStore
from ledger.pricing import price
from projections.projector import Projector
from streams.progress import end_offsets
from streams.topics import Topics
from tests.conftest import wait_processed
from tests.factories import T0, assigned, published, seed_plans, usage
from tests.kafka_io import publish

pytestmark = pytest.mark.integration

USERS = ("ana", "bo", "cy")
MODELS = ("gpt-4o", "gpt-4o-mini")
# The API's clock: live spend is asked as of the workload's last day (in its December period), whatever today is.
AS_OF = T0 + timedelta(days=45)


@pytest.fixture
def acme(settings, worker):  # type: ignore[no-untyped-def]
    """A tenant with the guide's plans and three users with a month of random usage, processed and projected."""
    store = ControlStore(settings.control_url)
    store.create_schema()
    with store.session() as session:
        tenant, key = session.create_tenant("acme")
        _other, other_key = session.create_tenant("other")
    plans = seed_plans(tenant)
    rng = random.Random(11)
    calls = [usage(user, n, tenant=tenant, model=rng.choice(MODELS), input_tokens=rng.randrange(1, 3000),
                   output_tokens=rng.randrange(1, 900), session=f"s{n % 3}",
                   at=T0 + timedelta(days=rng.randrange(0, 45), seconds=n))  # November and into December
             for user in USERS for n in range(60)]
    publish(settings, [*(published(p, tenant) for p in plans.values()),
                       *(assigned(u, plans["pro"], tenant=tenant) for u in USERS),
                       *sorted(calls, key=lambda c: c.occurred_at)])
    wait_processed(settings, worker)
    asyncio.run(Projector(settings).run(until_caught_up=True))
    # A burst large enough for the thousand reads below, so that each of them reaches the ledger.
    api_settings = dataclasses.replace(settings, rate_burst=10_000)
    with TestClient(create_api(api_settings, store=store, clock=lambda: AS_OF)) as client:
        yield client, tenant, {"Authorization": f"Bearer {key}"}, {"Authorization": f"Bearer {other_key}"}
    store.dispose()


def test_live_spend_and_history_agree_to_the_last_unit(acme):
    client, _tenant, auth, _ = acme
    for user in USERS:
        live = client.get(f"/api/v1/spend/{user}", headers=auth)
        assert live.status_code == 200, live.text
        now = exact(live)
        period = {"from": now["period_start"], "to": now["period_end"]}
        days = _all_pages(client, user, auth, group_by="day", **period)
        assert sum(r["spend"] for r in days) == now["period_spend"]
        by_model = _all_pages(client, user, auth, group_by="model", **period)
        assert {r["model"]: r["input_tokens"] + r["output_tokens"] for r in by_model} == now["model_tokens"]
        (period_limit,) = [x for x in now["limits"] if x["dimension"] == "period_spend"]
        assert period_limit["used"] == now["period_spend"] and period_limit["limit"] == Decimal(49)
        assert now["plan_name"] == "pro" and now["status"] in ("ok", "warning", "blocked")
        assert sum(r["calls"] for r in days) > 0


def test_a_thousand_spend_reads_add_nothing_to_the_usage_log(acme, settings):
    """Reads are not writes: the log is kept forever, and a dashboard polling spend must not grow it."""
    client, _tenant, auth, _ = acme
    usage_log = Topics.for_namespace(settings.namespace).usage
    before = asyncio.run(end_offsets(settings, (usage_log,)))
    answers = [client.get(f"/api/v1/spend/{USERS[n % len(USERS)]}", headers=auth) for n in range(1000)]
    assert {a.status_code for a in answers} == {200}
    assert asyncio.run(end_offsets(settings, (usage_log,))) == before


def test_live_spend_includes_what_was_published_just_before_the_question(acme, settings):
    client, tenant, auth, _ = acme
    before = exact(client.get("/api/v1/spend/ana", headers=auth))
    at = T0 + timedelta(days=44, hours=23)  # after every generated call: still the December period
    publish(settings, [usage("ana", 999, tenant=tenant, model="gpt-4o", input_tokens=1000, output_tokens=1000, at=at)])
    after = exact(client.get("/api/v1/spend/ana", headers=auth))
    assert after["period_spend"] - before["period_spend"] == price(seed_plans(tenant)["pro"], "gpt-4o", 1000, 1000, {})
    assert after["model_tokens"]["gpt-4o"] - before["model_tokens"].get("gpt-4o", 0) == 2000


def test_history_pages_with_a_cursor_and_every_page_is_the_full_answer_in_order(acme):
    client, _tenant, auth, _ = acme
    whole = exact(client.get("/api/v1/spend/bo/history", params={"group_by": "day", "limit": 1000}, headers=auth))
    assert whole["next_cursor"] is None and len(whole["rows"]) > 5
    assert _all_pages(client, "bo", auth, group_by="day", limit=2) == whole["rows"]
    bad = client.get("/api/v1/spend/bo/history", params={"cursor": "garbage"}, headers=auth)
    assert bad.status_code == 422 and "cursor" in bad.json()["detail"]
    naive = client.get("/api/v1/spend/bo/history", params={"from": "2026-11-01T00:00:00"}, headers=auth)
    assert naive.status_code == 422 and "zone" in naive.json()["detail"]
    infinite = base64.urlsafe_b64encode(b'["plan_version", "pro", Infinity]').decode()
    bad = client.get("/api/v1/spend/bo/history", params={"group_by": "plan_version", "cursor": infinite}, headers=auth)
    assert bad.status_code == 422, bad.text
    # A user no usage event can name is answered at once, not after the ledger's timeout.
    assert client.get(f"/api/v1/spend/{'x' * 129}", headers=auth).status_code == 404


def test_reports_are_scoped_to_the_key_s_tenant(acme):
    client, _tenant, auth, other = acme
    daily = exact(client.get("/api/v1/reports/daily", headers=auth))["rows"]
    spend = defaultdict(Decimal)
    for row in daily:
        spend[row["model"]] += row["spend"]
    top = exact(client.get("/api/v1/reports/top", params={"limit": 3}, headers=auth))["rows"]
    assert sorted(r["user"] for r in top) == sorted(USERS)
    assert sum(r["spend"] for r in top) == sum(spend.values()) > 0
    for name in ("gates", "limits", "margins"):
        assert client.get(f"/api/v1/reports/{name}", headers=auth).status_code == 200, name
    # Another tenant sees none of it: no user, no rows.
    assert client.get("/api/v1/spend/ana", headers=other).status_code == 404
    assert client.get("/api/v1/spend/ana/history", headers=other).json() == {"rows": [], "next_cursor": None}
    assert client.get("/api/v1/reports/daily", headers=other).json()["rows"] == []
    assert client.get("/api/v1/reports/nonsense", headers=auth).status_code == 422


def _all_pages(client, user, auth, **params):  # type: ignore[no-untyped-def]
    rows, cursor = [], None
    while True:
        page = client.get(f"/api/v1/spend/{user}/history", params={**params, **({"cursor": cursor} if cursor else {})},
                          headers=auth)
        assert page.status_code == 200, page.text
        rows += exact(page)["rows"]
        if (cursor := page.json()["next_cursor"]) is None:
            return rows


def exact(response):  # type: ignore[no-untyped-def]
    """The body with every number that has a fraction read as an exact Decimal (money is never a float)."""
    return json.loads(response.text, parse_float=Decimal)
