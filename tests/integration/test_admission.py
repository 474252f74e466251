"""Pre-call checks over HTTP on the real broker: the budget admits exactly what it covers,
where a check-then-record client overshoots; and the clock lifts a block with no traffic."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest

from ledger.control.store import ControlStore
from ledger.events import ClockTicked, UsageRecorded
from ledger.settings import Settings
from projections.projector import connect
from tests.conftest import ROOT, wait_processed
from tests.integration.test_pipeline import project
from tests.kafka_io import gates, publish

pytestmark = pytest.mark.integration

METERED = {"plans": [{"name": "metered", "max_spend_per_period": 1.00,
                      "cost_rates": {"m": {"input": 0.01, "output": 0.01}}}]}
CALL_TOKENS = 1000  # $0.01 a call: the $1.00 budget covers exactly 100 calls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def api_server(settings: Settings) -> Iterator[tuple[str, str]]:
    """`ledger api` in its own process; yields (base url, an all-scopes key)."""
    port = free_port()
    env = {**os.environ, "LEDGER_HOME": str(settings.home), "LEDGER_NAMESPACE": settings.namespace,
           "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap, "LEDGER_API_PORT": str(port)}
    store = ControlStore(settings.control_url)
    store.create_schema()
    with store.session() as session:
        _, key = session.create_tenant("acme")
    log = open(settings.home / "api.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "ledger.cli.main", "api"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    from ledger.cli.stack import wait_for_http

    try:
        wait_for_http(f"http://127.0.0.1:{port}/docs", 60)
        yield f"http://127.0.0.1:{port}/api/v1", key
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_until_checks_are_answered(base: str, key: str, timeout_s: float = 90) -> None:
    """Return once the worker answers checks (it owns its partitions).

    A check sent before that waits out the API's answer timeout (504) and stays on the log, where the worker
    applies it when it catches up: a reserving one would still hold its estimate. The probe is a plain check
    for a user with no plan: it holds nothing and changes no account.
    """
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        while (answer := http.post("/check", json={"user": "no-one", "model": "m"})).status_code == 504:
            assert time.monotonic() < deadline, f"no check was answered in {timeout_s}s"
    assert answer.status_code == 402, answer.text


def test_200_concurrent_reserving_checks_admit_exactly_the_100_the_budget_covers(settings, worker, api_server):
    base, key = api_server
    wait_until_checks_are_answered(base, key)
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=auth, timeout=30) as http:
        plan_id = http.post("/config/plans", json=METERED).json()["plans"][0]["id"]
        start = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        for user in ("careful", "naive"):
            assert http.post("/users", json={"external_id": user, "plan_id": plan_id, "period_start": start}
                             ).status_code == 201
    tenant_id = _tenant_of(settings)

    async def reserving() -> list[int]:
        async with httpx.AsyncClient(base_url=base, headers=auth, timeout=60) as client:
            answers = await asyncio.gather(*[
                client.post("/check", json={"user": "careful", "model": "m", "input_tokens": CALL_TOKENS,
                                            "reserve": True}) for _ in range(200)])
        return [a.status_code for a in answers]

    async def naive_looks() -> list[int]:
        """Read spend (a check that holds nothing) and compare: the first half of the race every peer loses."""
        async with httpx.AsyncClient(base_url=base, headers=auth, timeout=60) as client:
            looks = await asyncio.gather(*[
                client.post("/check", json={"user": "naive", "model": "m", "input_tokens": CALL_TOKENS})
                for _ in range(200)])
        return [n for n, look in enumerate(looks) if look.status_code == 200]

    statuses = asyncio.run(reserving())
    admitted, refused = statuses.count(200), statuses.count(402)
    passed = asyncio.run(naive_looks())
    now = datetime.now(UTC)  # ... then record every call that looked affordable
    publish(settings, [UsageRecorded(event_id=f"naive-{n}", tenant=tenant_id, user="naive", model="m",
                                     input_tokens=CALL_TOKENS, output_tokens=0, occurred_at=now) for n in passed])
    naive_passed = len(passed)
    wait_processed(settings, worker)
    project(settings)
    with connect(settings.history_path, read_only=True) as con:
        naive_spend = con.execute("SELECT sum(cost) FROM ledger_entries WHERE user_id = 'naive'").fetchone()[0]
    print(f"\nreserving checks: {admitted} admitted, {refused} refused (402) of 200; budget covers 100"
          f"\ncheck-then-record: {naive_passed} of 200 passed the check, recorded spend ${naive_spend} "
          f"against a $1.00 budget")
    assert (admitted, refused) == (100, 100)
    assert naive_passed > 100 and naive_spend > Decimal("1.00")


def _tenant_of(settings: Settings) -> str:
    with ControlStore(settings.control_url).session() as session:
        tenant_id = session.tenant_id("acme")
    assert tenant_id is not None
    return tenant_id


def test_a_user_blocked_at_period_end_is_unblocked_at_the_next_period_start_with_no_traffic(settings, worker,
                                                                                            api_server):
    base, key = api_server
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        plan_id = http.post("/config/plans", json=METERED).json()["plans"][0]["id"]
        http.post("/users", json={"external_id": "u", "plan_id": plan_id, "period_start": "2026-10-01T00:00:00Z"})
        tenant_id = _tenant_of(settings)
        publish(settings, [UsageRecorded(event_id=f"u-{n}", tenant=tenant_id, user="u", model="m",
                                         input_tokens=50_000, output_tokens=0,
                                         occurred_at=datetime(2026, 10, 31, 23, n, tzinfo=UTC)) for n in range(2)])
        wait_processed(settings, worker)
        # The clock, not traffic, crosses into November; a second tick changes nothing.
        publish(settings, [ClockTicked(event_id=f"tick-{n}", occurred_at=datetime(2026, 11, 1, 0, n, tzinfo=UTC))
                           for n in (1, 2)])
        wait_processed(settings, worker)
    kinds = sorted((g.kind, g.dimension, g.cause_event_id) for g in gates(settings))
    assert kinds == [("hard_block", "period_spend", "u-1"), ("soft_warning", "period_spend", "u-1"),
                     ("unblocked", "period_spend", "tick-1")]
