"""Events: the commands that enter the usage log, and the facts the ledger emits.

Every event is immutable, past tense and self-identifying: a client-generated
``event_id``, tenant, user, a timezone-aware ``occurred_at`` and a schema
version. The wire format is JSON with a ``type`` tag; money travels as decimal
strings.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

from ledger.plans import Plan

SCHEMA_VERSION: Literal[1] = 1
EVENT_ID_LENGTH_MAX = 128
NAME_LENGTH_MAX = 128
TOKENS_PER_EVENT_MAX = 10_000_000
TOOL_CALLS_PER_EVENT_MAX = 10_000
TOOLS_PER_EVENT_MAX = 64

EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=EVENT_ID_LENGTH_MAX)]
Tenant = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_LENGTH_MAX)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=TOKENS_PER_EVENT_MAX)]
ToolCalls = Annotated[int, msgspec.Meta(ge=0, le=TOOL_CALLS_PER_EVENT_MAX)]
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
# Every time a command may carry lies in [TIMESTAMP_MIN, TIMESTAMP_MAX): far enough out for any real
# subscription, near enough that period arithmetic (a trial, then a year, then the next) never leaves
# datetime's range (year 9999), and the span the history's open-ended queries cover. No clock is read: the
# bound is fixed. See docs/security.md.
TIMESTAMP_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TIMESTAMP_MAX = datetime(2100, 1, 1, tzinfo=UTC)

DEFAULT_SESSION = "default"


def timestamp_problem(name: str, value: datetime | None) -> str | None:
    """Why ``value`` cannot be a command's time, or None; naive times are refused by the type before this."""
    if value is None or value.utcoffset() is None:
        return None
    if not TIMESTAMP_MIN <= value < TIMESTAMP_MAX:
        return (f"{name}: {value.isoformat()} is outside the times the ledger accepts, "
                f"[{TIMESTAMP_MIN.isoformat()}, {TIMESTAMP_MAX.isoformat()})")
    return None


def _check_times(**times: datetime | None) -> None:
    for name, value in times.items():
        problem = timestamp_problem(name, value)
        if problem is not None:
            raise ValueError(problem)  # msgspec makes it a ValidationError when decoding: a dead letter


class Command(msgspec.Struct, frozen=True, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """Anything written to the usage log. Ordered per user by its partition."""

    event_id: EventId
    tenant: Tenant
    occurred_at: Timestamp
    schema_version: Literal[1] = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_times(occurred_at=self.occurred_at)


class UsageRecorded(Command, frozen=True, tag="usage"):
    """One model call a user made."""

    user: Name
    model: Name
    input_tokens: Tokens
    output_tokens: Tokens
    session_id: Name = DEFAULT_SESSION
    tools: Annotated[dict[Name, ToolCalls], msgspec.Meta(max_length=TOOLS_PER_EVENT_MAX)] = {}
    # The reservation this call settles (from a reserving pre-call check).
    reservation_id: EventId | None = None


class PlanAssigned(Command, frozen=True, tag="plan_assigned"):
    """A user was put on a plan; their periods are anchored at ``period_start``."""

    user: Name
    plan_id: Name
    period_start: Timestamp

    def __post_init__(self) -> None:
        _check_times(occurred_at=self.occurred_at, period_start=self.period_start)


class ToppedUp(Command, frozen=True, tag="topped_up"):
    """Money was added to a pay-as-you-go user's prepaid balance."""

    user: Name
    amount: Decimal


class CheckRequested(Command, frozen=True, tag="check"):
    """May ``user`` make this call? With ``reserve``, hold the estimate until the call's usage settles it.

    ``event_id`` is the reservation's id; the answer goes to the replies topic under ``request_id``.
    """

    user: Name
    model: Name
    request_id: EventId
    session_id: Name = DEFAULT_SESSION
    input_tokens: Tokens | None = None
    output_tokens: Tokens | None = None
    reserve: bool = False
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1, le=86_400)] = 600


class SpendQueried(Command, frozen=True, tag="spend"):
    """What has ``user`` spent, and how close are they to each limit? Read-only: it changes no state.

    Asked in the user's partition, so the answer includes every command written there before it.
    The answer goes to the replies topic under ``request_id``.
    """

    user: Name
    request_id: EventId


class ClockTicked(msgspec.Struct, frozen=True, tag="tick", tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """Time passed (written to every partition), so periods end even without traffic."""

    event_id: EventId
    occurred_at: Timestamp
    schema_version: Literal[1] = SCHEMA_VERSION


class PlanPublished(Command, frozen=True, tag="plan_published"):
    """A plan version exists. Written to every partition of the usage log."""

    plan: Plan


AnyCommand = UsageRecorded | PlanAssigned | PlanPublished | ToppedUp | CheckRequested | SpendQueried | ClockTicked
UserCommand = UsageRecorded | PlanAssigned | ToppedUp | CheckRequested | SpendQueried

ENVELOPE_COMMANDS_MAX = 1000


class Envelope(msgspec.Struct, frozen=True, tag="envelope", tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """Many commands of one usage-log partition in one record: usage, plan assignments, top-ups and checks.

    The processor's consumer pays about the same per record whatever it holds, so volume
    travels this way. Each command is read apart from the others (``msgspec.Raw``): a bad
    one is dead-lettered alone. Each keeps its id and its place in its user's order (the
    list's order), and each command's user must belong to the record's partition. A record
    holding one plain command stays valid.
    """

    commands: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=ENVELOPE_COMMANDS_MAX)]


def user_key(tenant: str, user: str) -> str:
    """The Kafka key of everything about one user: one partition, one order."""
    return f"{tenant}/{user}"


def payload_digest(command: Command | ClockTicked) -> str:
    """Fingerprint of a command's content, to tell a retry from a conflict."""
    return hashlib.blake2b(msgspec.json.encode(command), digest_size=8).hexdigest()


# -- what the ledger emits ---------------------------------------------------


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A priced usage event with the user's running totals after it."""

    tenant: str
    user: str
    event_id: str
    seq: int
    session_id: str
    session_started_at: datetime
    model: str
    input_tokens: int
    output_tokens: int
    tool_calls: int
    cost: Decimal
    plan_id: str
    plan_name: str
    plan_version: int
    period_start: datetime
    period_end: datetime
    occurred_at: datetime
    # Running totals after this entry; None on a late entry (its period is closed).
    period_spend: Decimal | None
    session_spend: Decimal | None
    period_model_tokens: int | None
    late: bool = False
    schema_version: int = SCHEMA_VERSION


GateKind = Literal["soft_warning", "hard_block", "unblocked"]
Dimension = Literal["period_spend", "session_spend", "model_tokens", "balance"]


class GateEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A user crossed (or came back under) a threshold. One per crossing."""

    gate_id: str
    tenant: str
    user: str
    kind: GateKind
    dimension: Dimension
    model: str | None
    threshold: Decimal
    used: Decimal
    limit: Decimal
    scope: str
    plan_id: str
    plan_version: int
    cause_event_id: str
    occurred_at: datetime
    # True when a late event changed a closed period: the crossing happened there, after the fact.
    correction: bool = False
    schema_version: int = SCHEMA_VERSION


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """An event the ledger could not apply, with the reason. Nothing is dropped silently."""

    rejection_id: str
    code: str
    reason: str
    key: str | None
    payload: str
    payload_encoding: Literal["utf-8", "base64"]
    source_topic: str
    source_partition: int
    source_offset: int
    tenant: str | None = None
    user: str | None = None
    event_id: str | None = None
    schema_version: int = SCHEMA_VERSION


class CheckAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a pre-call check: allow, warn (allowed, past a soft threshold) or block."""

    request_id: str
    reservation_id: str | None
    tenant: str
    user: str
    decision: Literal["allow", "warn", "block"]
    reason: str
    dimension: str | None = None
    # Remaining headroom per limited dimension after this call, e.g. {"period_spend": "4.25"}.
    remaining: dict[str, Decimal] = {}
    estimate_cost: Decimal | None = None
    schema_version: int = SCHEMA_VERSION


LimitStatus = Literal["ok", "warning", "blocked"]


class LimitUse(msgspec.Struct, frozen=True, kw_only=True):
    """One limited dimension: what is used of it now and what is left before its hard threshold."""

    dimension: Dimension
    model: str | None
    scope: str
    limit: Decimal
    soft_threshold: Decimal
    hard_threshold: Decimal
    used: Decimal
    remaining: Decimal
    status: LimitStatus


class SessionSpend(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    started_at: datetime
    spend: Decimal


class SpendAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """A user's live spend, from the processor's state as of ``as_of`` (the question's time)."""

    request_id: str
    tenant: str
    user: str
    status: Literal["ok", "warning", "blocked", "no_plan"]
    as_of: datetime
    plan_id: str | None = None
    plan_name: str | None = None
    plan_version: int | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None
    period_spend: Decimal | None = None
    sessions: list[SessionSpend] = []
    model_tokens: dict[str, int] = {}
    limits: list[LimitUse] = []
    # Pay-as-you-go only: the prepaid balance left.
    balance: Decimal | None = None
    # Estimates held by open reservations, not yet spent.
    reserved: Decimal | None = None
    schema_version: int = SCHEMA_VERSION
