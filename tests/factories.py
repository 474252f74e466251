"""Builders shared by the tests: the plans guide's plans, users, usage events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from ledger.account import Account, Decision, PlanHistory, Result, Seen, decide
from ledger.events import AnyCommand, ClockTicked, PlanAssigned, PlanPublished, UsageRecorded
from ledger.plans import Plan, parse_plans_config, plans_from_config

TENANT = "acme"
T0 = datetime(2026, 11, 1, tzinfo=UTC)
SEED_PLANS_JSON = (Path(__file__).resolve().parents[1] / "examples" / "plans.json").read_bytes()


def seed_plans(tenant: str = TENANT) -> dict[str, Plan]:
    return {p.name: p for p in plans_from_config(parse_plans_config(SEED_PLANS_JSON), tenant)}


def published(plan: Plan, tenant: str = TENANT) -> PlanPublished:
    return PlanPublished(event_id=f"plan-{plan.plan_id}-v{plan.version}", tenant=tenant, occurred_at=T0, plan=plan)


def assigned(user: str, plan: Plan, start: datetime = T0, tenant: str = TENANT, event_id: str | None = None
             ) -> PlanAssigned:
    return PlanAssigned(event_id=event_id or f"assign-{user}-{plan.plan_id}-{start.isoformat()}", tenant=tenant,
                        user=user, plan_id=plan.plan_id, period_start=start, occurred_at=start)


def usage(user: str, n: int, *, model: str = "gpt-4o-mini", input_tokens: int = 1000, output_tokens: int = 1000,
          at: datetime | None = None, session: str = "s1", tools: dict[str, int] | None = None,
          tenant: str = TENANT, event_id: str | None = None) -> UsageRecorded:
    return UsageRecorded(
        event_id=event_id or f"{user}-{n}", tenant=tenant, user=user, model=model, input_tokens=input_tokens,
        output_tokens=output_tokens, session_id=session, tools=tools or {},
        occurred_at=at or T0 + timedelta(minutes=n),
    )


class Ledger:
    """The core fold driven like the processor drives it: one partition's state in a dict."""

    def __init__(self) -> None:
        self.accounts: dict[tuple[str, str], Account] = {}
        self.plans: dict[tuple[str, str], PlanHistory] = {}
        self.seen: dict[tuple[str, str, str], Seen] = {}  # (tenant, user, event id) -> remembered, never swept

    def apply(self, command: AnyCommand) -> Decision:
        if isinstance(command, ClockTicked):  # the processor applies a tick to every account of the partition
            gates = []
            for key, account in list(self.accounts.items()):
                decision = decide(account, command, lambda t, p: self.plans.get((t, p)))
                if decision.account is not None:
                    self.accounts[key] = decision.account
                gates += decision.gates
            return Decision(result=Result.ok, gates=tuple(gates))
        key = (command.tenant, getattr(command, "user", ""))
        decision = decide(self.accounts.get(key), command, lambda t, p: self.plans.get((t, p)),
                          lambda event_id: self.seen.get((*key, event_id)))
        if decision.account is not None:
            self.accounts[key] = decision.account
        if decision.remembered is not None:
            event_id, seen = decision.remembered
            self.seen[(*key, event_id)] = seen
        if decision.plan_history is not None:
            h = decision.plan_history
            self.plans[(h.tenant, h.plan_id)] = h
        return decision

    def apply_all(self, commands: list[AnyCommand]) -> list[Decision]:
        return [self.apply(c) for c in commands]

    def account(self, user: str, tenant: str = TENANT) -> Account:
        return self.accounts[(tenant, user)]


def ok(decision: Decision) -> Decision:
    assert decision.result is Result.ok, decision.reason
    return decision
