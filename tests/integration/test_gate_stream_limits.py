"""The gate stream's bounds against a real `ledger api` process and the real broker.

Each scenario here failed on the code before it: closed streams kept their slot (after 32 every tenant got
503), a tenant could take every slot, a revoked key's stream kept delivering, and the cursor was base64 of
every partition's offset (``0:9223372036854775808`` ended the stream with an unhandled error).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ledger.control.keys import Scope
from ledger.control.store import ControlStore
from ledger.settings import Settings
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.integration

CYCLES = 100
PER_TENANT = 3
FREED_WITHIN_S = 2.0  # a closed stream's slot is back within this
REVOKED_CLOSES_WITHIN_S = 5.0
# Heartbeats come every 15 s: a read that waits 10 s for a stream that should have ended fails, not hangs.
TIMEOUT = httpx.Timeout(30, read=10)


class Api:
    def __init__(self, base: str, store: ControlStore) -> None:
        self.base, self.store = base, store

    def tenant(self, name: str) -> tuple[str, str]:
        with self.store.session() as session:
            return session.create_tenant(name)

    def key(self, tenant_id: str, *scopes: Scope) -> str:
        with self.store.session() as session:
            return session.create_key(tenant_id, frozenset(scopes))

    def streams_open(self) -> float:
        text = httpx.get(f"{self.base}/metrics", timeout=10).raise_for_status().text
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "ledger_api_gate_streams_open")


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    """`ledger api` in its own process, at most PER_TENANT streams per tenant."""
    port = free_port()
    env = {**os.environ, "LEDGER_HOME": str(settings.home), "LEDGER_NAMESPACE": settings.namespace,
           "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap, "LEDGER_API_PORT": str(port),
           "LEDGER_GATE_STREAMS_PER_TENANT": str(PER_TENANT)}
    store = ControlStore(settings.control_url)
    store.create_schema()
    log = open(settings.home / "api.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "ledger.cli.main", "api"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    from ledger.cli.stack import wait_for_http

    try:
        wait_for_http(f"http://127.0.0.1:{port}/docs", 60)
        yield Api(f"http://127.0.0.1:{port}", store)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        store.dispose()


def _open(http: httpx.Client, key: str, headers: dict[str, str] | None = None,
          params: dict[str, str] | None = None) -> httpx.Response:
    request = http.build_request("GET", "/api/v1/gates/stream", params=params,
                                 headers={"Authorization": f"Bearer {key}", **(headers or {})})
    return http.send(request, stream=True)


def _lines_of(response: httpx.Response) -> Iterator[str]:
    # One line iterator per response, kept with it: a dropped one closes its connection (httpcore closes the
    # stream when its generator is collected), which would end the stream behind the test's back.
    if not hasattr(response, "test_lines"):
        response.test_lines = response.iter_lines()  # type: ignore[attr-defined]
    return response.test_lines  # type: ignore[attr-defined,no-any-return]


def _first_id(response: httpx.Response) -> str:
    """Read the stream's first frame (``id: <cursor>`` then ``: stream open``); the cursor."""
    lines = _lines_of(response)
    first = next(lines)
    assert first.startswith("id: ") and next(lines) == ": stream open", first
    return first[4:]


def _served(http: httpx.Client, key: str, within_s: float = FREED_WITHIN_S) -> httpx.Response:
    """A stream, retried while the server still counts a slot just given back."""
    deadline = time.monotonic() + within_s
    while True:
        response = _open(http, key)
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        response.read()
        response.close()
        time.sleep(0.05)


def _wait(check: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {within_s}s"
        time.sleep(0.05)


def test_100_streams_opened_and_closed_then_a_new_one_is_served(api: Api) -> None:
    _, key = api.tenant("acme")
    started = time.monotonic()
    with httpx.Client(base_url=api.base, timeout=TIMEOUT) as http:
        for n in range(CYCLES):
            response = _served(http, key)
            assert response.status_code == 200, f"cycle {n}: {response.status_code} {response.read()!r}"
            _first_id(response)
            response.close()
        last = _served(http, key)
        assert last.status_code == 200, last.read()
        _first_id(last)
        last.close()
    _wait(lambda: api.streams_open() == 0, FREED_WITHIN_S, "every slot back")
    print(f"\n{CYCLES + 1} gate streams opened and closed in {time.monotonic() - started:.1f}s; 0 open after")


def test_a_tenant_past_its_quota_gets_429_while_another_is_served(api: Api) -> None:
    _, greedy = api.tenant("greedy")
    _, other = api.tenant("other")
    with httpx.Client(base_url=api.base, timeout=TIMEOUT) as http:
        held = [_open(http, greedy) for _ in range(PER_TENANT)]
        for response in held:
            assert response.status_code == 200
            _first_id(response)
        refused = _open(http, greedy)
        refused.read()
        assert refused.status_code == 429 and refused.headers["retry-after"] == "5"
        assert f"{PER_TENANT} gate streams of this tenant are open" in refused.json()["detail"]
        served = _open(http, other)
        assert served.status_code == 200
        _first_id(served)
        served.close()
        held.pop().close()
        again = _served(http, greedy)
        assert again.status_code == 200
        again.close()
        for response in held:
            response.close()


def test_a_revoked_keys_open_stream_ends_within_5s(api: Api) -> None:
    tenant_id, _ = api.tenant("acme")
    key = api.key(tenant_id, Scope.read)
    with httpx.Client(base_url=api.base, timeout=TIMEOUT) as http:
        stream = _open(http, key)
        assert stream.status_code == 200
        _first_id(stream)
        with api.store.session() as session:
            assert session.revoke_key(tenant_id, key)
        revoked_at = time.monotonic()
        rest = list(_lines_of(stream))  # returns when the server ends the stream (or a read timeout fails it)
        took = time.monotonic() - revoked_at
        stream.close()
        print(f"\nrevoked key's stream ended {took:.2f}s after the revocation; last lines {rest[-2:]}")
        assert took < REVOKED_CLOSES_WITHIN_S
        assert ": the key was revoked; stream closed" in rest
        assert _open(http, key).status_code == 401
    _wait(lambda: api.streams_open() == 0, FREED_WITHIN_S, "the revoked stream's slot back")


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def test_malformed_foreign_and_old_cursors_answer_422_and_hold_no_slot(api: Api) -> None:
    _, key_a = api.tenant("a")
    _, key_b = api.tenant("b")
    with httpx.Client(base_url=api.base, timeout=TIMEOUT) as http:
        stream = _open(http, key_a)
        cursor_a = _first_id(stream)
        stream.close()
        resumed = _open(http, key_a, headers={"Last-Event-ID": cursor_a})  # a's own cursor resumes
        assert resumed.status_code == 200
        resumed.close()
        hostile = [_b64("0:9223372036854775808"), _b64(",".join(f"{p}:1" for p in range(2000))), _b64("0:1:2"),
                   _b64("0:1"), "%%%", "A" * 20_000, cursor_a[:-4] + ("AAAA" if not cursor_a.endswith("AAAA") else "BBBB"),
                   cursor_a]  # the last: a's cursor sent by b
        for n, cursor in enumerate(hostile):
            for how in ("header", "query"):
                key = key_b if n == len(hostile) - 1 else key_a
                response = _open(http, key, **({"headers": {"Last-Event-ID": cursor}} if how == "header"
                                               else {"params": {"last_event_id": cursor}}))
                response.read()
                assert response.status_code == 422, (cursor[:40], how, response.status_code, response.text)
                assert "not a cursor from this stream" in response.json()["detail"]
    _wait(lambda: api.streams_open() == 0, FREED_WITHIN_S, "no slot held")
