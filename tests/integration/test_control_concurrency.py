"""The control plane under concurrent writers, over real HTTP, on SQLite and on a real PostgreSQL.

Given many clients writing at once (and tenant B changing plans while tenant A ingests), no request
answers 500; no transaction is held while the usage log is waited on; every recorded change reaches
the log, also when the process died between its commit and its publish (the outbox relay repairs it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from ledger.api.app import create_api
from ledger.control.config import CommandLog, plan_published
from ledger.control.outbox import enqueue
from ledger.control.store import ControlStore
from ledger.events import AnyCommand, PlanAssigned, PlanPublished
from ledger.settings import Settings
from tests.factories import seed_plans
from tests.kafka_io import usage_log

pytestmark = pytest.mark.integration

PORTS = range(18300, 18400)  # this worktree's range


def _port() -> int:
    for port in PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18300-18399")


@contextmanager
def serving(settings: Settings, command_log: CommandLog | None = None) -> Iterator[str]:
    """The API on a real port (uvicorn in a thread), stopped at the end."""
    port = _port()
    server = uvicorn.Server(uvicorn.Config(create_api(settings, command_log=command_log), host="127.0.0.1",
                                           port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/api/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def db_settings(settings: Settings, store_url: str) -> Settings:
    # Private webhook addresses allowed: a test registers a loopback one (nothing is delivered).
    return dataclasses.replace(settings, database_url=store_url, webhook_allow_private=True)


def new_tenant(settings: Settings, name: str) -> tuple[str, str]:
    store = ControlStore(settings.control_url)
    store.create_schema()
    try:
        with store.session() as session:
            return session.create_tenant(name)
    finally:
        store.dispose()


async def _all(calls: Sequence[tuple[str, str, object]], base: str, key: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=httpx.Limits(max_connections=100)) as client:
        return list(await asyncio.gather(*(client.request(m, p, json=b) for m, p, b in calls)))


def statuses(responses: Sequence[httpx.Response]) -> Counter[int]:
    return Counter(r.status_code for r in responses)


def commands(settings: Settings) -> list[AnyCommand]:
    return [command for _p, _key, command in usage_log(settings)]


def test_fifty_parallel_user_creations_and_plan_patches_and_twenty_ingests_never_answer_500(db_settings):
    """The issue's repro, bigger: 8 parallel POST /users gave 4 x 500 in 50, and 3 of 20 POST /usage
    answered 500 "database is locked" while another tenant PATCHed a plan."""
    _, a = new_tenant(db_settings, "tenant-a")
    _, b = new_tenant(db_settings, "tenant-b")
    with serving(db_settings) as base:
        created = asyncio.run(_all([("POST", "/config/plans", {"plans": [{"name": "p",
                                     "cost_rates": {"m": {"input": 1, "output": 1}}}]})], base, b))[0]
        assert created.status_code == 201, created.text
        plan_id = created.json()["plans"][0]["id"]

        users = asyncio.run(_all([("POST", "/users", {"external_id": f"u{n}", "plan_id": plan_id})
                                  for n in range(50)], base, b))
        assert statuses(users) == {201: 50}, [r.text for r in users if r.status_code != 201][:3]

        patches = [("PATCH", f"/config/plans/{plan_id}", {"max_spend_per_period": n}) for n in range(1, 51)]
        ingests = [("POST", "/usage", {"events": [{"event_id": f"e{n}-{i}", "user": "x", "model": "m",
                                                   "input_tokens": 1, "output_tokens": 1} for i in range(40)]})
                   for n in range(20)]

        async def both() -> tuple[list[httpx.Response], list[httpx.Response]]:
            return await asyncio.gather(_all(patches, base, b), _all(ingests, base, a))  # type: ignore[return-value]

        patched, ingested = asyncio.run(both())
        assert statuses(patched) == {200: 50}, [r.text for r in patched if r.status_code != 200][:3]
        assert statuses(ingested) == {202: 20}, [r.text for r in ingested if r.status_code != 202][:3]
        # Every PATCH made its own version, one after the other.
        assert sorted(r.json()["version"] for r in patched) == list(range(2, 52))
        newest = asyncio.run(_all([("GET", f"/config/plans/{plan_id}", None)], base, b))[0].json()
        assert newest["version"] == 51
        print(f"\n{db_settings.control_url.split(':')[0]}: 50 POST /users {statuses(users)}, 50 PATCH "
              f"{statuses(patched)}, 20 POST /usage {statuses(ingested)}")

    log = commands(db_settings)
    versions = Counter(c.plan.version for c in log if isinstance(c, PlanPublished))
    assert versions == {v: db_settings.partitions for v in range(1, 52)}, "each version on every partition once"
    assert len([c for c in log if isinstance(c, PlanAssigned)]) == 50
    store = ControlStore(db_settings.control_url)
    with store.session() as session:
        assert session.outbox(10) == []  # all published
    store.dispose()


class HeldLog:
    """A usage log whose first publish waits until released (a slow broker)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.published: list[AnyCommand] = []

    async def publish(self, commands: Sequence[AnyCommand]) -> int:
        if commands and not self.release.is_set():
            self.entered.set()
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        self.published += commands
        return len(commands)


def test_no_transaction_is_held_while_a_publish_waits(db_settings):
    """While tenant B's PATCH waits on a slow broker, tenant A's writes answer promptly."""
    _, a = new_tenant(db_settings, "tenant-a")
    _, b = new_tenant(db_settings, "tenant-b")
    held = HeldLog()
    held.release.set()
    with serving(db_settings, command_log=held) as base:
        plan_id = asyncio.run(_all([("POST", "/config/plans", {"plans": [{"name": "p"}]})], base, b))[0] \
            .json()["plans"][0]["id"]
        held.release.clear()

        async def scenario() -> tuple[httpx.Response, list[httpx.Response], float]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                patch = asyncio.create_task(client.patch(f"/config/plans/{plan_id}", json={"trial_days": 3},
                                                         headers={"Authorization": f"Bearer {b}"}))
                while not held.entered.is_set():
                    await asyncio.sleep(0.01)
                started = time.monotonic()
                others = await _all([("POST", "/users", {"external_id": f"a{n}"}) for n in range(5)]
                                    + [("POST", "/webhooks", {"url": "http://127.0.0.1:9/hook"})], base, a)
                took = time.monotonic() - started
                held.release.set()
                return await patch, others, took

        patched, others, took = asyncio.run(scenario())
    assert statuses(others) == {201: 6}, [r.text for r in others]
    assert took < 3, f"tenant A's writes waited {took:.1f}s behind tenant B's publish"
    assert patched.status_code == 200 and patched.json()["version"] == 2


def test_a_change_recorded_but_not_published_before_a_crash_is_published_at_the_next_start(settings):
    """The outbox order: record (commit), then publish, then forget. A crash between the first two
    leaves the commands in the outbox; the API's relay publishes them when it starts."""
    tenant_id, _ = new_tenant(settings, "acme")
    plan = seed_plans(tenant_id)["free"]
    store = ControlStore(settings.control_url)
    with store.session() as session:  # what a unit of work commits before the process is killed
        session.add_plan_version(tenant_id, plan)
        enqueue(session, tenant_id, [plan_published(tenant_id, plan)])
    assert not [c for c in commands(settings) if isinstance(c, PlanPublished)]

    with serving(settings) as base:
        deadline = time.monotonic() + 30
        while store.transact(lambda s: s.outbox(10)):
            assert time.monotonic() < deadline, "the relay did not publish what the outbox held"
            time.sleep(0.1)
        assert asyncio.run(_all([("GET", "/config/plans", None)], base, _admin_key(store, tenant_id)))[0] \
            .json()["plans"][0]["version"] == 1
    store.dispose()
    published = [c for c in commands(settings) if isinstance(c, PlanPublished)]
    assert [(c.plan.plan_id, c.plan.version) for c in published] == [(plan.plan_id, 1)] * settings.partitions


def _admin_key(store: ControlStore, tenant_id: str) -> str:
    from ledger.control.keys import ALL_SCOPES

    with store.session() as session:
        return session.create_key(tenant_id, ALL_SCOPES)
