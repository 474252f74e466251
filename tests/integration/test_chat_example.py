"""The chat backend example (examples/chat_backend) against the real stack and the fake model server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest
from fastapi.testclient import TestClient

from examples.chat_backend.__main__ import PLAN
from examples.chat_backend.app import ChatSettings, create_app
from examples.chat_backend.fake_model import FakeModel
from tests.conftest import WorkerProcess, wait_processed
from tests.integration import test_admission

pytestmark = pytest.mark.integration
ledger_api = test_admission.api_server  # a fixture: `ledger api` in its own process, and its key
SECRET = "whsec_" + "c2VjcmV0LWZvci10aGUtY2hhdC1leGFtcGxl"
CHATS_MAX = 100


@pytest.fixture
def backend(worker: WorkerProcess, ledger_api: tuple[str, str]) -> Iterator[tuple[TestClient, FakeModel, str]]:
    base, key = ledger_api
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        plan_id = http.post("/config/plans", json=PLAN).json()["plans"][0]["id"]
        assert http.post("/users", json={"external_id": "alice", "plan_id": plan_id}).status_code == 201
    test_admission.wait_until_checks_are_answered(base, key)
    with FakeModel() as model:
        settings = ChatSettings(ledger_url=base.removesuffix("/api/v1"), api_key=key, model_url=model.url,
                                webhook_secret=SECRET)
        with TestClient(create_app(settings)) as client:
            yield client, model, base


def test_alice_chats_until_her_budget_blocks_her_and_the_model_is_not_called_after(settings, worker, backend):
    client, model, _ = backend
    statuses, warnings = [], []
    for _ in range(CHATS_MAX):
        answer = client.post("/chat", json={"user": "alice", "message": "tell me about budgets " * 40})
        statuses.append(answer.status_code)
        if answer.status_code != 200:
            break
        warnings.append(answer.json()["warning"])
    wait_processed(settings, worker)

    assert statuses[-1] == 402 and set(statuses[:-1]) == {200}
    assert model.requests == len(statuses) - 1  # the blocked chat never reached the model
    assert warnings[0] is None and warnings[-1] is not None and "soft threshold" in warnings[-1]
    blocked = client.post("/chat", json={"user": "alice", "message": "one more?"})
    assert blocked.status_code == 402 and blocked.json()["dimension"] == "period_spend"
    assert model.requests == len(statuses) - 1
    assert client.post("/chat", json={"user": "alice"}).status_code == 422


def test_gate_webhooks_are_verified(backend):
    webhooks = pytest.importorskip("ledger_sdk.webhooks", reason="ledger_sdk.webhooks is built on the webhooks branch")
    client, _, _ = backend
    body = b'{"gate_id": "g1", "user": "alice", "kind": "hard_block", "dimension": "period_spend"}'  # a GateEvent
    now = int(time.time())

    def headers(timestamp: int, msg_id: str = "msg_1", payload: bytes = body) -> dict[str, str]:
        return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
                "webhook-signature": webhooks.sign(SECRET, msg_id, timestamp, payload)}

    assert client.post("/webhooks/ledger", content=body, headers=headers(now)).status_code == 204
    tampered = body.replace(b"hard_block", b"unblocked")
    assert client.post("/webhooks/ledger", content=tampered, headers=headers(now)).status_code == 400
    assert client.post("/webhooks/ledger", content=body, headers=headers(now - 3600)).status_code == 400


def test_the_budget_page_shows_what_is_left(settings, worker, backend):
    client, _, base = backend
    if "/api/v1/spend/{user}" not in httpx.get(base.removesuffix("/api/v1") + "/openapi.json").json()["paths"]:
        pytest.skip("GET /api/v1/spend/{user} lands with issue 5 (the lead's branch)")
    assert client.post("/chat", json={"user": "alice", "message": "hello"}).status_code == 200
    wait_processed(settings, worker)
    page = client.get("/users/alice/budget").json()
    (limit,) = [x for x in page["limits"] if x["dimension"] == "period_spend"]
    assert Decimal(limit["limit"]) == Decimal("0.002") and Decimal(limit["used"]) == Decimal(page["period_spend"]) > 0
    assert Decimal(limit["remaining"]) == Decimal(limit["limit"]) - Decimal(limit["used"]) and page["status"] == "ok"
    assert client.get("/users/nobody/budget").status_code == 404
