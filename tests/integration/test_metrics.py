"""Metrics and health on the real broker: each process's counters equal what the test published.

The worker and the projector run as processes with their HTTP server on a free
port; the test scrapes ``/metrics`` as Prometheus would and compares the counters
with the numbers of records it published, made duplicate, conflicting or invalid,
and with what the output topics hold.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ledger.api.app import create_api
from ledger.control.store import ControlStore
from ledger.events import AnyCommand, UsageRecorded
from streams.codecs import encode
from tests.conftest import ProjectorProcess, free_port, wait_processed
from tests.factories import assigned, published, seed_plans, usage
from tests.kafka_io import gates, publish, publish_raw, rejections

pytestmark = pytest.mark.integration

USERS = 40
EVENTS = 2000
SCRAPE_WAIT_S = 60.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> Samples:
    return parse(httpx.get(url, timeout=5).raise_for_status().text)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = SCRAPE_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not seen within {timeout_s:.0f}s"
        time.sleep(0.2)


def answers(url: str, status: int) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == status
    except httpx.TransportError:
        return False


def test_worker_and_projector_count_what_was_published(settings, worker_factory):
    rng = random.Random(11)
    plans = seed_plans()
    names = {f"m{i:03d}": ("free" if i % 2 else "pro") for i in range(USERS)}
    setup: list[AnyCommand] = [published(p) for p in plans.values()] + [assigned(u, plans[p]) for u, p in names.items()]
    calls: list[UsageRecorded] = [
        usage(u, n, input_tokens=rng.randint(0, 600), output_tokens=rng.randint(0, 600))
        for n in range(EVENTS) for u in [f"m{n % USERS:03d}"]]
    duplicates = rng.sample(calls, 50)
    conflicts = [usage(c.user, 0, event_id=c.event_id, input_tokens=c.input_tokens + 1, output_tokens=c.output_tokens)
                 for c in rng.sample(calls, 20)]
    not_allowed = [usage("m001", 10_000 + i, model="gpt-4o") for i in range(4)]  # m001 is on free: no gpt-4o
    no_plan = [usage("stranger", i) for i in range(2)]
    not_json = [(b"acme/m000", b"\xff not json %d" % i) for i in range(5)]
    wrong_key = [(b"acme/someone-else", encode(usage("m000", 20_000 + i))) for i in range(3)]
    # Everything is in the log before the worker starts: no rebalance can replay a record and count it twice.
    publish(settings, [*setup, *calls, *duplicates, *conflicts, *not_allowed, *no_plan])
    publish_raw(settings, [*not_json, *wrong_key])

    worker_port, projector_port = free_port(), free_port()
    no_ticks = {"LEDGER_TICK_SECONDS": "0"}  # a tick is a record too; none may appear in the counts
    worker = worker_factory(settings, env={**no_ticks, "LEDGER_METRICS_PORT": str(worker_port)}).start()
    projector = ProjectorProcess(settings, env={"LEDGER_METRICS_PORT": str(projector_port)}).start()
    worker_url, projector_url = f"http://127.0.0.1:{worker_port}", f"http://127.0.0.1:{projector_port}"
    try:
        wait_until(lambda: answers(f"{worker_url}/healthz", 200), "the worker's /healthz")
        wait_processed(settings, worker)
        projector.wait_caught_up()
        wait_until(lambda: answers(f"{worker_url}/readyz", 200), "the worker's /readyz")
        wait_until(lambda: answers(f"{projector_url}/readyz", 200), "the projector's /readyz")
        # Lag is sampled once a second: wait for a sample taken after the last batch.
        wait_until(lambda: set(by_label(scrape(f"{worker_url}/metrics"), "ledger_consumer_lag", "partition").values())
                   == {0.0}, "zero consumer lag")
        wait_until(lambda: set(by_label(scrape(f"{projector_url}/metrics"), "ledger_projector_lag", "topic").values())
                   == {0.0}, "zero projector lag")
        worker_samples = scrape(f"{worker_url}/metrics")
        projector_samples = scrape(f"{projector_url}/metrics")
    finally:
        projector.stop()

    records = len(plans) * settings.partitions + len(names) + len(calls) + len(duplicates) + len(conflicts) \
        + len(not_allowed) + len(no_plan) + len(not_json) + len(wrong_key)
    dead_letters = {"invalid_event": len(not_json), "wrong_key": len(wrong_key), "model_not_allowed": len(not_allowed),
                    "no_plan": len(no_plan), "conflict": len(conflicts)}
    rejected = len(not_json) + len(wrong_key) + len(not_allowed) + len(no_plan)
    processed = by_label(worker_samples, "ledger_events_processed_total", "result")
    assert processed == {"ok": records - len(duplicates) - len(conflicts) - rejected,
                         "duplicate": len(duplicates), "conflict": len(conflicts), "rejected": rejected,
                         "already_applied": 0}
    assert by_label(worker_samples, "ledger_dead_lettered_total", "code") == dead_letters
    assert Counter(r.code for r in rejections(settings)) == dead_letters
    raised = Counter(g.kind for g in gates(settings))
    assert {"soft_warning", "hard_block"} <= raised.keys()
    assert by_label(worker_samples, "ledger_gate_events_total", "kind") == raised
    assert worker_samples[("ledger_batch_events_sum", ())] == records
    assert worker_samples[("ledger_batch_seconds_count", ())] == worker_samples[("ledger_batch_events_count", ())] > 0
    assert {int(p) for p in by_label(worker_samples, "ledger_consumer_lag", "partition")} == set(range(settings.partitions))

    rows = by_label(projector_samples, "ledger_projector_rows_written_total", "table")
    assert rows == {"ledger_entries": len(calls), "gate_events": sum(raised.values()),
                    "rejected_events": sum(dead_letters.values())}
    lag_series = {labels for (name, labels), _ in projector_samples.items() if name == "ledger_projector_lag"}
    assert len(lag_series) == 3 * settings.partitions  # entries, gates, rejected


def test_api_health_answers_for_kafka_and_the_control_database(settings, tmp_path: Path):
    store = ControlStore(f"sqlite:///{tmp_path / 'control.db'}")
    with TestClient(create_api(settings, store=store)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"ready": True,
                                                              "checks": {"kafka": "ok", "control_database": "ok"}}
        for _ in range(3):
            assert client.get("/api/v1/config/plans").status_code == 401  # no key
        samples = parse(client.get("/metrics").raise_for_status().text)
        assert samples[("ledger_api_requests_total", (("method", "GET"), ("route", "/config/plans"),
                                                      ("status", "401")))] == 3
        assert not any(dict(labels).get("route") in ("/healthz", "/readyz", "/metrics") for _, labels in samples)

        # A control database that does not answer: nothing listens on port 1.
        client.app.state.store = ControlStore("postgresql+psycopg://ledger:secret@127.0.0.1:1/ledger")  # type: ignore[attr-defined]
        down = client.get("/readyz")
        assert down.status_code == 503
        assert down.json()["checks"]["kafka"] == "ok"
        assert down.json()["checks"]["control_database"].startswith("unreachable")
        assert "secret" not in down.text

