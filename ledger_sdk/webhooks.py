"""Standard Webhooks signatures (https://www.standardwebhooks.com): sign a delivery, verify one.

A delivery carries three headers: ``webhook-id`` (the same on every retry: use it
to deduplicate), ``webhook-timestamp`` (the attempt's unix time, in seconds) and
``webhook-signature``, a space-separated list of ``v1,<base64 HMAC-SHA256>`` over
``"{id}.{timestamp}.{body}"`` under the endpoint's secret (``whsec_`` + base64
key). Several signatures let a sender rotate secrets: one that matches is
enough. Standard library only (plus the SDK's error root, so ``except
LedgerError`` catches a failed verification too).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

from ledger_sdk._errors import LedgerError

__all__ = ["WebhookVerificationError", "sign", "verify"]

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
# Bounds on what a receiver parses before it computes anything.
SIGNATURES_PER_HEADER_MAX = 16
HEADER_LENGTH_MAX = 4096


class WebhookVerificationError(LedgerError):
    """The delivery is not authentic or not fresh: answer it with a 4xx and do not process it."""


def _key(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        # Secrets are sometimes shown without their base64 padding; extra padding is ignored.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookVerificationError("the secret is not base64 after its whsec_ prefix") from None
    if not key:
        raise WebhookVerificationError("the secret is empty")
    return key


def _digest(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt: ``v1,<base64 HMAC-SHA256>``.

    A secret that is not ``whsec_`` + base64 raises WebhookVerificationError, as in ``verify``.
    """
    signature = base64.b64encode(_digest(_key(secret), msg_id, timestamp, body)).decode("ascii")
    return f"{SIGNATURE_VERSION},{signature}"


def _header(headers: Mapping[str, str], name: str) -> str:
    value = next((v for k, v in headers.items() if k.lower() == name), None)
    if not value:
        raise WebhookVerificationError(f"missing {name} header")
    if len(value) > HEADER_LENGTH_MAX:
        raise WebhookVerificationError(f"the {name} header is longer than {HEADER_LENGTH_MAX} characters")
    return value


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_s: int = DEFAULT_TOLERANCE_S,
           now: int | None = None) -> None:
    """Raise WebhookVerificationError unless ``body`` and ``headers`` are a fresh delivery signed with ``secret``.

    ``body`` must be the raw bytes received, before any JSON parsing. Header names
    are matched case-insensitively. A timestamp more than ``tolerance_s`` seconds
    before or after ``now`` (default: the current time) is refused, so a captured
    delivery cannot be replayed later.
    """
    key = _key(secret)
    msg_id = _header(headers, "webhook-id")
    raw_timestamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature").split()
    if not raw_timestamp.isascii() or not raw_timestamp.isdigit():
        raise WebhookVerificationError("webhook-timestamp is not a whole number of seconds")
    timestamp = int(raw_timestamp)
    current = int(time.time()) if now is None else now
    if timestamp < current - tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if timestamp > current + tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is in the future")
    if len(signatures) > SIGNATURES_PER_HEADER_MAX:
        raise WebhookVerificationError(f"more than {SIGNATURES_PER_HEADER_MAX} signatures")
    expected = _digest(key, msg_id, timestamp, body)
    matched = False
    for candidate in signatures:
        version, _, encoded = candidate.partition(",")
        if version != SIGNATURE_VERSION:
            continue  # other schemes (v1a: ed25519) are not ours to check
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        # Every candidate is compared, so the time taken does not tell which one matched.
        matched |= hmac.compare_digest(expected, given)
    if not matched:
        raise WebhookVerificationError("no signature matches")
