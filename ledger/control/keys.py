"""API keys: a recognisable prefix and 256 random bits, stored only as SHA-256.

High-entropy keys need no slow hash; lookups are by digest and the final
comparison is constant-time. The plain key is shown once, at creation.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets

KEY_RANDOM_BYTES = 32  # 256 bits
KEY_LENGTH_MAX = 128
# Standard Webhooks: a symmetric secret is 24 to 64 random bytes, shown as `whsec_` + base64.
WEBHOOK_SECRET_BYTES = 32
WEBHOOK_SECRET_PREFIX = "whsec_"


class Scope(enum.StrEnum):
    admin = "admin"    # plans, tiers, users, subscriptions
    ingest = "ingest"  # usage events, checks
    read = "read"      # spend, history, reports


ALL_SCOPES = frozenset(Scope)


def new_key(live: bool = True) -> str:
    return ("pg_live_" if live else "pg_test_") + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def matches(key: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(key), stored_digest)


def looks_like_key(key: str) -> bool:
    return key.startswith(("pg_live_", "pg_test_")) and 8 < len(key) <= KEY_LENGTH_MAX


def new_webhook_secret() -> str:
    """A webhook signing secret. Unlike a key it is stored as it is: the sender needs it to sign."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(WEBHOOK_SECRET_BYTES)).decode("ascii")
