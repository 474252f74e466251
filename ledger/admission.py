"""Pre-call checks and reservations: may this user make this call?

A check is a command in the user's partition, so checks and usage are decided
in one order: parallel callers cannot all pass a check-then-spend race. A
reserving check that is admitted holds its estimate against every limit until
the call's usage settles it (by ``reservation_id``) or it expires in event time.

Admission: for every limited dimension, used + held by reservations + this
estimate must stay at or under the hard threshold, and the user must not
already be hard-blocked on it. Overshoot is therefore bounded by how much the
actual usage of admitted calls exceeds their estimates.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from decimal import Decimal

from ledger.account import (
    BALANCE,
    RESERVATIONS_PER_USER_MAX,
    Account,
    Decision,
    PlanLookup,
    Reservation,
    Result,
    current_period,
    expire_reservations,
    limit_of,
    remember,
    roll_period,
    session_timeout,
)
from ledger.events import CheckAnswer, CheckRequested, GateEvent
from ledger.money import ZERO
from ledger.periods import session_expired
from ledger.pricing import price


def answer_again(account: Account, command: CheckRequested) -> Decision:
    """A check whose id (the reservation's) was decided before: a retry. It changes nothing.

    Its request id and time differ from the first attempt's, so it is recognised by id alone. A
    reservation still held is confirmed, so a client that lost the first answer can retry without
    holding its estimate twice; otherwise the first answer was a refusal, or the reservation has been
    settled or has expired, and the retry is refused.
    """
    held = account.reservations.get(command.event_id)
    if held is not None and held.expires_at > command.occurred_at:
        reply = _answer(command, "allow", f"reservation {command.event_id} is held (this check was admitted before)",
                        cost=held.cost, reserved=True)
    else:
        reply = _answer(command, "block", f"check {command.event_id} was decided before and holds nothing now "
                                          "(refused, settled or expired): check again with a new id",
                        dimension="reservations")
    return Decision(result=Result.duplicate, code="duplicate", reason=reply.reason, reply=reply)


def _answer(command: CheckRequested, decision: str, reason: str, *, dimension: str | None = None,
            remaining: dict[str, Decimal] | None = None, cost: Decimal | None = None,
            reserved: bool = False) -> CheckAnswer:
    return CheckAnswer(request_id=command.request_id, reservation_id=command.event_id if reserved else None,
                       tenant=command.tenant, user=command.user, decision=decision,  # type: ignore[arg-type]
                       reason=reason, dimension=dimension, remaining=remaining or {}, estimate_cost=cost)


def check(account: Account | None, command: CheckRequested, plans: PlanLookup) -> Decision:
    answer = functools.partial(_answer, command)
    if account is None or account.plan_id is None or account.anchor is None:
        return Decision(result=Result.ok, reply=answer("block", f"user {command.user} has no plan", dimension="plan"))
    history = plans(command.tenant, account.plan_id)
    assert history is not None
    at = command.occurred_at
    if at < account.anchor:
        return Decision(result=Result.ok, reply=answer("block", "the call precedes the subscription start",
                                                       dimension="plan"))
    newest = history.newest
    session = account.sessions.get(command.session_id)
    if session is not None and session_expired(session.last_at, at, session_timeout(history.versions[session.plan_version])):
        session = None
    plan = history.versions[session.plan_version] if session else newest
    if not plan.allows(command.model):
        return Decision(result=Result.ok, reply=answer(
            "block", f"model {command.model!r} is not allowed on plan {plan.name!r}", dimension="model"))
    input_tokens, output_tokens = command.input_tokens, command.output_tokens
    if input_tokens is None and output_tokens is None:
        # No estimate: the plan's pre_call_estimate, priced as output tokens (the dearer side).
        input_tokens, output_tokens = 0, plan.pre_call_estimate or 0
    input_tokens, output_tokens = input_tokens or 0, output_tokens or 0
    cost = price(plan, command.model, input_tokens, output_tokens, {})
    assert cost is not None
    tokens = input_tokens + output_tokens

    # Keep the account current in event time before judging (this may lift blocks).
    if command.reserve:  # a retry of a reserving check is known by its id; a plain check holds nothing to find
        remember(account)
    expire_reservations(account, at)
    gates: tuple[GateEvent, ...] = ()
    period_start, _ = current_period(account, newest, at)
    if account.period_start is None or period_start > account.period_start:
        gates = roll_period(account, newest, at, command.event_id)

    held = list(account.reservations.values())
    held_cost = sum((r.cost for r in held), ZERO)
    dimensions = [
        ("period_spend", None, account.period_spend + held_cost, cost),
        ("session_spend", None, (session.spend if session else ZERO)
         + sum((r.cost for r in held if r.session_id == command.session_id), ZERO), cost),
        ("model_tokens", command.model, Decimal(account.period_tokens.get(command.model, 0)
                                                + sum(r.tokens for r in held if r.model == command.model)), Decimal(tokens)),
    ]
    remaining: dict[str, Decimal] = {}
    warn = None
    for dimension, model, used, estimate in dimensions:
        limit = limit_of(plan, dimension, model)
        if not limit:
            continue
        name = f"{dimension}:{model}" if model else dimension
        hard, soft = plan.hard_gate_at * limit, plan.soft_gate_at * limit
        projected = used + estimate
        block = account.blocks.get(f"{dimension}:{model or ''}")
        if block is not None:
            # Already blocked: say so (and since which gate), not what this call would add to it.
            return Decision(result=Result.ok, account=account, gates=gates, reply=answer(
                "block", f"user {command.user} is blocked on {name} since its hard block at {block.threshold} "
                         f"of {block.limit} ({block.scope}, plan version {block.plan_version})",
                dimension=name, cost=cost))
        if projected > hard:
            return Decision(result=Result.ok, account=account, gates=gates, reply=answer(
                "block", f"{name} would reach {projected} of its hard limit {hard}", dimension=name, cost=cost))
        if projected >= soft and warn is None:
            warn = f"{name} would reach {projected}, past its soft threshold {soft}"
        remaining[name] = hard - projected
    if plan.billing_mode == "paygo":
        left = account.balance - held_cost - cost
        if BALANCE in account.blocks or left < ZERO:
            return Decision(result=Result.ok, account=account, gates=gates, reply=answer(
                "block", f"the prepaid balance {account.balance} does not cover this call", dimension="balance",
                cost=cost))
        remaining["balance"] = left
    if command.reserve:
        if len(account.reservations) >= RESERVATIONS_PER_USER_MAX:
            return Decision(result=Result.ok, account=account, gates=gates, reply=answer(
                "block", f"more than {RESERVATIONS_PER_USER_MAX} reservations are open", dimension="reservations"))
        account.reservations[command.event_id] = Reservation(
            reservation_id=command.event_id, session_id=command.session_id, model=command.model, cost=cost,
            tokens=tokens, expires_at=at + timedelta(seconds=command.ttl_seconds))
    reply = answer("warn" if warn else "allow", warn or "within every limit", remaining=remaining, cost=cost,
                   reserved=command.reserve)
    return Decision(result=Result.ok, account=account, gates=gates, reply=reply)
