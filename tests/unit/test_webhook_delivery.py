"""The delivery process's pure parts: the retry schedule, the body of a delivery, the error classes."""

from __future__ import annotations

import socket
import ssl
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import msgspec
import pytest

from ledger.control.webhook_urls import Unresolvable, UnsafeURL
from ledger.events import GateEvent
from streams.codecs import encode
from streams.webhook_transport import ERROR_CLASSES, error_class
from streams.webhooks import (
    ATTEMPTS_MAX,
    RETRY_DELAY_S_MAX,
    RETRY_FACTOR,
    RETRY_JITTER,
    outbound,
    retry_after,
    retry_delay_s,
)

GATE = GateEvent(gate_id="5f1c0d9e-0000-5000-8000-000000000001", tenant="t1", user="u42", kind="hard_block",
                 dimension="period_spend", model=None, threshold=Decimal("1.00"), used=Decimal("1.000750000000"),
                 limit=Decimal("1.00"), scope="period:2026-11-01T00:00:00+00:00", plan_id="p1", plan_version=1,
                 cause_event_id="u42-7", occurred_at=datetime(2026, 11, 2, 10, 0, tzinfo=UTC))


def test_delays_grow_by_the_factor_from_the_first_until_the_cap() -> None:
    delays = [retry_delay_s(n, 5) for n in range(1, ATTEMPTS_MAX)]
    assert delays[:4] == [5, 20, 80, 320]
    for before, after in zip(delays, delays[1:], strict=False):
        assert after == min(before * RETRY_FACTOR, RETRY_DELAY_S_MAX)
    assert max(delays) == RETRY_DELAY_S_MAX
    # Every attempt is made within a day of the first: the schedule is bounded.
    assert 12 * 3600 < sum(delays) < 24 * 3600


@pytest.mark.parametrize("jitter", [-1.0, -0.3, 0.0, 0.5, 1.0])
def test_jitter_stays_within_its_bound(jitter: float) -> None:
    for n in range(1, ATTEMPTS_MAX):
        plain = retry_delay_s(n, 5)
        assert abs(retry_delay_s(n, 5, jitter) - plain) <= plain * RETRY_JITTER + 1e-9


def test_a_delivery_body_is_the_gate_event_with_money_as_exact_json_numbers() -> None:
    delivery = outbound(encode(GATE), 1_790_000_000_123)
    assert delivery is not None
    assert (delivery.tenant_id, delivery.event_id) == ("t1", GATE.gate_id)
    assert delivery.written_at == datetime.fromtimestamp(1_790_000_000.123, UTC)
    assert '"used":1.000750000000' in delivery.payload and '"threshold":1.00' in delivery.payload
    assert msgspec.json.decode(delivery.payload, type=GateEvent) == GATE


@pytest.mark.parametrize("value", [b"not json", b"{}", b'{"gate_id": 1}'])
def test_a_record_that_is_not_a_gate_event_is_skipped(value: bytes) -> None:
    assert outbound(value, 0) is None


NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("header", "seconds"), [
    (None, 0), ("", 0), ("120", 120), (" 7 ", 7), ("0", 0), ("-5", 0), ("soon", 0), ("1.5", 0),
    ("Thu, 26 Nov 2026 12:00:30 GMT", 30), ("Thu, 26 Nov 2026 11:00:00 GMT", 0),
    ("Thu, 26 Nov 2026 12:00:30", 0),  # a date without its zone is not an HTTP date
    (str(10 * RETRY_DELAY_S_MAX), RETRY_DELAY_S_MAX), ("Sat, 26 Nov 2050 12:00:00 GMT", RETRY_DELAY_S_MAX),
])
def test_retry_after_is_read_as_seconds_or_a_date_and_bounded(header: str | None, seconds: float) -> None:
    assert retry_after(header, NOW) == seconds


def _raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        raise exc from cause
    except BaseException as caught:  # noqa: BLE001 (building a chain to classify)
        return caught


@pytest.mark.parametrize(("exc", "expected"), [
    (_raised(httpx.ConnectError("[Errno -2] Name or service not known"), socket.gaierror(-2, "unknown")),
     "dns_error"),
    (Unresolvable("url: the host 'x.invalid' does not resolve"), "dns_error"),
    (UnsafeURL("url: the host 'x' resolves to a non-public address"), "unsafe_address"),
    (_raised(httpx.ConnectError("[Errno 111] Connection refused to 10.0.0.7:5432"), ConnectionRefusedError(111, "x")),
     "connect_refused"),
    (_raised(httpx.ConnectError("handshake"), ssl.SSLError(1, "WRONG_VERSION_NUMBER")), "tls_error"),
    (httpx.ReadTimeout("timed out"), "timeout"),
    (TimeoutError(), "timeout"),
    (httpx.ConnectError("All connection attempts failed"), "connect_error"),
    (httpx.RemoteProtocolError("illegal status line"), "protocol_error"),
    (httpx.ReadError("reset"), "network_error"),
    (httpx.UnsupportedProtocol("no"), "invalid_url"),
    (ValueError("a bug"), "internal_error"),
])
def test_a_failed_attempt_is_logged_as_a_short_class_without_its_message(exc: BaseException, expected: str) -> None:
    assert error_class(exc) == expected
    assert expected in ERROR_CLASSES
