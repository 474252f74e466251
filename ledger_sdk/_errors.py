"""The SDK's exceptions: one root, so ``except LedgerError`` catches everything the SDK raises.

Expected outcomes of usage (accepted, duplicate, conflict, rejected) are values, never
exceptions; these are for refusals and broken infrastructure::

    LedgerError
     ├── Blocked                a pre-call check answered 402: ``reason``, ``dimension``
     ├── TransportError         no answer: connection refused, timed out (after the retries)
     ├── WebhookVerificationError  (ledger_sdk.webhooks) a delivery's signature or timestamp is wrong
     └── APIError               an HTTP answer that is not a success: ``status_code``, ``detail``
          ├── AuthenticationError   401: missing, unknown or revoked key
          ├── PermissionDenied      403: the key lacks the scope
          ├── NotFound              404
          ├── InvalidRequest        400, 409, 413, 422: the message says what to fix
          ├── RateLimited           429 (after the retries): ``retry_after_s``
          └── ServerError           5xx (after the retries)
"""

from __future__ import annotations


class LedgerError(Exception):
    """The root of every exception the SDK raises."""


class Blocked(LedgerError):
    """The ledger refused the call (HTTP 402): the user is past a hard limit, or the call would pass one."""

    def __init__(self, reason: str, dimension: str | None) -> None:
        super().__init__(f"blocked on {dimension or 'a limit'}: {reason}")
        self.reason = reason
        self.dimension = dimension


class TransportError(LedgerError):
    """The API could not be reached or did not answer in time, after every retry."""


class APIError(LedgerError):
    """The API answered with an error status."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class AuthenticationError(APIError):
    """401: the key is missing, unknown or revoked."""


class PermissionDenied(APIError):
    """403: the key lacks the scope this call needs."""


class NotFound(APIError):
    """404: no such user (or it belongs to another tenant)."""


class InvalidRequest(APIError):
    """400, 409, 413 or 422: the request itself is wrong; retrying will not help."""


class RateLimited(APIError):
    """429, still, after the retries."""

    def __init__(self, status_code: int, detail: str, retry_after_s: float | None) -> None:
        super().__init__(status_code, detail)
        self.retry_after_s = retry_after_s


class ServerError(APIError):
    """5xx, still, after the retries."""


_BY_STATUS: dict[int, type[APIError]] = {401: AuthenticationError, 403: PermissionDenied, 404: NotFound}


def error_for(status_code: int, detail: str, retry_after_s: float | None = None) -> APIError:
    """The exception for an error status."""
    if status_code == 429:
        return RateLimited(status_code, detail, retry_after_s)
    if status_code >= 500:
        return ServerError(status_code, detail)
    return _BY_STATUS.get(status_code, InvalidRequest)(status_code, detail)
