"""What-if: re-price the recorded usage of a range of billing periods under a proposed plans config.

The simulation runs the processor's own fold (``ledger.account.decide``) over commands rebuilt from the
projected ledger entries: the proposed plans are published under the recorded plan ids (matched by plan
name), each user is assigned their recorded plan at the start of their first simulated period, and every
entry becomes a ``UsageRecorded`` again, in the order the processor applied it (the user's ``seq``). Given
the current plans as the proposal, it reproduces the recorded entries and gate events exactly.

Where the history cannot say what a call was:

- an entry keeps its number of tool calls, not which tools: tool calls are replayed as an unpriced tool,
  so a plan's ``tool_costs`` are not re-priced (the result counts the entries concerned);
- periods are taken whole (those that *start* in the range), so a period's totals never begin in the middle;
- users whose recorded plan has no counterpart in the proposal are not simulated (and are counted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

import duckdb

from ledger.account import Account, PlanHistory, Result, decide
from ledger.events import PlanAssigned, PlanPublished, UsageRecorded
from ledger.money import add
from ledger.plans import Plan, PlansConfig, build_plan, plan_id_for
from ledger.tiers import Tier

UNKNOWN_TOOL = "(recorded tool calls)"
PROGRESS_EVERY_USERS = 200

Progress = Callable[[int, int], None]  # (users done, users in total)


@dataclass
class Outcome:
    """What one plan's users did (or would have done) over the simulated periods."""

    plan: str
    users: set[str] = field(default_factory=set)
    user_periods: set[tuple[str, datetime]] = field(default_factory=set)
    entries: int = 0
    spend: Decimal = Decimal(0)
    soft_users: set[str] = field(default_factory=set)
    hard_users: set[str] = field(default_factory=set)
    hard_blocks: int = 0
    refused: int = 0  # entries the plan would not accept (e.g. a model it does not allow)
    gate_ids: set[str] = field(default_factory=set)

    def count_gate(self, kind: str, user: str, gate_id: str) -> None:
        self.gate_ids.add(gate_id)
        if kind == "soft_warning":
            self.soft_users.add(user)
        elif kind == "hard_block":
            self.hard_users.add(user)
            self.hard_blocks += 1


@dataclass
class WhatIf:
    start: datetime
    end: datetime
    actual: dict[str, Outcome]
    proposed: dict[str, Outcome]
    entries: int
    entries_with_tools: int
    users_not_simulated: set[str]
    tiers: dict[str, Tier] = field(default_factory=dict)

    def rows(self) -> list[tuple[object, ...]]:
        """One row per plan and side, with revenue and margin where the plan is a tier."""
        out: list[tuple[object, ...]] = []
        for name in sorted(set(self.actual) | set(self.proposed)):
            for side, outcomes in (("actual", self.actual), ("proposed", self.proposed)):
                o = outcomes.get(name, Outcome(name))
                tier = self.tiers.get(name)
                revenue = tier.price_usd * len(o.user_periods) if tier else None
                profit = revenue - o.spend if revenue is not None else None
                out.append((name, side, len(o.users), len(o.user_periods), o.entries, len(o.soft_users),
                            len(o.hard_users), o.hard_blocks, o.refused, o.spend, revenue, profit))
        return out

    COLUMNS = ("plan", "side", "users", "user_periods", "entries", "soft_users", "hard_users", "hard_blocks",
               "refused", "spend", "revenue", "profit")


@dataclass(frozen=True)
class _Entry:
    user: str
    event_id: str
    session_id: str
    model: str
    input_tokens: int
    output_tokens: int
    tool_calls: int
    plan_id: str
    plan_name: str
    period_start: datetime
    occurred_at: datetime
    cost: Decimal


def proposed_plans(config: PlansConfig, tenant: str, recorded_ids: Mapping[str, str]) -> dict[str, Plan]:
    """Version 1 of each proposed plan, under the recorded plan id of the same name (else a deterministic one)."""
    return {spec.name: build_plan(spec, config, plan_id=recorded_ids.get(spec.name) or plan_id_for(tenant, spec.name),
                                  version=1)
            for spec in config.plans}


def simulate(con: duckdb.DuckDBPyConnection, tenant: str, config: PlansConfig, *, start: datetime, end: datetime,
             tiers: Iterable[Tier] = (), progress: Progress | None = None) -> WhatIf:
    """Re-price the periods that start in [start, end) under ``config``, next to what was recorded."""
    entries = _load_entries(con, tenant, start, end)
    actual = _actual(con, tenant, entries, start, end)
    recorded_ids: dict[str, str] = {}
    for e in entries:
        recorded_ids.setdefault(e.plan_name, e.plan_id)
    plans = proposed_plans(config, tenant, recorded_ids)
    by_id = {p.plan_id: p for p in plans.values()}
    histories: dict[str, PlanHistory] = {}
    for plan in plans.values():
        decision = decide(None, PlanPublished(event_id=f"whatif-plan-{plan.plan_id}", tenant=tenant,
                                              occurred_at=start, plan=plan), lambda _t, p: histories.get(p))
        assert decision.plan_history is not None, decision.reason
        histories[plan.plan_id] = decision.plan_history

    def lookup(_tenant: str, plan_id: str) -> PlanHistory | None:
        return histories.get(plan_id)

    proposed: dict[str, Outcome] = {}
    skipped: set[str] = set()
    by_user: dict[str, list[_Entry]] = {}
    for e in entries:
        by_user.setdefault(e.user, []).append(e)
    for done, (user, mine) in enumerate(by_user.items(), start=1):
        if progress is not None and (done % PROGRESS_EVERY_USERS == 0 or done == len(by_user)):
            progress(done, len(by_user))
        if any(e.plan_name not in plans for e in mine):
            skipped.add(user)
            continue
        account: Account | None = None
        anchor = min(e.period_start for e in mine)
        plan_name: str | None = None
        for e in mine:
            if e.plan_name != plan_name:
                plan_name = e.plan_name
                decision = decide(account, PlanAssigned(
                    event_id=f"whatif-assign-{user}-{e.event_id}", tenant=tenant, user=user,
                    plan_id=plans[plan_name].plan_id, period_start=anchor, occurred_at=e.occurred_at), lookup)
                assert decision.result is Result.ok, decision.reason
                account = decision.account
            command = UsageRecorded(event_id=e.event_id, tenant=tenant, user=user, model=e.model,
                                    input_tokens=e.input_tokens, output_tokens=e.output_tokens,
                                    session_id=e.session_id, occurred_at=e.occurred_at,
                                    tools={UNKNOWN_TOOL: e.tool_calls} if e.tool_calls else {})
            decision = decide(account, command, lookup)
            outcome = proposed.setdefault(plan_name, Outcome(plan_name))
            if decision.result is not Result.ok or decision.entry is None:
                outcome.refused += 1
                continue
            account = decision.account
            entry = decision.entry
            outcome.users.add(user)
            outcome.user_periods.add((user, entry.period_start))
            outcome.entries += 1
            outcome.spend = add(outcome.spend, entry.cost)
            for gate in decision.gates:
                gate_plan = by_id[gate.plan_id].name
                proposed.setdefault(gate_plan, Outcome(gate_plan)).count_gate(gate.kind, user, gate.gate_id)
    return WhatIf(start=start, end=end, actual=actual, proposed=proposed, entries=len(entries),
                  entries_with_tools=sum(1 for e in entries if e.tool_calls), users_not_simulated=skipped,
                  tiers={t.tier_code: t for t in tiers})


def _load_entries(con: duckdb.DuckDBPyConnection, tenant: str, start: datetime, end: datetime) -> list[_Entry]:
    rows = con.execute(
        """SELECT user_id, event_id, session_id, model, input_tokens, output_tokens, tool_calls, plan_id, plan_name,
                  period_start, occurred_at, cost
           FROM ledger_entries WHERE tenant = $tenant AND period_start >= $start AND period_start < $end
           ORDER BY user_id, seq""",
        {"tenant": tenant, "start": start, "end": end},
    ).fetchall()
    return [_Entry(*row) for row in rows]


def _actual(con: duckdb.DuckDBPyConnection, tenant: str, entries: list[_Entry], start: datetime, end: datetime
            ) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    for e in entries:
        o = outcomes.setdefault(e.plan_name, Outcome(e.plan_name))
        o.users.add(e.user)
        o.user_periods.add((e.user, e.period_start))
        o.entries += 1
        o.spend = add(o.spend, e.cost)
    # The gate events those entries caused; a gate's plan is its cause's.
    gates = con.execute(
        """SELECT e.plan_name, g.user_id, g.kind, g.gate_id
           FROM gate_events g JOIN ledger_entries e
             ON e.tenant = g.tenant AND e.user_id = g.user_id AND e.event_id = g.cause_event_id
           WHERE g.tenant = $tenant AND e.period_start >= $start AND e.period_start < $end""",
        {"tenant": tenant, "start": start, "end": end},
    ).fetchall()
    for plan, user, kind, gate_id in gates:
        outcomes.setdefault(plan, Outcome(plan)).count_gate(kind, user, gate_id)
    return outcomes

