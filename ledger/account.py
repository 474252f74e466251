"""The per-user account: a fold over that user's partition of the usage log.

``decide(account, command, plans)`` is where the ledger's rules live. It reads
no clock (time is the event's ``occurred_at``), does no I/O, and returns a
:class:`Decision`: the outcome as a value, the new account to store, and the
facts to emit. Dedup happens here, in the same state update that applies the
spend, so a crash can never record an id without its spend or the reverse.

For speed the fold updates the account it is given once every check has
passed: callers store ``decision.account`` and must not keep the old value.
A rejected, duplicate or conflicting command leaves the account untouched.
A caller that must keep the old value until the new one is durable (the
processor) folds a :func:`clone`.
"""

from __future__ import annotations

import enum
import functools
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal

import msgspec

from ledger.events import (
    AnyCommand,
    CheckAnswer,
    CheckRequested,
    ClockTicked,
    GateEvent,
    LedgerEntry,
    PlanAssigned,
    PlanPublished,
    SpendAnswer,
    SpendQueried,
    ToppedUp,
    UsageRecorded,
    UserCommand,
    payload_digest,
)
from ledger.money import ZERO, add, money
from ledger.periods import billing_period, session_expired
from ledger.plans import Plan
from ledger.pricing import price

# The dedup horizon: a user's last this-many remembered command ids (see Seen).
DEDUP_WINDOW_EVENTS_PER_USER = 1000
OPEN_SESSIONS_PER_USER_MAX = 256
RESERVATIONS_PER_USER_MAX = 1000
CLOSED_PERIODS_KEPT = 2
TOPUP_AMOUNT_MAX = Decimal(1_000_000)
GATE_NAMESPACE = uuid.UUID("0c7f3f2e-4b1d-5f0a-9a6e-7d2b9e51c3a4")
# Blocks on these dimensions last for the period; a new period lifts them.
PERIOD_DIMENSIONS = frozenset({"period_spend", "model_tokens"})
BALANCE = "balance:"  # the block key and crossing-key prefix of the prepaid balance


class Result(enum.Enum):
    """Outcomes in order of precedence."""

    ok = "ok"
    duplicate = "duplicate"
    conflict = "conflict"
    rejected = "rejected"


class PlanHistory(msgspec.Struct, kw_only=True, tag="plan_history"):
    """Every version of one plan, as this partition has seen them."""

    tenant: str
    plan_id: str
    versions: dict[int, Plan] = {}
    # The log position this value reflects (see Account.applied_to).
    applied_to: int = 0

    @property
    def newest(self) -> Plan:
        return self.versions[max(self.versions)]


class SessionState(msgspec.Struct, kw_only=True, array_like=True):
    session_id: str
    started_at: datetime
    last_at: datetime
    plan_version: int
    spend: Decimal = ZERO
    crossed: list[str] = []

    @property
    def scope(self) -> str:
        return f"session:{self.session_id}@{self.started_at.isoformat()}"


class Reservation(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """An admitted call's estimate, held until its usage settles it or it expires (event time)."""

    reservation_id: str
    session_id: str
    model: str
    cost: Decimal
    tokens: int
    expires_at: datetime


class Block(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """A hard block in force, remembered so that lifting it can be announced once."""

    dimension: str
    model: str | None
    scope: str
    threshold: Decimal
    limit: Decimal
    plan_id: str
    plan_version: int


class ClosedPeriod(msgspec.Struct, kw_only=True, array_like=True):
    """A recent period's final totals, kept so a late event can still correct them."""

    spend: Decimal
    tokens: dict[str, int]
    crossed: list[str]


class Seen(msgspec.Struct, frozen=True, array_like=True):
    """A command id a user's dedup horizon took: the ``n``-th one the account remembered, and its payload's digest.

    Ids live apart from the account (the processor stores one value per id), so an
    account stays a few hundred bytes whatever its history. An id counts as seen
    while it is among the account's last DEDUP_WINDOW_EVENTS_PER_USER remembered
    ids (:func:`within_horizon`); past that a value may linger until it is swept,
    and means nothing.
    """

    n: int
    digest: str


# A user's remembered ids: event id -> what was remembered under it, or None.
SeenLookup = Callable[[str], "Seen | None"]


def nothing_seen(event_id: str) -> Seen | None:
    return None


def within_horizon(account: Account, seen: Seen | None) -> Seen | None:
    """``seen`` if it is among the account's last DEDUP_WINDOW_EVENTS_PER_USER remembered ids, else None.

    A value numbered past the account's count was written by a batch whose account
    write never landed (a crash between them): the batch is applied again, and so is that id.
    """
    if seen is None or not 0 <= account.remembered - seen.n < DEDUP_WINDOW_EVENTS_PER_USER:
        return None
    return seen


# Stored as an array (``["account", tenant, user, ...]``), its parts too: field names were most of an account's
# bytes (a user past two hard limits took 1,155 bytes as an object, 777 as arrays; docs/state.md). Every field is
# written, defaults too (msgspec omits none from an array); a shorter array reads the missing fields at the end
# as their defaults, so new fields go at the end, with one. Accounts stored as objects, before, are read by
# ``streams.codecs.decode_state``.
class Account(msgspec.Struct, kw_only=True, tag="account", array_like=True):
    tenant: str
    user: str
    # The offset, in its partition of the usage log, after the last record folded into this value.
    # The fold never reads it; the processor stamps it, so that a record read again after a crash
    # is recognised by its offset (offset < applied_to: already in this value), however old it is.
    applied_to: int = 0
    seq: int = 0
    # How many command ids this account has remembered; the newest is Seen.n == remembered.
    remembered: int = 0
    plan_id: str | None = None
    anchor: datetime | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None
    period_spend: Decimal = ZERO
    period_tokens: dict[str, int] = {}
    crossed: list[str] = []
    sessions: dict[str, SessionState] = {}
    blocks: dict[str, Block] = {}
    reservations: dict[str, Reservation] = {}
    # Pay-as-you-go: the prepaid balance, and how many top-ups opened a new balance scope.
    balance: Decimal = ZERO
    topups: int = 0
    # period start (ISO) -> totals of the last CLOSED_PERIODS_KEPT periods, oldest first.
    closed: dict[str, ClosedPeriod] = {}


def clone(account: Account) -> Account:
    """A copy that the fold may update without touching ``account`` (every mutable part is copied)."""
    return msgspec.structs.replace(
        account,
        period_tokens=dict(account.period_tokens),
        crossed=list(account.crossed),
        sessions={sid: msgspec.structs.replace(s, crossed=list(s.crossed)) for sid, s in account.sessions.items()},
        blocks=dict(account.blocks),
        reservations=dict(account.reservations),
        closed={k: ClosedPeriod(spend=c.spend, tokens=dict(c.tokens), crossed=list(c.crossed))
                for k, c in account.closed.items()},
    )


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    result: Result
    account: Account | None = None
    plan_history: PlanHistory | None = None
    # The command id this decision remembered, to store beside the account (event id, value).
    remembered: tuple[str, Seen] | None = None
    entry: LedgerEntry | None = None
    gates: tuple[GateEvent, ...] = ()
    reply: CheckAnswer | SpendAnswer | None = None
    code: str = ""
    reason: str = ""


PlanLookup = Callable[[str, str], PlanHistory | None]


def reject(code: str, reason: str) -> Decision:
    return Decision(result=Result.rejected, code=code, reason=reason)


def decide(account: Account | None, command: AnyCommand, plans: PlanLookup, seen: SeenLookup = nothing_seen) -> Decision:
    """Apply one command from a user's partition (or a broadcast plan version or clock tick).

    ``seen`` finds the ids this user's account remembered (the processor's dedup store);
    a decision that remembers one more says so in ``Decision.remembered``.
    """
    if isinstance(command, PlanPublished):
        return _publish_plan(plans(command.tenant, command.plan.plan_id), command)
    if isinstance(command, ClockTicked):
        return _tick(account, command, plans)
    if isinstance(command, SpendQueried):
        from ledger.spend import spend  # read-only, and never remembered: asking twice is not a duplicate

        return spend(account, command, plans)
    before = account.remembered if account is not None else 0  # the fold updates the account in place
    if isinstance(command, CheckRequested):
        from ledger.admission import answer_again, check  # admission builds on this module's state and helpers

        # A check's request id and time differ on every attempt, so a retry is known by its id alone. A
        # plain check holds nothing: asking again is just asking.
        if command.reserve and account is not None and within_horizon(account, seen(command.event_id)):
            return answer_again(account, command)
        return _noting_remembered(check(account, command, plans), command, before)
    if account is not None:
        earlier = within_horizon(account, seen(command.event_id))
        if earlier is not None:
            if earlier.digest == payload_digest(command):
                return Decision(result=Result.duplicate, code="duplicate",
                                reason=f"event {command.event_id} was already applied")
            return Decision(result=Result.conflict, code="conflict",
                            reason=f"event id {command.event_id} was already applied "
                                   "with a different payload; this one is not applied")
    if isinstance(command, PlanAssigned):
        decision = _assign_plan(account, command, plans)
    elif isinstance(command, ToppedUp):
        decision = _top_up(account, command, plans)
    else:
        decision = _record_usage(account, command, plans)
    return _noting_remembered(decision, command, before)


def _noting_remembered(decision: Decision, command: UserCommand, before: int) -> Decision:
    """The decision, carrying the command's id if its fold remembered it (the account's count moved past ``before``)."""
    after = decision.account
    if after is None or after.remembered == before:
        return decision
    return msgspec.structs.replace(
        decision, remembered=(command.event_id, Seen(n=after.remembered, digest=payload_digest(command))))


def _publish_plan(history: PlanHistory | None, command: PlanPublished) -> Decision:
    plan = command.plan
    if plan.version < 1:
        return reject("invalid_plan", f"plan {plan.plan_id} version must be 1 or more")
    if history is not None and plan.version in history.versions:
        if history.versions[plan.version] == plan:
            return Decision(result=Result.duplicate, code="duplicate",
                            reason=f"plan {plan.plan_id} v{plan.version} is already published")
        return Decision(result=Result.conflict, code="conflict",
                        reason=f"plan {plan.plan_id} v{plan.version} was already published "
                               "with different content; publish a new version instead")
    versions = {**(history.versions if history else {}), plan.version: plan}
    return Decision(result=Result.ok,
                    plan_history=PlanHistory(tenant=command.tenant, plan_id=plan.plan_id, versions=versions))


def _assign_plan(account: Account | None, command: PlanAssigned, plans: PlanLookup) -> Decision:
    history = plans(command.tenant, command.plan_id)
    if history is None:
        return reject("unknown_plan", f"plan {command.plan_id} is not published for tenant {command.tenant}")
    account = account or Account(tenant=command.tenant, user=command.user)
    if account.plan_id != command.plan_id:
        # A plan change closes open sessions: the next call starts one on the new plan.
        account.sessions = {}
    if account.anchor != command.period_start:
        account.period_start = account.period_end = None
    account.plan_id = command.plan_id
    account.anchor = command.period_start
    remember(account)
    # An upgrade may lift a limit the user is blocked on.
    gates = _lift_blocks(account, history.newest, command, lambda block: _still_blocked(account, history.newest, block))
    return Decision(result=Result.ok, account=account, gates=gates)


def _top_up(account: Account | None, command: ToppedUp, plans: PlanLookup) -> Decision:
    if account is None or account.plan_id is None:
        return reject("no_plan", f"user {command.user} has no plan: assign one before topping up")
    problem = top_up_problem(command.amount)
    if problem is not None:
        return reject("invalid_amount", problem)
    history = plans(command.tenant, account.plan_id)
    assert history is not None
    account.balance = add(account.balance, money(command.amount))
    remember(account)
    gates = _lift_blocks(account, history.newest, command,
                         lambda block: block.dimension != "balance" or account.balance <= ZERO)
    if BALANCE not in account.blocks:
        account.topups += 1  # a new balance scope: the next time it runs out is a new crossing
        account.crossed = [key for key in account.crossed if not key.startswith(BALANCE)]
    return Decision(result=Result.ok, account=account, gates=gates)


def top_up_problem(amount: Decimal) -> str | None:
    """Why ``amount`` cannot be topped up, or None when it can."""
    if not amount.is_finite() or not ZERO < amount <= TOPUP_AMOUNT_MAX:
        return f"amount must be above 0 and at most {TOPUP_AMOUNT_MAX}, got {amount}"
    return None


def _tick(account: Account | None, command: ClockTicked, plans: PlanLookup) -> Decision:
    """Time passed: a period that ended lifts its blocks; expired reservations are released."""
    if account is None or account.plan_id is None or account.anchor is None:
        return Decision(result=Result.ok)
    history = plans(account.tenant, account.plan_id)
    assert history is not None
    at = command.occurred_at
    expired = expire_reservations(account, at)
    if account.period_end is None or at < account.period_end:
        # Most ticks change nothing: say so, and the processor stores nothing.
        return Decision(result=Result.ok, account=account if expired else None)
    return Decision(result=Result.ok, account=account, gates=roll_period(account, history.newest, at, command.event_id))


def _record_usage(account: Account | None, command: UsageRecorded, plans: PlanLookup) -> Decision:
    if account is None or account.plan_id is None or account.anchor is None:
        return reject("no_plan", f"user {command.user} has no plan: assign one before recording usage")
    history = plans(command.tenant, account.plan_id)
    if history is None:
        return reject("unknown_plan", f"plan {account.plan_id} is not published")
    at = command.occurred_at
    if at < account.anchor:
        return reject("before_subscription",
                      f"usage at {at.isoformat()} precedes the subscription start {account.anchor.isoformat()}")
    newest = history.newest
    period_start, period_end = current_period(account, newest, at)
    late = account.period_start is not None and period_start < account.period_start

    session = account.sessions.get(command.session_id)
    new_session = session is None or session_expired(session.last_at, at, session_timeout(history.versions[session.plan_version]))
    if new_session:
        session = SessionState(session_id=command.session_id, started_at=at, last_at=at,
                               plan_version=newest.version)
    assert session is not None
    plan = history.versions[session.plan_version]
    cost = price(plan, command.model, command.input_tokens, command.output_tokens, command.tools)
    if cost is None:
        return reject("model_not_allowed",
                      f"model {command.model!r} is not allowed on plan {plan.name!r} (v{plan.version})")

    # Every check passed: from here on the account is updated.
    tokens = command.input_tokens + command.output_tokens
    account.seq += 1
    remember(account)
    if command.reservation_id is not None:
        account.reservations.pop(command.reservation_id, None)
    expire_reservations(account, at)
    if plan.billing_mode == "paygo":
        account.balance = add(account.balance, -cost)
    if late:
        # The entry carries its own (closed) period, so history counts it there.
        # If that period is among the last few, its totals move and any threshold
        # the late event crossed there is reported as a correction.
        corrections = _late_corrections(account, plan, command, cost, tokens, period_start)
        entry = _entry(account, command, session, plan, cost, period_start, period_end, late=True,
                       period_spend=None, session_spend=None, model_tokens=None)
        return Decision(result=Result.ok, account=account, entry=entry,
                        gates=(*corrections, *_balance_gates(account, plan, command)))

    gates: list[GateEvent] = []
    if account.period_start != period_start:
        gates += roll_period(account, newest, at, command.event_id)
    account.period_spend = add(account.period_spend, cost)
    account.period_tokens[command.model] = account.period_tokens.get(command.model, 0) + tokens
    session.spend = add(session.spend, cost)
    session.last_at = max(session.last_at, at)
    account.sessions[command.session_id] = session
    if new_session:  # only a new session grows the map, so only then is there anything to bound
        _prune_sessions(account, at, history)

    gates += _crossings(account, session, plan, command)
    gates += _balance_gates(account, plan, command)
    entry = _entry(account, command, session, plan, cost, period_start, period_end, late=False,
                   period_spend=account.period_spend, session_spend=session.spend,
                   model_tokens=account.period_tokens[command.model])
    return Decision(result=Result.ok, account=account, entry=entry, gates=tuple(gates))


def current_period(account: Account, plan: Plan, at: datetime) -> tuple[datetime, datetime]:
    """The billing period containing ``at`` (the account's own when it contains it)."""
    assert account.anchor is not None
    if account.period_start is not None and account.period_end is not None and account.period_start <= at < account.period_end:
        return account.period_start, account.period_end
    return billing_period(account.anchor, plan.period_interval, plan.trial_days, at)


def roll_period(account: Account, plan: Plan, at: datetime, cause_event_id: str) -> tuple[GateEvent, ...]:
    """Enter the period containing ``at``: spend and tokens reset, period blocks are lifted."""
    if account.period_start is not None:
        account.closed[account.period_start.isoformat()] = ClosedPeriod(
            spend=account.period_spend, tokens=dict(account.period_tokens),
            crossed=[key for key in account.crossed if not key.startswith(BALANCE)])
        while len(account.closed) > CLOSED_PERIODS_KEPT:
            del account.closed[next(iter(account.closed))]
    account.period_start, account.period_end = current_period(account, plan, at)
    account.period_spend, account.period_tokens, account.crossed = ZERO, {}, [
        key for key in account.crossed if key.startswith(BALANCE)]
    # Also after a re-anchored subscription (no period was set): blocks of the old period end with it.
    return _lift_blocks(account, plan, _Cause(cause_event_id, at), lambda block: block.dimension not in PERIOD_DIMENSIONS)


class _Cause(msgspec.Struct, frozen=True):
    event_id: str
    occurred_at: datetime


def _lift_blocks(account: Account, plan: Plan, cause: AnyCommand | _Cause,
                 keep: Callable[[Block], bool]) -> tuple[GateEvent, ...]:
    """An ``unblocked`` event for each block that ``keep`` says no longer holds."""
    gates = []
    for key, block in list(account.blocks.items()):
        if keep(block):
            continue
        del account.blocks[key]
        gates.append(_gate(account, plan, cause, kind="unblocked", dimension=block.dimension, model=block.model,
                           threshold=block.threshold, used=_used(account, block.dimension, block.model),
                           limit=block.limit, scope=block.scope,
                           key=f"{key}:unblocked:{_canonical(block.threshold)}"))
    return tuple(gates)


def _still_blocked(account: Account, plan: Plan, block: Block) -> bool:
    """Whether ``block`` holds under ``plan`` (after an upgrade or downgrade)."""
    if block.dimension == "balance":
        return account.balance <= ZERO and plan.billing_mode == "paygo"
    limit = limit_of(plan, block.dimension, block.model)
    return bool(limit) and _used(account, block.dimension, block.model) >= plan.hard_gate_at * limit  # type: ignore[operator]


def limit_of(plan: Plan, dimension: str, model: str | None) -> Decimal | None:
    if dimension == "period_spend":
        return plan.max_spend_per_period
    if dimension == "session_spend":
        return plan.max_spend_per_session
    if dimension == "model_tokens" and model is not None and model in plan.model_limits:
        return Decimal(plan.model_limits[model].max_tokens_per_period)
    return None


def _used(account: Account, dimension: str, model: str | None) -> Decimal:
    if dimension == "model_tokens" and model is not None:
        return Decimal(account.period_tokens.get(model, 0))
    if dimension == "balance":
        return account.balance
    return account.period_spend


def expire_reservations(account: Account, at: datetime) -> int:
    expired = [rid for rid, r in account.reservations.items() if r.expires_at <= at]
    for rid in expired:
        del account.reservations[rid]
    return len(expired)


def session_timeout(plan: Plan) -> timedelta:
    return _minutes(plan.session_timeout_minutes)


@functools.lru_cache(maxsize=256)
def _minutes(minutes: Decimal) -> timedelta:
    return timedelta(minutes=float(minutes))


def remember(account: Account) -> None:
    """The account takes the command being folded into its dedup horizon (``decide`` reports its id)."""
    account.remembered += 1


def _prune_sessions(account: Account, at: datetime, history: PlanHistory) -> None:
    """Forget sessions that have ended by event time, and bound the rest."""
    sessions = account.sessions
    ended = [sid for sid, s in sessions.items()
             if session_expired(s.last_at, at, session_timeout(history.versions[s.plan_version]))]
    for sid in ended:
        del sessions[sid]
    if len(sessions) > OPEN_SESSIONS_PER_USER_MAX:
        for sid in sorted(sessions, key=lambda sid: sessions[sid].last_at)[:-OPEN_SESSIONS_PER_USER_MAX]:
            del sessions[sid]


def _canonical(amount: Decimal) -> str:
    """One spelling per value (0.80 x 10000 and 0.8 x 10000 are the same threshold), so ids stay stable."""
    return f"{amount.normalize():f}"


def _gate_id(account: Account, scope: str, key: str) -> str:
    return str(uuid.uuid5(GATE_NAMESPACE, f"{account.tenant}/{account.user}/{scope}/{key}"))


def _crossings(account: Account, session: SessionState, plan: Plan,
               command: UsageRecorded) -> list[GateEvent]:
    """Gate events for every threshold this event crossed for the first time."""
    assert account.period_start is not None
    model_limit = plan.model_limits.get(command.model)
    dimensions: list[tuple[str, str | None, Decimal, Decimal | None, list[str], bool]] = [
        ("period_spend", None, account.period_spend, plan.max_spend_per_period, account.crossed, False),
        ("session_spend", None, session.spend, plan.max_spend_per_session, session.crossed, True),
        ("model_tokens", command.model, Decimal(account.period_tokens[command.model]),
         Decimal(model_limit.max_tokens_per_period) if model_limit else None, account.crossed, False),
    ]
    gates = []
    for dimension, model, used, limit, crossed, per_session in dimensions:
        for kind, threshold, key in _newly_crossed(plan, dimension, model, used, limit, crossed):
            assert limit is not None
            scope = session.scope if per_session else f"period:{account.period_start.isoformat()}"
            if kind == "hard_block" and dimension in PERIOD_DIMENSIONS:
                account.blocks[f"{dimension}:{model or ''}"] = Block(
                    dimension=dimension, model=model, scope=scope, threshold=threshold, limit=limit,
                    plan_id=plan.plan_id, plan_version=plan.version)
            gates.append(_gate(account, plan, command, kind=kind, dimension=dimension, model=model,
                               threshold=threshold, used=used, limit=limit, scope=scope, key=key))
    return gates


def _newly_crossed(plan: Plan, dimension: str, model: str | None, used: Decimal, limit: Decimal | None,
                   crossed: list[str]) -> list[tuple[str, Decimal, str]]:
    """(kind, threshold, key) of each threshold ``used`` reaches for the first time; remembered in ``crossed``."""
    if not limit:  # None or 0: unlimited
        return []
    found = []
    for kind, ratio in (("soft_warning", plan.soft_gate_at), ("hard_block", plan.hard_gate_at)):
        threshold = ratio * limit
        if used < threshold:
            continue
        key = f"{dimension}:{model or ''}:{kind}:{_canonical(threshold)}"
        if key in crossed:
            continue
        crossed.append(key)
        found.append((kind, threshold, key))
    return found


def _gate(account: Account, plan: Plan, cause: AnyCommand | _Cause, *, kind: str, dimension: str, model: str | None,
          threshold: Decimal, used: Decimal, limit: Decimal, scope: str, key: str, correction: bool = False) -> GateEvent:
    return GateEvent(
        gate_id=_gate_id(account, scope, key), tenant=account.tenant, user=account.user,
        kind=kind, dimension=dimension, model=model,  # type: ignore[arg-type]
        threshold=threshold, used=used, limit=limit, scope=scope, plan_id=plan.plan_id, plan_version=plan.version,
        cause_event_id=cause.event_id, occurred_at=cause.occurred_at, correction=correction,
    )


def _late_corrections(account: Account, plan: Plan, command: UsageRecorded, cost: Decimal, tokens: int,
                      period_start: datetime) -> list[GateEvent]:
    """Thresholds a late event crossed in a recent closed period, as correction gate events."""
    closed = account.closed.get(period_start.isoformat())
    if closed is None:
        return []  # older than the periods we keep: history has it, gates cannot change any more
    closed.spend = add(closed.spend, cost)
    closed.tokens[command.model] = closed.tokens.get(command.model, 0) + tokens
    scope = f"period:{period_start.isoformat()}"
    model_limit = plan.model_limits.get(command.model)
    gates = []
    for dimension, model, used, limit in (
            ("period_spend", None, closed.spend, plan.max_spend_per_period),
            ("model_tokens", command.model, Decimal(closed.tokens[command.model]),
             Decimal(model_limit.max_tokens_per_period) if model_limit else None)):
        for kind, threshold, key in _newly_crossed(plan, dimension, model, used, limit, closed.crossed):
            assert limit is not None
            gates.append(_gate(account, plan, command, kind=kind, dimension=dimension, model=model, threshold=threshold,
                               used=used, limit=limit, scope=scope, key=key, correction=True))
    return gates


def _balance_gates(account: Account, plan: Plan, command: UsageRecorded) -> list[GateEvent]:
    """Pay-as-you-go: a hard block when the prepaid balance runs out."""
    key = f"{BALANCE}hard_block:0"
    if plan.billing_mode != "paygo" or account.balance > ZERO or key in account.crossed:
        return []
    account.crossed.append(key)
    scope = f"balance:{account.topups}"
    account.blocks[BALANCE] = Block(dimension="balance", model=None, scope=scope, threshold=ZERO, limit=ZERO,
                                       plan_id=plan.plan_id, plan_version=plan.version)
    return [_gate(account, plan, command, kind="hard_block", dimension="balance", model=None, threshold=ZERO,
                  used=account.balance, limit=ZERO, scope=scope, key=key)]


def _entry(account: Account, command: UsageRecorded, session: SessionState, plan: Plan, cost: Decimal,
           period_start: datetime, period_end: datetime, *, late: bool, period_spend: Decimal | None,
           session_spend: Decimal | None, model_tokens: int | None) -> LedgerEntry:
    return LedgerEntry(
        tenant=command.tenant, user=command.user, event_id=command.event_id, seq=account.seq,
        session_id=command.session_id, session_started_at=session.started_at, model=command.model,
        input_tokens=command.input_tokens, output_tokens=command.output_tokens,
        tool_calls=sum(command.tools.values()), cost=cost, plan_id=plan.plan_id, plan_name=plan.name,
        plan_version=plan.version, period_start=period_start, period_end=period_end,
        occurred_at=command.occurred_at, period_spend=period_spend, session_spend=session_spend,
        period_model_tokens=model_tokens, late=late,
    )
