"""The values the SDK sends and returns: usage events, per-event outcomes, check results, spend, gate events.

Money is ``Decimal`` everywhere: the API writes it as exact JSON numbers or decimal strings and
msgspec decodes both without passing through a float.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

import msgspec

OutcomeStatus = Literal["accepted", "duplicate", "conflict", "rejected"]
Decision = Literal["allow", "warn", "block"]
LimitStatus = Literal["ok", "warning", "blocked"]


def new_event_id() -> str:
    return str(uuid.uuid4())


def _now() -> datetime:
    return datetime.now(UTC)


class UsageEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One model call. ``event_id`` and ``occurred_at`` are fixed when the event is built, so every retry
    sends the same bytes and the ledger counts the call once."""

    user: str
    model: str
    input_tokens: int
    output_tokens: int
    session_id: str = "default"
    tools: dict[str, int] = {}
    reservation_id: str | None = None
    event_id: str = msgspec.field(default_factory=new_event_id)
    occurred_at: datetime = msgspec.field(default_factory=_now)


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What became of one event: ``accepted`` (in the log), ``duplicate`` (the same id and payload was
    accepted before: counted once), ``conflict`` (the same id with another payload: not applied) or
    ``rejected`` (invalid; ``reason`` says why)."""

    event_id: str | None
    status: OutcomeStatus
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """Accepted now or before: the call is counted exactly once."""
        return self.status in ("accepted", "duplicate")


class CheckResult(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a pre-call check. ``decision`` is ``block`` when the API answered 402."""

    decision: Decision
    reason: str
    reservation_id: str | None = None
    dimension: str | None = None
    remaining: dict[str, Decimal] = {}
    estimate_cost: Decimal | None = None

    @property
    def blocked(self) -> bool:
        return self.decision == "block"


class SessionSpend(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    started_at: datetime
    spend: Decimal


class LimitUse(msgspec.Struct, frozen=True, kw_only=True):
    dimension: str
    model: str | None
    scope: str
    limit: Decimal
    soft_threshold: Decimal
    hard_threshold: Decimal
    used: Decimal
    remaining: Decimal
    status: LimitStatus


class Spend(msgspec.Struct, frozen=True, kw_only=True):
    """A user's live spend (``GET /spend/{user}``)."""

    user: str
    status: LimitStatus
    plan_id: str
    plan_name: str
    plan_version: int
    period_start: datetime
    period_end: datetime
    period_spend: Decimal
    sessions: list[SessionSpend] = []
    model_tokens: dict[str, int] = {}
    limits: list[LimitUse] = []
    balance: Decimal | None = None
    reserved: Decimal = Decimal(0)


class HistoryRow(msgspec.Struct, frozen=True, kw_only=True):
    """One group of a user's history; only the keys of the chosen ``group_by`` are set."""

    calls: int
    input_tokens: int
    output_tokens: int
    tool_calls: int
    spend: Decimal
    first_at: datetime
    last_at: datetime
    day: str | None = None
    model: str | None = None
    session_id: str | None = None
    session_started_at: datetime | None = None
    plan_name: str | None = None
    plan_version: int | None = None


class GateEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A user crossed (or came back under) a threshold. ``cursor`` resumes a stream just after it."""

    gate_id: str
    user: str
    kind: Literal["soft_warning", "hard_block", "unblocked"]
    dimension: str
    model: str | None
    threshold: Decimal
    used: Decimal
    limit: Decimal
    scope: str
    plan_id: str
    plan_version: int
    cause_event_id: str
    occurred_at: datetime
    correction: bool = False
    cursor: str = ""
