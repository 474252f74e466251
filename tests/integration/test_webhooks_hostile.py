"""Webhooks against a hostile tenant, on the real broker and real sockets on loopback (issue 14):

- the delivery log keeps status codes and short error classes, never a receiver's body or a socket message;
- a strict deployment refuses, at delivery, every address form that leads to a private address, also
  when a name answers a public address to the check and a private one to the connection (rebinding);
- one tenant's 19 hanging endpoints do not delay another tenant's delivery beyond the stated bound;
- the delivery process survives a locked control database, and delivers afterwards.

Gate events are written straight to the gates topic: the delivery process is what is under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiokafka import AIOKafkaProducer
from fastapi.testclient import TestClient

from ledger.api.app import create_api
from ledger.control.store import SQLITE_BUSY_TIMEOUT_S, ControlStore, Delivery
from ledger.events import GateEvent
from ledger.settings import Settings
from streams.codecs import encode
from streams.topics import Topics
from streams.webhook_transport import ERROR_CLASSES
from streams.webhooks import ATTEMPT_TIMEOUT_S, TENANT_IN_FLIGHT_MAX, WebhookDispatcher
from tests.conftest import free_port
from tests.integration.test_config_api import Tenant
from tests.integration.test_webhooks import Receiver, WebhooksProcess

pytestmark = pytest.mark.integration

WAIT_S = 60.0
# The acceptance bound of issue 14 (docs/webhooks.md states the design's own).
OTHER_TENANT_DELIVERY_S_MAX = 5.0
HANGING_ENDPOINTS = 19
INTERNAL_BODY = "internal-service-secret: db password hunter2"
LOCK_HELD_S = SQLITE_BUSY_TIMEOUT_S + 3.0  # longer than the store's busy wait, so a write does meet the error


def gate(tenant: str, gate_id: str) -> GateEvent:
    return GateEvent(gate_id=gate_id, tenant=tenant, user="u1", kind="hard_block", dimension="period_spend",
                     model=None, threshold=Decimal("1.00"), used=Decimal("1.000750000000"), limit=Decimal("1.00"),
                     scope="period:2026-11-01T00:00:00+00:00", plan_id="p", plan_version=1, cause_event_id="e1",
                     occurred_at=datetime.now(UTC))


def write_gates(settings: Settings, events: list[GateEvent]) -> float:
    """Write the gate events to the gates topic; time.monotonic() once they are acknowledged."""
    async def go() -> float:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
        await producer.start()
        try:
            for e in events:
                await producer.send(Topics.for_namespace(settings.namespace).gates, encode(e),
                                    key=f"{e.tenant}/{e.user}".encode())
            await producer.flush()
        finally:
            await producer.stop()
        return time.monotonic()
    return asyncio.run(go())


class Hanging:
    """A TCP endpoint on loopback that accepts connections and never answers (nor reads)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.accepted: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hooks"

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for conn in self.accepted:
            conn.close()


class Answering:
    """An 'internal service' on loopback: answers every request with ``status`` and a body worth stealing."""

    def __init__(self, status: int) -> None:
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:  # noqa: N802, N805 (the http.server API; self is the receiver)
                handler.rfile.read(int(handler.headers.get("content-length", "0")))
                self.requests += 1
                body = INTERNAL_BODY.encode()
                handler.send_response(status)
                handler.send_header("content-length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args: object) -> None:  # noqa: N805
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def permissive(settings: Settings) -> Settings:
    """A deployment that opted in to private addresses, as `ledger up` does: the receivers are on loopback."""
    return dataclasses.replace(settings, webhook_allow_private=True)


@pytest.fixture
def store(settings: Settings) -> Iterator[ControlStore]:
    s = ControlStore(settings.control_url)
    s.create_schema()
    yield s
    s.dispose()


@pytest.fixture
def delivering() -> Iterator[Callable[[Settings], WebhooksProcess]]:
    """Start `ledger webhooks` processes with these settings; all stopped at the end."""
    started: list[WebhooksProcess] = []

    def start(settings: Settings) -> WebhooksProcess:
        started.append(WebhooksProcess(settings).start())
        return started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def closing() -> Iterator[Callable[[object], None]]:
    things: list[object] = []
    yield things.append
    for thing in reversed(things):
        thing.close()  # type: ignore[attr-defined]


def deliveries(store: ControlStore, tenant_id: str, webhook_id: str) -> list[Delivery]:
    with store.session() as session:
        return session.deliveries(tenant_id, webhook_id)


def every_one_attempted(store: ControlStore, tenant_id: str, webhook_ids: Iterable[str]) -> bool:
    """Whether each webhook has its deliveries and each was attempted, from one reading per webhook: two
    readings (attempted, then present) passed when the deliveries were recorded in between, unattempted."""
    logged = [deliveries(store, tenant_id, h) for h in webhook_ids]
    return all(ds and all(d.attempts >= 1 for d in ds) for ds in logged)


def wait_for(done: Callable[[], bool], what: str, process: WebhooksProcess | None = None,
             timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if process is not None:
            assert process.proc is not None and process.proc.poll() is None, \
                f"ledger webhooks died:\n{process.log_tail()}"
        assert time.monotonic() < deadline, f"{what} after {timeout_s:.0f}s" + (
            f"\n{process.log_tail()}" if process else "")
        time.sleep(0.1)


def test_the_delivery_log_keeps_status_codes_and_short_error_classes_never_bodies_or_socket_messages(
        permissive: Settings, store: ControlStore, closing: Callable[[object], None],
        delivering: Callable[[Settings], WebhooksProcess]) -> None:
    failing, teapot = Answering(500), Answering(418)
    hanging = Hanging()
    for thing in (failing, teapot, hanging):
        closing(thing)
    closed_port = free_port()  # nothing listens there
    urls = {
        "http_500": f"http://127.0.0.1:{failing.port}/hooks",
        "http_418": f"http://127.0.0.1:{teapot.port}/hooks",
        "connect_refused": f"http://127.0.0.1:{closed_port}/hooks",
        "tls_error": f"https://127.0.0.1:{failing.port}/hooks",  # TLS spoken to a plain HTTP service
        "timeout": hanging.url,
    }
    with store.session() as session:
        tenant_id, key = session.create_tenant("acme")
        hooks = {expected: session.create_webhook(tenant_id, url)[0].id for expected, url in urls.items()}
    process = delivering(permissive)
    write_gates(permissive, [gate(tenant_id, "gate-1")])

    wait_for(lambda: every_one_attempted(store, tenant_id, hooks.values()), "not every endpoint was attempted",
             process, timeout_s=WAIT_S + ATTEMPT_TIMEOUT_S)
    logged = {expected: deliveries(store, tenant_id, h)[0] for expected, h in hooks.items()}
    assert failing.requests >= 1 and teapot.requests >= 1, (
        failing.requests, teapot.requests, {k: (d.attempts, d.last_error, d.last_status) for k, d in logged.items()})
    for expected, d in logged.items():
        assert (d.state.value, d.last_error) == ("pending", expected), (expected, d)
        assert d.last_error in ERROR_CLASSES or d.last_error.startswith("http_")
    assert logged["http_500"].last_status == 500 and logged["http_418"].last_status == 418
    assert {d.last_status for k, d in logged.items() if not k.startswith("http_")} == {None}
    # Nothing of the internal service's answer, and no port, in what the tenant can read.
    with TestClient(create_api(permissive, store=store)) as client:
        tenant = Tenant(client, tenant_id, key)
        text = "".join(tenant.call("GET", f"/webhooks/{h}/deliveries").text for h in hooks.values())
    assert "hunter2" not in text and "internal-service" not in text
    assert str(closed_port) not in text and str(failing.port) not in text and "Errno" not in text


# Every one of these leads to 127.0.0.1 (or to nothing public): a strict process must never connect.
CARRYING_FORMS = ["127.0.0.1", "[::ffff:127.0.0.1]", "[::127.0.0.1]", "[64:ff9b::7f00:1]", "[64:ff9b:1::7f00:1]",
                  "[2002:7f00:1::]", "[::ffff:0:7f00:1]", "[2001:0:4136:e378:8000:63bf:80ff:fffe]",
                  "[64:ff9b::a9fe:a9fe]", "[64:ff9b:1::a9fe:a9fe]", "[::ffff:0:a9fe:a9fe]", "localhost"]


def test_a_strict_process_refuses_at_delivery_every_form_that_leads_to_a_private_address(
        settings: Settings, store: ControlStore, closing: Callable[[object], None],
        delivering: Callable[[Settings], WebhooksProcess]) -> None:
    receiver = Receiver()
    closing(receiver)
    port = receiver.url.split(":")[2].split("/")[0]
    with store.session() as session:
        tenant_id, _ = session.create_tenant("acme")
        # Registered as if while private addresses were allowed (or by a name that answered public then).
        hooks = {form: session.create_webhook(tenant_id, f"http://{form}:{port}/hooks")[0].id
                 for form in CARRYING_FORMS}
    assert settings.webhook_allow_private is False  # strict is the default
    process = delivering(settings)
    write_gates(settings, [gate(tenant_id, "gate-1")])

    wait_for(lambda: every_one_attempted(store, tenant_id, hooks.values()), "not every form was attempted", process)
    assert receiver.received == [] and receiver.rejected == [], "a strict process connected to loopback"
    assert {form: deliveries(store, tenant_id, h)[0].last_error for form, h in hooks.items()} == {
        form: "unsafe_address" for form in CARRYING_FORMS}


REBINDING_HOST = "rebinding.test"
PUBLIC_ANSWER = "93.184.215.14"


def test_a_name_that_answers_public_to_the_check_and_loopback_to_the_connection_is_never_called(
        settings: Settings, store: ControlStore, closing: Callable[[object], None], monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name answers a public address to a lookup made to check it (no port) and
    loopback to the lookup made to connect (with the port). Checked where the connection is made,
    the delivery is refused; checked apart from it, the receiver on loopback is called."""
    receiver = Receiver()
    closing(receiver)
    port = int(receiver.url.split(":")[2].split("/")[0])
    real = socket.getaddrinfo

    def rebinding(host, port_, *args, **kwargs):  # type: ignore[no-untyped-def]
        if (host.decode() if isinstance(host, bytes) else host) != REBINDING_HOST:  # anyio asks with bytes
            return real(host, port_, *args, **kwargs)
        answer = PUBLIC_ANSWER if port_ in (None, 0) else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, port_ or 0))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://{REBINDING_HOST}:{port}/hooks"
    with store.session() as session:
        tenant_id, key = session.create_tenant("acme")
    # Registration (strict, the default) sees the public answer and accepts the name.
    with TestClient(create_api(settings, store=store)) as client:
        created = Tenant(client, tenant_id, key).call("POST", "/webhooks", json={"url": url})
    assert created.status_code == 201, created.text
    receiver.secret = created.json()["secret"]
    hook_id = created.json()["id"]

    async def deliver() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(WebhookDispatcher(settings, store).run(stop))
        await asyncio.to_thread(write_gates, settings, [gate(tenant_id, "gate-1")])
        deadline = time.monotonic() + WAIT_S
        while not any(d.attempts for d in deliveries(store, tenant_id, hook_id)) and not receiver.received:
            assert time.monotonic() < deadline and not running.done(), "no attempt was made"
            await asyncio.sleep(0.1)
        stop.set()
        await running

    asyncio.run(deliver())
    assert receiver.received == [], "the delivery reached loopback through a rebinding name"
    (logged,) = deliveries(store, tenant_id, hook_id)
    assert (logged.attempts, logged.last_error) == (1, "unsafe_address")


def test_one_tenants_hanging_endpoints_do_not_delay_another_tenants_delivery(
        permissive: Settings, store: ControlStore, closing: Callable[[object], None],
        delivering: Callable[[Settings], WebhooksProcess]) -> None:
    hanging = [Hanging() for _ in range(HANGING_ENDPOINTS)]
    receiver = Receiver()
    for thing in (*hanging, receiver):
        closing(thing)
    with store.session() as session:
        a, _ = session.create_tenant("a")
        b, _ = session.create_tenant("b")
        for h in hanging:
            session.create_webhook(b, h.url)
        _, receiver.secret = session.create_webhook(a, receiver.url)
    process = delivering(permissive)

    # Given tenant B's deliveries hanging on every slot they may hold ...
    write_gates(permissive, [gate(b, f"b-{n}") for n in range(3)])
    wait_for(lambda: sum(len(h.accepted) for h in hanging) >= TENANT_IN_FLIGHT_MAX,
             "tenant B's deliveries never reached its endpoints", process)
    # ... tenant A's gate event still arrives at once.
    written = write_gates(permissive, [gate(a, "a-1")])
    wait_for(lambda: "a-1" in receiver.accepted(), "tenant A's delivery never arrived", process)
    took_s = receiver.accepted()["a-1"].arrived_s - written
    print(f"\ntenant A's webhook arrived {took_s:.2f} s after its gate event was written, with tenant B's "
          f"{HANGING_ENDPOINTS} endpoints hanging ({sum(len(h.accepted) for h in hanging)} connections held)")
    assert took_s < OTHER_TENANT_DELIVERY_S_MAX, f"tenant A waited {took_s:.1f} s behind tenant B"
    # B held no more than its share at any time (the hanging endpoints count the connections they were given).
    assert sum(len(h.accepted) for h in hanging) <= TENANT_IN_FLIGHT_MAX


def test_the_delivery_process_survives_a_locked_control_database_and_delivers_afterwards(
        permissive: Settings, store: ControlStore, closing: Callable[[object], None],
        delivering: Callable[[Settings], WebhooksProcess]) -> None:
    receiver = Receiver()
    closing(receiver)
    with store.session() as session:
        tenant_id, _ = session.create_tenant("acme")
        _, receiver.secret = session.create_webhook(tenant_id, receiver.url)
    process = delivering(permissive)
    write_gates(permissive, [gate(tenant_id, "before")])
    wait_for(lambda: "before" in receiver.accepted(), "the first delivery never arrived", process)

    # When another process holds the database's write lock longer than SQLite waits for it ...
    path = permissive.control_url.removeprefix("sqlite:///")
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        write_gates(permissive, [gate(tenant_id, "during")])
        deadline = time.monotonic() + LOCK_HELD_S
        while time.monotonic() < deadline:
            assert process.proc is not None and process.proc.poll() is None, \
                f"ledger webhooks died on the locked database:\n{process.log_tail()}"
            time.sleep(0.2)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # ... the process is still there, said so in its log, and delivers what came in meanwhile.
    wait_for(lambda: "during" in receiver.accepted(), "the delivery after the lock never arrived", process)
    assert process.proc is not None and process.proc.poll() is None
    # (With SQLite's default 5 s busy wait the process met the error; a longer busy timeout may spare it that.)
    met = "the control database failed" in process.log_path.read_text()
    print(f"\nthe delivery process {'met and survived' if met else 'waited out'} a {LOCK_HELD_S:.0f} s lock")
