"""Webhook deliveries on the real broker: gate events from a real worker reach real receivers on
loopback, every one signed; a receiver that fails twice gets the delivery on the third try with the
same id; forged, tampered and stale deliveries are refused by the receiver's `verify`."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import msgspec
import pytest
from fastapi.testclient import TestClient

from ledger.api.app import create_api
from ledger.control.store import ControlStore
from ledger.events import GateEvent
from ledger.settings import Settings
from ledger_sdk.webhooks import WebhookVerificationError, sign, verify
from tests.conftest import ROOT, WorkerProcess, free_port, wait_processed
from tests.factories import assigned, published, seed_plans, usage
from tests.integration.test_config_api import Tenant
from tests.integration.test_metrics import by_label, scrape
from tests.kafka_io import gates, publish

pytestmark = pytest.mark.integration

DELIVERY_WAIT_S = 90.0
RETRY_FIRST_S = 1  # the process's first retry delay: the third attempt comes about 1 + 4 s after the first
FAILURES_BEFORE_SUCCESS = 2
HOLD_S_MAX = 120.0
RETRY_AFTER_S = 3


@dataclass(frozen=True)
class Received:
    msg_id: str
    timestamp: int
    body: bytes
    status: int  # what the receiver answered
    arrived_s: float  # time.monotonic() on arrival


class Receiver:
    """A real HTTP server on loopback that verifies every request with ``ledger_sdk.webhooks.verify``.

    Unverifiable requests get 401 and are never processed. The first verified attempts of each id get
    ``answers`` (status and headers; by default ``failures`` times 500), later ones 204.
    """

    def __init__(self, failures: int = 0, hang_first: bool = False,
                 answers: list[tuple[int, dict[str, str]]] | None = None) -> None:
        self.secret = ""
        self.answers = [(500, {})] * failures if answers is None else answers
        # The first verified request is held unanswered until ``release`` is set (a sender that dies meanwhile).
        self.hang_first = hang_first
        self.held = threading.Event()
        self.release = threading.Event()
        self.received: list[Received] = []
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k: v for k, v in self.headers.items()}
                try:
                    verify(receiver.secret, headers, body)
                except WebhookVerificationError as exc:
                    with receiver._lock:
                        receiver.rejected.append(str(exc))
                    status, extra = 401, {}
                else:
                    with receiver._lock:
                        seen = sum(r.msg_id == headers["webhook-id"] for r in receiver.received)
                        hold = receiver.hang_first and not receiver.held.is_set()
                        receiver.held.set()
                        status, extra = (0, {}) if hold else receiver.answers[seen] if seen < len(receiver.answers) \
                            else (204, {})
                        receiver.received.append(Received(headers["webhook-id"], int(headers["webhook-timestamp"]),
                                                          body, status, time.monotonic()))
                    if hold:
                        receiver.release.wait(HOLD_S_MAX)
                        return  # never answered: the sender sees no status
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks"

    def accepted(self) -> dict[str, Received]:
        with self._lock:
            return {r.msg_id: r for r in self.received if r.status == 204}

    def attempts(self) -> Counter[str]:
        with self._lock:
            return Counter(r.msg_id for r in self.received)

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


class WebhooksProcess:
    """`ledger webhooks` in its own process."""

    def __init__(self, settings: Settings, **env: str) -> None:
        self.settings = settings
        self.env = env
        self.log_path = settings.home / "webhooks.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WebhooksProcess:
        env = {**os.environ, "LEDGER_HOME": str(self.settings.home), "LEDGER_NAMESPACE": self.settings.namespace,
               "KAFKA_BOOTSTRAP_SERVERS": self.settings.bootstrap, "LEDGER_PARTITIONS": str(self.settings.partitions),
               "LEDGER_WEBHOOK_RETRY_FIRST_S": str(RETRY_FIRST_S),
               "LEDGER_WEBHOOK_ALLOW_PRIVATE": "true" if self.settings.webhook_allow_private else "false",
               **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "ledger.cli.main", "webhooks"], env=env, cwd=ROOT,
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """These tests deliver to receivers on loopback: they opt in to private addresses, as `ledger up` does."""
    return dataclasses.replace(settings, webhook_allow_private=True)


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(failures: int = 0, hang_first: bool = False,
             answers: list[tuple[int, dict[str, str]]] | None = None) -> Receiver:
        made.append(Receiver(failures, hang_first, answers))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def delivery_process(settings: Settings) -> Iterator[WebhooksProcess]:
    process = WebhooksProcess(settings, LEDGER_METRICS_PORT=str(free_port())).start()
    yield process
    process.stop()


@pytest.fixture
def acme(settings: Settings) -> Iterator[Tenant]:
    store = ControlStore(settings.control_url)
    store.create_schema()
    with store.session() as session:
        tenant_id, key = session.create_tenant("acme")
    with TestClient(create_api(settings, store=store)) as client:
        yield Tenant(client, tenant_id, key)


def register(tenant: Tenant, receiver: Receiver) -> str:
    created = tenant.call("POST", "/webhooks", json={"url": receiver.url, "description": "test receiver"})
    assert created.status_code == 201, created.text
    receiver.secret = created.json()["secret"]
    return str(created.json()["id"])


def cross_limits(settings: Settings, tenant_id: str, users: list[str]) -> None:
    """Each user on the free plan crosses its soft (8,000 tokens) and hard (10,000) threshold: two gate events."""
    free = seed_plans(tenant_id)["free"]
    publish(settings, [published(free, tenant_id)] + [assigned(u, free, tenant=tenant_id) for u in users])
    publish(settings, [usage(u, n, tenant=tenant_id) for u in users for n in range(1, 6)])


def wait_until(done: Callable[[], bool], what: str, process: WebhooksProcess, timeout_s: float = DELIVERY_WAIT_S
               ) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert process.proc is not None and process.proc.poll() is None, f"ledger webhooks died:\n{process.log_tail()}"
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout_s:.0f}s\n{process.log_tail()}")
        time.sleep(0.2)


def test_gate_events_reach_every_endpoint_of_their_tenant_signed_and_a_flaky_one_on_the_third_try(
        settings: Settings, worker: WorkerProcess, delivery_process: WebhooksProcess,
        receivers: Callable[..., Receiver]) -> None:
    store = ControlStore(settings.control_url)
    with TestClient(create_api(settings, store=store)) as client:
        with store.session() as session:
            acme = Tenant(client, *session.create_tenant("acme"))
            globex = Tenant(client, *session.create_tenant("globex"))
        steady, flaky, other = receivers(), receivers(FAILURES_BEFORE_SUCCESS), receivers()
        steady_id, flaky_id = register(acme, steady), register(acme, flaky)
        register(globex, other)

        # Given two tenants' users crossing their limits ...
        cross_limits(settings, acme.id, ["ana", "bo"])
        cross_limits(settings, globex.id, ["cy"])
        wait_processed(settings, worker)
        raised = {g.gate_id: g for g in gates(settings)}
        acme_ids = {i for i, g in raised.items() if g.tenant == acme.id}
        globex_ids = {i for i, g in raised.items() if g.tenant == globex.id}
        assert len(acme_ids) == 4 and len(globex_ids) == 2

        # ... every endpoint gets each of its tenant's gate events, and only those.
        wait_until(lambda: set(steady.accepted()) == acme_ids and set(flaky.accepted()) == acme_ids
                   and set(other.accepted()) == globex_ids, "not every gate event was delivered", delivery_process)
        time.sleep(2 * RETRY_FIRST_S)  # room for any extra attempt that should not happen

        for receiver in (steady, flaky, other):
            assert receiver.rejected == [], "a delivery failed its receiver's signature check"
            for msg_id, got in receiver.accepted().items():
                # The body is the gate event, money exact (JSON numbers read back as the same decimals).
                assert msgspec.json.decode(got.body, type=GateEvent) == raised[msg_id]
        assert steady.attempts() == Counter({i: 1 for i in acme_ids})
        assert other.attempts() == Counter({i: 1 for i in globex_ids})
        # The flaky receiver answered 500 twice per id; the third attempt, with the same id, was delivered.
        assert flaky.attempts() == Counter({i: FAILURES_BEFORE_SUCCESS + 1 for i in acme_ids})
        for msg_id in acme_ids:
            tries = [r for r in flaky.received if r.msg_id == msg_id]
            assert [r.status for r in tries] == [500, 500, 204]
            assert tries[0].timestamp <= tries[1].timestamp <= tries[2].timestamp
            assert tries[2].timestamp - tries[0].timestamp >= RETRY_FIRST_S  # backed off, not hammered

        # The delivery log says the same, once it has recorded the last answers: a receiver counts a request
        # before it answers, and the process records the outcome after the answer.
        def delivery_log(hook_id: str) -> dict[str, dict]:  # type: ignore[type-arg]
            answer = acme.call("GET", f"/webhooks/{hook_id}/deliveries")
            assert answer.status_code == 200, answer.text
            return {d["event_id"]: d for d in answer.json()["deliveries"]}

        wait_until(lambda: all(d["state"] != "pending" for hook_id in (flaky_id, steady_id)
                               for d in delivery_log(hook_id).values()), "the log still says pending",
                   delivery_process)
        for hook_id, attempts in ((flaky_id, FAILURES_BEFORE_SUCCESS + 1), (steady_id, 1)):
            log = delivery_log(hook_id)
            assert set(log) == acme_ids
            for d in log.values():
                assert (d["state"], d["attempts"], d["last_status"], d["last_error"], d["next_attempt_at"]) == (
                    "delivered", attempts, 204, None, None)
                assert d["delivered_at"] is not None

        # So do the delivery process's metrics.
        samples = scrape(f"http://127.0.0.1:{delivery_process.env['LEDGER_METRICS_PORT']}/metrics")
        assert samples[("ledger_webhook_gate_events_read_total", ())] == len(acme_ids) + len(globex_ids)
        assert samples[("ledger_webhook_deliveries_recorded_total", ())] == 2 * len(acme_ids) + len(globex_ids)
        assert by_label(samples, "ledger_webhook_attempts_total", "state") == {
            "delivered": 2 * len(acme_ids) + len(globex_ids), "pending": FAILURES_BEFORE_SUCCESS * len(acme_ids),
            "failed": 0}

    # A forged, tampered or stale copy of a real delivery is refused by the receiver's verify.
    real = next(iter(steady.accepted().values()))
    now = int(time.time())
    forged = {"webhook-id": real.msg_id, "webhook-timestamp": str(now),
              "webhook-signature": sign("whsec_" + "A" * 44, real.msg_id, now, real.body)}
    tampered_body = real.body.replace(b'"kind":"', b'"kind":"x')
    assert tampered_body != real.body
    tampered = {"webhook-id": real.msg_id, "webhook-timestamp": str(now),
                "webhook-signature": sign(steady.secret, real.msg_id, now, real.body)}
    stale_at = now - 301
    stale = {"webhook-id": real.msg_id, "webhook-timestamp": str(stale_at),
             "webhook-signature": sign(steady.secret, real.msg_id, stale_at, real.body)}
    for headers, body in ((forged, real.body), (tampered, tampered_body), (stale, real.body)):
        assert httpx.post(steady.url, content=body, headers=headers, timeout=10).status_code == 401
    assert [m.split()[0] for m in steady.rejected] == ["no", "no", "webhook-timestamp"]
    assert "too old" in steady.rejected[-1]



def test_a_delivery_process_killed_mid_attempt_loses_nothing_and_the_retry_keeps_the_id(
        settings: Settings, worker: WorkerProcess, acme: Tenant, receivers: Callable[..., Receiver]) -> None:
    receiver = receivers(hang_first=True)
    hook_id = register(acme, receiver)
    first = WebhooksProcess(settings).start()
    try:
        cross_limits(settings, acme.id, ["ana"])
        wait_processed(settings, worker)
        ids = {g.gate_id for g in gates(settings)}
        assert len(ids) == 2
        # When the first attempt is on the wire, unanswered, the process dies with it.
        wait_until(receiver.held.is_set, "no attempt arrived", first)
        first.stop(signal.SIGKILL)
    finally:
        first.stop()
    receiver.release.set()
    (held,) = [r.msg_id for r in receiver.received if r.status == 0]

    second = WebhooksProcess(settings).start()
    try:
        # The killed attempt's lease (ATTEMPT_LEASE_S) ends, and the new process makes it again. (By then the
        # worker's first tick, LEDGER_TICK_SECONDS=60 after it started, may have raised an `unblocked` too.)
        wait_until(lambda: ids <= set(receiver.accepted()), "a delivery was lost", second, timeout_s=150)
    finally:
        second.stop()
    assert receiver.rejected == []
    assert receiver.attempts()[held] == 2, "the retry after the crash did not carry the same webhook-id"
    log = {d["event_id"]: d for d in acme.call("GET", f"/webhooks/{hook_id}/deliveries").json()["deliveries"]}
    assert {i: log[i]["state"] for i in ids} == {i: "delivered" for i in ids}



def test_a_deployment_that_refuses_private_addresses_never_calls_one_even_if_registered_earlier(
        settings: Settings, worker: WorkerProcess, acme: Tenant, receivers: Callable[..., Receiver]) -> None:
    # Registered while loopback was allowed (the fixture's API opted in) ...
    receiver = receivers()
    hook_id = register(acme, receiver)
    # ... then delivered by a process that refuses private addresses: checked again before every attempt.
    strict = WebhooksProcess(settings, LEDGER_WEBHOOK_ALLOW_PRIVATE="false").start()
    try:
        cross_limits(settings, acme.id, ["ana"])
        wait_processed(settings, worker)
        ids = {g.gate_id for g in gates(settings)}

        def refused_twice() -> bool:
            log = acme.call("GET", f"/webhooks/{hook_id}/deliveries").json()["deliveries"]
            return {d["event_id"] for d in log} == ids and all(d["attempts"] >= 2 for d in log)

        wait_until(refused_twice, "the attempts were not logged", strict)
    finally:
        strict.stop()
    assert receiver.received == [] and receiver.rejected == []
    for d in acme.call("GET", f"/webhooks/{hook_id}/deliveries").json()["deliveries"]:
        assert d["state"] == "pending" and d["last_status"] is None and d["next_attempt_at"] is not None
        assert d["last_error"] == "unsafe_address"  # a short class: no address, no socket message



def test_a_receiver_that_asks_for_time_gets_it_and_one_that_is_gone_is_disabled(
        settings: Settings, worker: WorkerProcess, delivery_process: WebhooksProcess, acme: Tenant,
        receivers: Callable[..., Receiver]) -> None:
    busy = receivers(answers=[(503, {"Retry-After": str(RETRY_AFTER_S)})])
    gone = receivers(answers=[(410, {})])
    register(acme, busy)
    gone_id = register(acme, gone)

    cross_limits(settings, acme.id, ["ana"])
    wait_processed(settings, worker)
    ids = {g.gate_id for g in gates(settings)}

    def gone_log() -> dict[str, tuple[str, int]]:
        deliveries = acme.call("GET", f"/webhooks/{gone_id}/deliveries").json()["deliveries"]
        return {d["event_id"]: (d["state"], d["attempts"]) for d in deliveries}

    wait_until(lambda: set(busy.accepted()) == ids and {s for s, _ in gone_log().values()} == {"failed"},
               "deliveries missing", delivery_process)

    # The retry waited as long as the 503 asked, not the schedule's first second.
    for msg_id in ids:
        first, second = [r for r in busy.received if r.msg_id == msg_id]
        assert (first.status, second.status) == (503, 204)
        assert second.arrived_s - first.arrived_s >= RETRY_AFTER_S - 0.1
    # 410 Gone: the endpoint is disabled at its first such answer and every delivery to it fails; none is
    # retried (one made at the same time may have been answered 410 too).
    time.sleep(3 * RETRY_FIRST_S)
    attempts = gone.attempts()
    assert set(attempts) <= ids and set(attempts.values()) == {1} and [r.status for r in gone.received][0] == 410
    assert acme.call("GET", f"/webhooks/{gone_id}").json()["enabled"] is False
    assert gone_log() == {i: ("failed", attempts[i]) for i in ids}
    # Gate events written after that are not even recorded for it.
    cross_limits(settings, acme.id, ["bo"])
    wait_processed(settings, worker)
    later = {g.gate_id for g in gates(settings)} - ids
    wait_until(lambda: set(busy.accepted()) == ids | later, "later deliveries missing", delivery_process)
    assert len(acme.call("GET", f"/webhooks/{gone_id}/deliveries").json()["deliveries"]) == len(ids)
