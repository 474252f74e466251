"""Hostile requests to the API answer a clear 4xx, /metrics stays bounded, and every answer carries the security
headers. The app runs with its lifespan on the real broker (TestClient); each case answered 500, 504 or grew
/metrics without bound on the code before it."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import string
import uuid
from collections.abc import Iterator

import pytest
import yaml
from fastapi.testclient import TestClient

from ledger.api.app import create_api
from ledger.api.wire import JSON_DEPTH_MAX
from ledger.control.store import ControlStore
from ledger.settings import Settings
from tests.factories import SEED_PLANS_JSON

pytestmark = pytest.mark.integration

METRICS_BYTES_MAX = 200_000
MADE_UP_METHODS = 1_000
METHOD_LENGTH = 10_000


@pytest.fixture
def client(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    store = ControlStore(settings.control_url)
    # Private addresses allowed: a test registers a loopback webhook, and nothing is delivered here.
    api_settings = dataclasses.replace(settings, webhook_allow_private=True)
    with TestClient(create_api(api_settings, store=store), raise_server_exceptions=False) as http:
        with store.session() as session:
            _, key = session.create_tenant("acme")
        yield http, {"Authorization": f"Bearer {key}"}
    store.dispose()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def event(n: int, **fields: object) -> dict[str, object]:
    return {"event_id": f"e-{n}-{uuid.uuid4().hex[:6]}", "user": "u", "model": "gpt-4o-mini", "input_tokens": 1,
            "output_tokens": 1, "occurred_at": "2026-11-02T10:00:00Z", **fields}


def with_tools(tools: str) -> str:
    """One valid event whose ``tools`` are ``tools``, as JSON text."""
    return json.dumps(event(1))[:-1] + ', "tools": ' + tools + "}"


def post_raw(http: TestClient, auth: dict[str, str], path: str, body: str, content_type: str = "application/json"):  # type: ignore[no-untyped-def]
    return http.post(f"/api/v1{path}", content=body.encode("utf-8", "surrogatepass"),
                     headers={**auth, "Content-Type": content_type})


@pytest.mark.parametrize("depth", [1_200, 100_000])
def test_a_usage_body_nested_past_the_stack_is_a_422(client, depth):
    http, auth = client
    assert post_raw(http, auth, "/usage", nested(depth)).status_code == 422  # not an object: refused at once
    for body in ('{"events": ' + nested(depth) + "}", with_tools(nested(depth))):
        answer = post_raw(http, auth, "/usage", body)
        assert answer.status_code == 422, (depth, body[:60], answer.status_code, answer.text)
        assert "deep" in answer.json()["detail"]


def test_one_event_nested_past_the_bound_is_a_422_that_names_it(client):
    http, auth = client
    answer = post_raw(http, auth, "/usage", with_tools(nested(JSON_DEPTH_MAX)))
    assert answer.status_code == 422 and f"at most {JSON_DEPTH_MAX} levels" in answer.json()["detail"], answer.text


@pytest.mark.parametrize("depth", [JSON_DEPTH_MAX + 1, 500])
def test_in_a_batch_only_the_deeply_nested_event_is_rejected(client, depth):
    http, auth = client
    good = event(1)
    body = '{"events": [' + json.dumps(good) + ', {"event_id": "deep", "tools": ' + nested(depth) + "}]}"
    answer = post_raw(http, auth, "/usage", body)
    assert answer.status_code == 202, answer.text
    accepted, rejected = answer.json()["outcomes"]
    assert accepted == {"event_id": good["event_id"], "status": "accepted", "reason": None}
    assert rejected["event_id"] == "deep" and rejected["status"] == "rejected" and "deep" in rejected["reason"]


@pytest.mark.parametrize("body,content_type", [
    (nested(100_000), "application/json"), ('[{"tier_code": ' + nested(5_000) + "}]", "application/json"),
    ("tier_code: " + nested(5_000), "application/yaml"),
    # Block style nests by indentation: no bracket to count, so the parser's own recursion is what stops it.
    ("".join(" " * n + "a:\n" for n in range(1_300)), "application/yaml"),
])
def test_a_deeply_nested_tiers_body_is_a_422(client, body, content_type):
    http, auth = client
    answer = post_raw(http, auth, "/config/tiers", body, content_type)
    assert answer.status_code == 422, (answer.status_code, answer.text[:200])


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


@pytest.mark.parametrize("group_by,cursor", [
    ("day", _cursor("[" * 1_500)),  # unclosed, to fit the cursor's 2048 characters: the parser recurses first
    ("plan_version", _cursor(f'["plan_version", "pro", {2 ** 70}]')),
    ("plan_version", _cursor(f'["plan_version", "pro", {-2 ** 63 - 1}]')),
    ("plan_version", _cursor('["plan_version", "pro", 1e400]')),
    ("plan_version", _cursor('["plan_version", "pro", true]')),
    ("model", _cursor('["model", "\\ud800"]')),
    ("session", _cursor('["session", "\\udfff", "2026-11-02T10:00:00+00:00"]')),
    ("model", _cursor('["model", ["not", "text"]]')),
    ("session", _cursor('["session", "s", "99999-01-01"]')),
])
def test_a_hostile_history_cursor_is_a_422(client, group_by, cursor):
    http, auth = client
    answer = http.get("/api/v1/spend/u/history", params={"group_by": group_by, "cursor": cursor}, headers=auth)
    assert answer.status_code == 422, (answer.status_code, answer.text[:200])
    assert "not a cursor" in answer.json()["detail"]


FAR = ["9999-12-31T23:59:59Z", "9999-12-31T23:59:59-05:00", "2100-01-01T00:00:00Z", "0001-01-01T00:00:00+05:00",
       "1969-12-31T23:59:59Z"]


@pytest.mark.parametrize("when", FAR)
def test_times_the_period_arithmetic_cannot_hold_are_a_422(client, when):
    http, auth = client
    plan_id = http.post("/api/v1/config/plans", content=SEED_PLANS_JSON, headers=auth).json()["plans"][0]["id"]
    answer = http.post("/api/v1/users", json={"external_id": f"u-{uuid.uuid4().hex[:6]}", "plan_id": plan_id,
                                              "period_start": when}, headers=auth)
    assert answer.status_code == 422 and "period_start" in answer.json()["detail"], answer.text
    user = http.post("/api/v1/users", json={"external_id": f"u-{uuid.uuid4().hex[:6]}"}, headers=auth).json()
    answer = http.post(f"/api/v1/users/{user['id']}/subscription", json={"plan_id": plan_id, "period_start": when},
                       headers=auth)
    assert answer.status_code == 422 and "outside the times" in answer.json()["detail"], answer.text
    answer = http.post("/api/v1/usage", json=event(1, occurred_at=when), headers=auth)
    assert answer.status_code == 422 and "occurred_at" in answer.json()["detail"], answer.text
    batch = http.post("/api/v1/usage", json={"events": [event(1), event(2, occurred_at=when)]}, headers=auth)
    assert [o["status"] for o in batch.json()["outcomes"]] == ["accepted", "rejected"]


def test_metrics_stay_bounded_after_1000_requests_with_made_up_methods(client):
    http, _ = client
    rng = random.Random(14)
    for n in range(MADE_UP_METHODS):
        method = "".join(rng.choices(string.ascii_uppercase, k=METHOD_LENGTH))
        http.request(method, rng.choice(["/api/v1/config/plans", f"/api/v1/users/{n}", f"/made/up/{n}", "/"]))
    scrape = http.get("/metrics")
    print(f"\n/metrics after {MADE_UP_METHODS} made-up {METHOD_LENGTH}-byte methods: {len(scrape.content)} bytes")
    assert scrape.status_code == 200 and len(scrape.content) < METRICS_BYTES_MAX
    assert 'method="other"' in scrape.text and "AAAA" not in scrape.text
    assert not any(f"/made/up/{n}" in scrape.text for n in range(MADE_UP_METHODS))


REQUIRED = {"x-content-type-options": "nosniff", "x-frame-options": "DENY"}


def _secure(answer) -> None:  # type: ignore[no-untyped-def]
    for name, value in REQUIRED.items():
        assert answer.headers.get(name) == value, (answer.request.url, name, answer.headers)
    csp = answer.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, csp


def test_every_answer_has_the_security_headers_and_secrets_are_not_stored(client):
    http, auth = client
    answers = [http.get("/docs"), http.get("/openapi.json"), http.get("/healthz"), http.get("/metrics"),
               http.get("/docs/assets/swagger-ui-bundle.js"), http.get("/api/v1/config/plans"),
               http.get("/api/v1/config/plans", headers=auth), http.get("/nowhere"),
               post_raw(http, auth, "/usage", "{"), http.request("BREW", "/api/v1/usage")]
    for answer in answers:
        _secure(answer)
    created = http.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}, headers=auth)
    assert created.status_code == 201 and created.json()["secret"]
    _secure(created)
    assert created.headers["cache-control"] == "no-store"
    assert http.get("/api/v1/config/plans", headers=auth).headers["cache-control"] == "no-store"


def test_the_docs_page_loads_nothing_from_another_origin(client):
    http, _ = client
    page = http.get("/docs")
    assert page.status_code == 200
    sources = [part.split('"')[1] for part in page.text.split(" src=")[1:] + page.text.split(" href=")[1:]]
    assert sources and all(s.startswith("/docs/assets/") for s in sources), sources
    assert "<script>" not in page.text  # no inline script: the CSP allows scripts from this origin only
    assert "script-src 'self';" in page.headers["content-security-policy"]
    for source in sources:
        asset = http.get(source)
        assert asset.status_code == 200 and asset.content, source
    assert "SwaggerUIBundle" in http.get("/docs/assets/swagger-ui-bundle.js").text
    spec = http.get("/openapi.json").json()
    assert spec["paths"]


def test_tiers_yaml_still_loads(client):
    """The depth check counts brackets: the tiers guide's YAML (no deep nesting) still passes."""
    http, auth = client
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "examples" / "tiers.yaml").read_text()
    assert list(yaml.safe_load_all(text))
    answer = post_raw(http, auth, "/config/tiers", text, "application/yaml")
    assert answer.status_code == 201, answer.text
