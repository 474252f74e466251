"""HTTP ingestion (POST /api/v1/usage) against a real broker and a real database: one outcome per
event, every accepted event in the usage log exactly once, retries answered `duplicate`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import msgspec
import pytest
from aiokafka.errors import KafkaConnectionError
from fastapi.testclient import TestClient

from ledger.api.app import create_api
from ledger.api.usage import EVENTS_PER_REQUEST_MAX
from ledger.control.keys import Scope
from ledger.control.store import ControlStore
from ledger.events import UsageRecorded, user_key
from ledger.settings import Settings
from ledger_sdk.envelopes import ENVELOPE_KEY
from streams.topics import partition_for_key
from tests.kafka_io import usage_log

pytestmark = pytest.mark.integration


def event(n: int, **changes: object) -> dict[str, object]:
    return {"event_id": f"e-{n}", "user": "u42", "model": "gpt-4o-mini", "input_tokens": 1000, "output_tokens": 200,
            "occurred_at": "2026-11-02T10:00:00Z", **changes}


@pytest.fixture
def api(settings: Settings) -> Iterator[tuple[TestClient, ControlStore, str, str]]:
    store = ControlStore(settings.control_url)
    with TestClient(create_api(settings, store=store)) as client:
        with store.session() as session:
            tenant_id, key = session.create_tenant("acme")
        yield client, store, tenant_id, key


def post(client: TestClient, key: str, body: object) -> tuple[int, object]:
    response = client.post("/api/v1/usage", json=body, headers={"Authorization": f"Bearer {key}"})
    return response.status_code, response.json()


def logged(settings: Settings) -> list[tuple[bytes, UsageRecorded]]:
    """(key the user's records are routed by, command) of every command on the usage log, checked to be in its
    user's partition; an envelope's commands share a record, so its key is theirs only for a plain record."""
    out = []
    for partition, key, command in usage_log(settings):
        assert isinstance(command, UsageRecorded)
        routed_by = user_key(command.tenant, command.user).encode()
        assert partition == partition_for_key(routed_by, settings.partitions)
        assert key in (routed_by, ENVELOPE_KEY)
        out.append((routed_by, command))
    return out


def test_a_batch_answers_one_outcome_per_event_and_publishes_each_accepted_event_once(api, settings):
    client, _, tenant_id, key = api
    batch = [event(1), event(2, input_tokens=-5), event(3, tenant="other"), event(1), event(4),
             event(4, output_tokens=999), {"user": "u42"}]

    status, body = post(client, key, {"events": batch})

    assert status == 202
    outcomes = [(o["event_id"], o["status"]) for o in body["outcomes"]]
    assert outcomes == [("e-1", "accepted"), ("e-2", "rejected"), ("e-3", "rejected"), ("e-1", "duplicate"),
                        ("e-4", "accepted"), ("e-4", "conflict"), (None, "rejected")]
    reasons = [o["reason"] for o in body["outcomes"]]
    assert "input_tokens" in reasons[1] and "tenant" in reasons[2] and "event_id" in reasons[6]

    # The retry of the whole batch publishes nothing new; a changed payload under a known id is a conflict.
    status, again = post(client, key, {"events": [event(1), event(4), event(1, model="gpt-4o")]})
    assert status == 202
    assert [o["status"] for o in again["outcomes"]] == ["duplicate", "duplicate", "conflict"]

    records = logged(settings)
    assert Counter(c.event_id for _, c in records) == {"e-1": 1, "e-4": 1}
    for record_key, command in records:
        assert record_key == f"{tenant_id}/u42".encode() and command.tenant == tenant_id
        sent = {**event(int(command.event_id.removeprefix("e-"))), "type": "usage", "tenant": tenant_id}
        assert command == msgspec.json.decode(msgspec.json.encode(sent), type=UsageRecorded)  # the first payload


def test_a_single_event_is_recorded_and_a_single_invalid_event_answers_422(api, settings):
    client, _, _, key = api
    assert post(client, key, event(7)) == (202, {"outcomes": [{"event_id": "e-7", "status": "accepted",
                                                                "reason": None}]})
    status, body = post(client, key, event(8, output_tokens="many"))
    assert status == 422 and "output_tokens" in body["detail"]
    assert [c.event_id for _, c in logged(settings)] == ["e-7"]


@pytest.mark.parametrize("body, fragment", [
    ({"events": []}, "between 1 and"),
    ({"events": [event(n) for n in range(EVENTS_PER_REQUEST_MAX + 1)]}, "between 1 and"),
    ({"events": "nope"}, "events"),
    ([event(1)], "usage event"),
])
def test_a_malformed_request_answers_422_and_publishes_nothing(api, settings, body, fragment):
    client, _, _, key = api
    status, answer = post(client, key, body)
    assert status == 422 and fragment in answer["detail"], answer
    assert logged(settings) == []


def test_a_read_only_key_cannot_ingest(api):
    client, store, tenant_id, _ = api
    with store.session() as session:
        reader = session.create_key(tenant_id, frozenset({Scope.read}))
    assert post(client, reader, event(1))[0] == 403


def test_an_event_whose_publish_failed_is_not_remembered_so_its_retry_is_accepted(api, settings, monkeypatch):
    client, store, tenant_id, key = api
    log = client.app.state.log
    publish, attempts = log.publish, []

    async def refused_once(commands):  # type: ignore[no-untyped-def]
        attempts.append(commands)
        if len(attempts) == 1:
            raise KafkaConnectionError("injected: the broker refused the batch")
        return await publish(commands)

    monkeypatch.setattr(log, "publish", refused_once)
    status, body = post(client, key, {"events": [event(1)]})
    assert status == 503 and "retry" in body["detail"]
    with store.session() as session:
        assert session.ingested(tenant_id, ["e-1"]) == {}  # remembered only once the broker has it

    assert post(client, key, {"events": [event(1)]})[1]["outcomes"][0]["status"] == "accepted"
    assert [c.event_id for _, c in logged(settings)] == ["e-1"]
    with store.session() as session:
        assert list(session.ingested(tenant_id, ["e-1"])) == ["e-1"]
