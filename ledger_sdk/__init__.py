"""The usage ledger's Python SDK: record usage, check before a call, read spend, follow gate events.

    from ledger_sdk import LedgerClient

    with LedgerClient("http://127.0.0.1:18000", api_key) as ledger:
        outcome = ledger.record_usage("u42", "gpt-4o", input_tokens=1200, output_tokens=300)

Everything public is listed in ``__all__``; modules starting with ``_`` are private.
"""

from ledger_sdk._client import AsyncLedgerClient, GateStream, LedgerClient
from ledger_sdk._errors import (
    APIError,
    AuthenticationError,
    Blocked,
    InvalidRequest,
    LedgerError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    TransportError,
)
from ledger_sdk._transport import KafkaUsageTransport, RetryPolicy
from ledger_sdk._types import (
    CheckResult,
    GateEvent,
    HistoryRow,
    LimitUse,
    Outcome,
    SessionSpend,
    Spend,
    UsageEvent,
)
from ledger_sdk._wrapper import AsyncMeteredCall, SyncMeteredCall, async_metered_call, metered_call, usage_tokens

__all__ = [
    "APIError",
    "AsyncLedgerClient",
    "AsyncMeteredCall",
    "AuthenticationError",
    "Blocked",
    "CheckResult",
    "GateEvent",
    "GateStream",
    "HistoryRow",
    "InvalidRequest",
    "KafkaUsageTransport",
    "LedgerClient",
    "LedgerError",
    "LimitUse",
    "NotFound",
    "Outcome",
    "PermissionDenied",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "SessionSpend",
    "Spend",
    "SyncMeteredCall",
    "TransportError",
    "UsageEvent",
    "async_metered_call",
    "metered_call",
    "usage_tokens",
]
