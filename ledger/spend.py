"""Live spend: what a user has spent and how close they are to each limit, read from their account.

A spend query is a command in the user's partition, so its answer reflects every command written there
before it (read your writes). It changes nothing: time is the question's ``occurred_at``, and a period that
has ended by then shows as the new, empty period without rolling the stored account.
"""

from __future__ import annotations

from decimal import Decimal

from ledger.account import (
    BALANCE,
    PERIOD_DIMENSIONS,
    Account,
    Decision,
    PlanLookup,
    Result,
    current_period,
    limit_of,
    session_timeout,
)
from ledger.events import LimitStatus, LimitUse, SessionSpend, SpendAnswer, SpendQueried
from ledger.money import ZERO
from ledger.periods import session_expired
from ledger.plans import Plan

_SEVERITY: dict[str, int] = {"ok": 0, "warning": 1, "blocked": 2}


def spend(account: Account | None, command: SpendQueried, plans: PlanLookup) -> Decision:
    at = command.occurred_at
    if account is None or account.plan_id is None or account.anchor is None:
        return Decision(result=Result.ok, reply=SpendAnswer(
            request_id=command.request_id, tenant=command.tenant, user=command.user, status="no_plan", as_of=at))
    history = plans(account.tenant, account.plan_id)
    assert history is not None
    plan = history.newest
    # A subscription that starts later (or a clock behind the anchor) shows its first period, still empty.
    period_start, period_end = current_period(account, plan, max(at, account.anchor))
    # No period yet (never used, or re-anchored since): the totals held are not this period's.
    same_period = account.period_start is not None and period_start <= account.period_start
    if same_period:
        # Before the account's period (a question dated earlier than the newest event) the account's period is shown.
        assert account.period_start is not None
        period_start, period_end = account.period_start, account.period_end or period_end
    period_spend = account.period_spend if same_period else ZERO
    model_tokens = dict(account.period_tokens) if same_period else {}
    blocked = {key for key, block in account.blocks.items()
               if same_period or block.dimension not in PERIOD_DIMENSIONS}
    period_scope = f"period:{period_start.isoformat()}"

    limits = [_use(plan, "period_spend", None, period_scope, period_spend, "period_spend:" in blocked)]
    limits += [_use(plan, "model_tokens", model, period_scope, Decimal(model_tokens.get(model, 0)),
                    f"model_tokens:{model}" in blocked) for model in sorted(plan.model_limits)]
    sessions = []
    for session in sorted(account.sessions.values(), key=lambda s: (s.started_at, s.session_id)):
        version = history.versions[session.plan_version]
        if session_expired(session.last_at, at, session_timeout(version)):
            continue
        sessions.append(SessionSpend(session_id=session.session_id, started_at=session.started_at, spend=session.spend))
        limits.append(_use(version, "session_spend", None, session.scope, session.spend, False))
    used_limits = [use for use in limits if use is not None]
    balance = None
    status: LimitStatus = "ok"
    if plan.billing_mode == "paygo":
        balance = account.balance
        if BALANCE in account.blocks or balance <= ZERO:
            status = "blocked"
    for use in used_limits:
        if _SEVERITY[use.status] > _SEVERITY[status]:
            status = use.status
    return Decision(result=Result.ok, reply=SpendAnswer(
        request_id=command.request_id, tenant=command.tenant, user=command.user, status=status, as_of=at,
        plan_id=plan.plan_id, plan_name=plan.name, plan_version=plan.version,
        period_start=period_start, period_end=period_end, period_spend=period_spend, sessions=sessions,
        model_tokens=model_tokens, limits=used_limits, balance=balance,
        reserved=sum((r.cost for r in account.reservations.values() if r.expires_at > at), ZERO),
    ))


def _use(plan: Plan, dimension: str, model: str | None, scope: str, used: Decimal, blocked: bool) -> LimitUse | None:
    limit = limit_of(plan, dimension, model)
    if not limit:  # None or 0: unlimited
        return None
    soft, hard = plan.soft_gate_at * limit, plan.hard_gate_at * limit
    status: LimitStatus = "blocked" if blocked or used >= hard else "warning" if used >= soft else "ok"
    return LimitUse(dimension=dimension, model=model, scope=scope, limit=limit,  # type: ignore[arg-type]
                    soft_threshold=soft, hard_threshold=hard, used=used, remaining=max(hard - used, ZERO),
                    status=status)

