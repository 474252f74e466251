"""The webhooks API: the secret is shown once, another tenant's ids answer 404, URLs are checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from ledger.api.app import create_api
from ledger.control.keys import Scope
from ledger.control.store import WEBHOOK_URL_LENGTH_MAX, WEBHOOKS_PER_TENANT_MAX, ControlStore
from ledger.settings import Settings
from tests.integration.test_config_api import Tenant

pytestmark = pytest.mark.integration


def tenant(client: TestClient, store: ControlStore, name: str) -> Tenant:
    with store.session() as session:
        tenant_id, key = session.create_tenant(name)
    return Tenant(client, tenant_id, key)


@pytest.fixture
def two_tenants(settings: Settings) -> Iterator[tuple[Tenant, Tenant, ControlStore]]:
    # Opted in to private addresses: these tests are not about them, and example.com needs no name server then.
    store = ControlStore(settings.control_url)
    with TestClient(create_api(dataclasses.replace(settings, webhook_allow_private=True), store=store)) as client:
        yield tenant(client, store, "acme"), tenant(client, store, "globex"), store


def test_the_secret_is_in_the_creation_answer_only(two_tenants) -> None:  # type: ignore[no-untyped-def]
    acme, _, _ = two_tenants
    created = acme.call("POST", "/webhooks", json={"url": "https://example.com/hooks", "description": "ops"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["secret"].startswith("whsec_")
    assert (body["url"], body["description"], body["enabled"]) == ("https://example.com/hooks", "ops", True)

    one = acme.call("GET", f"/webhooks/{body['id']}")
    listed = acme.call("GET", "/webhooks")
    assert one.status_code == listed.status_code == 200
    assert one.json() == {k: v for k, v in body.items() if k != "secret"}
    assert listed.json() == {"webhooks": [one.json()]}
    assert body["secret"] not in one.text + listed.text
    assert acme.call("GET", f"/webhooks/{body['id']}/deliveries").json() == {"webhook_id": body["id"],
                                                                             "deliveries": []}


def test_another_tenants_webhook_answers_404_everywhere_and_is_untouched(two_tenants) -> None:  # type: ignore[no-untyped-def]
    acme, globex, _ = two_tenants
    hook = acme.call("POST", "/webhooks", json={"url": "https://example.com/acme"}).json()
    for method, path in (("GET", f"/webhooks/{hook['id']}"), ("DELETE", f"/webhooks/{hook['id']}"),
                         ("GET", f"/webhooks/{hook['id']}/deliveries")):
        answer = globex.call(method, path)
        assert answer.status_code == 404, (method, path, answer.text)
        assert hook["id"] in answer.json()["detail"]
    assert globex.call("GET", "/webhooks").json() == {"webhooks": []}
    assert acme.call("GET", f"/webhooks/{hook['id']}").status_code == 200

    assert acme.call("DELETE", f"/webhooks/{hook['id']}").status_code == 204
    assert acme.call("GET", f"/webhooks/{hook['id']}").status_code == 404
    assert acme.call("DELETE", f"/webhooks/{hook['id']}").status_code == 404


def test_webhooks_need_an_admin_key(two_tenants) -> None:  # type: ignore[no-untyped-def]
    acme, _, store = two_tenants
    with store.session() as session:
        ingest = session.create_key(acme.id, frozenset({Scope.ingest, Scope.read}))
    assert acme.call("POST", "/webhooks", key=ingest, json={"url": "https://example.com/x"}).status_code == 403
    assert acme.call("GET", "/webhooks", key=ingest).status_code == 403
    assert acme.call("GET", "/webhooks", key=None).status_code == 401


BAD_BODIES = {
    "ftp scheme": ({"url": "ftp://example.com/x"}, "scheme"),
    "no scheme": ({"url": "example.com/x"}, "scheme"),
    "no host": ({"url": "https:///x"}, "host"),
    "credentials": ({"url": "https://user:pw@example.com/x"}, "credentials"),
    "bad port": ({"url": "https://example.com:99999/x"}, "port"),
    "whitespace": ({"url": "https://example.com/a b"}, "whitespace"),
    "too long": ({"url": "https://example.com/" + "a" * WEBHOOK_URL_LENGTH_MAX}, "url"),
    "no url": ({"description": "x"}, "url"),
    "unknown field": ({"url": "https://example.com/x", "secret": "whsec_mine"}, "secret"),
    "url not a string": ({"url": 7}, "url"),
}


@pytest.mark.parametrize(("body", "named"), BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_a_bad_url_is_a_422_that_names_the_problem(two_tenants, body, named) -> None:  # type: ignore[no-untyped-def]
    acme, _, _ = two_tenants
    answer = acme.call("POST", "/webhooks", json=body)
    assert answer.status_code == 422, answer.text
    assert named in answer.json()["detail"].lower()
    assert acme.call("GET", "/webhooks").json() == {"webhooks": []}


def test_a_tenant_has_at_most_the_bounded_number_of_webhooks(two_tenants) -> None:  # type: ignore[no-untyped-def]
    acme, _, _ = two_tenants
    for n in range(WEBHOOKS_PER_TENANT_MAX):
        assert acme.call("POST", "/webhooks", json={"url": f"https://example.com/{n}"}).status_code == 201
    refused = acme.call("POST", "/webhooks", json={"url": "https://example.com/more"})
    assert refused.status_code == 409 and str(WEBHOOKS_PER_TENANT_MAX) in refused.json()["detail"]


@pytest.mark.parametrize(("url", "allowed"), [
    ("http://127.0.0.1:8080/hooks", False),
    ("http://localhost/hooks", False),
    ("http://[::1]/hooks", False),
    ("http://[::ffff:10.0.0.1]/hooks", False),
    ("http://10.1.2.3/hooks", False),
    ("http://192.168.0.1/hooks", False),
    ("http://169.254.169.254/latest/meta-data", False),  # cloud metadata
    ("http://100.64.0.1/hooks", False),                   # carrier-grade NAT
    ("http://0.0.0.0/hooks", False),
    # IPv6 forms that carry a private IPv4 address (judged by it), or lead to no public address at all.
    ("http://[64:ff9b::a9fe:a9fe]/latest/meta-data", False),
    ("http://[64:ff9b::7f00:1]/hooks", False),
    ("http://[64:ff9b:1::a9fe:a9fe]/hooks", False),
    ("http://[2002:7f00:1::]/hooks", False),
    ("http://[::127.0.0.1]/hooks", False),
    ("http://[::ffff:0:a9fe:a9fe]/hooks", False),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hooks", False),  # Teredo, client 127.0.0.1
    ("https://93.184.215.14/hooks", True),                 # a public address (no DNS needed)
    ("https://[64:ff9b::5db8:d70e]/hooks", True),           # NAT64 of that public address
])
def test_with_private_addresses_refused_only_public_ones_register(settings: Settings, url: str, allowed: bool) -> None:
    strict = settings  # strict is the default
    store = ControlStore(strict.control_url)
    with TestClient(create_api(strict, store=store)) as client:
        acme = tenant(client, store, "acme")
        answer = acme.call("POST", "/webhooks", json={"url": url})
    if allowed:
        assert answer.status_code == 201, answer.text
    else:
        assert answer.status_code == 422, answer.text
        assert "non-public" in answer.json()["detail"]
    # A deployment that opts in (`ledger up`, the tests that deliver to loopback) accepts them.
    with TestClient(create_api(dataclasses.replace(settings, webhook_allow_private=True), store=store)) as client:
        assert Tenant(client, acme.id, acme.key).call("POST", "/webhooks", json={"url": url}).status_code == 201
