"""Configuration changes shared by the API and the command line.

Each records the change in the control plane and puts what the processor must
know in the outbox, in one unit of work; ``ledger.control.outbox`` publishes it
to the usage log after the commit (no transaction waits on Kafka).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from ledger.catalog import PriceCatalog
from ledger.control.store import ControlSession
from ledger.events import AnyCommand, PlanPublished
from ledger.plans import Plan
from ledger.tiers import Tier, tier_to_plan


class CommandLog(Protocol):
    """Where commands that change a user's decisions go: the usage log."""

    async def publish(self, commands: Sequence[AnyCommand]) -> int: ...


def plan_published(tenant_id: str, plan: Plan) -> PlanPublished:
    return PlanPublished(event_id=f"plan-{plan.plan_id}-v{plan.version}", tenant=tenant_id,
                         occurred_at=datetime.now(UTC), plan=plan)


@dataclass(frozen=True)
class TierRecord:
    id: str
    plan_id: str
    tier: Tier


def create_tiers(session: ControlSession, tenant_id: str, tiers: Sequence[Tier],
                 catalog: PriceCatalog) -> tuple[list[TierRecord], list[TierRecord], list[int]]:
    """Create tiers (each with its plan, version 1). Returns (created, duplicates by tier code, outbox seqs).

    Raises TierError for a model the catalog cannot price, ValueError for a plan name already taken,
    PlanError for a plan past a bound, LimitExceeded for a full quota.
    """
    from ledger.control.outbox import enqueue

    session.lock_tenant(tenant_id)
    existing = {t.tier_code: TierRecord(tid, pid, t) for tid, pid, t in session.tiers(tenant_id)}
    taken = session.plan_names(tenant_id)
    created: list[TierRecord] = []
    duplicates: list[TierRecord] = []
    plans: list[Plan] = []
    for tier in tiers:
        if tier.tier_code in existing:
            duplicates.append(existing[tier.tier_code])
            continue
        if tier.tier_code in taken:
            raise ValueError(f"tier_code: a plan named {tier.tier_code!r} exists already")
        plan = tier_to_plan(tier, plan_id=str(uuid.uuid4()), version=1, catalog=catalog)
        session.add_plan_version(tenant_id, plan)
        record = TierRecord(session.add_tier(tenant_id, tier, plan.plan_id), plan.plan_id, tier)
        existing[tier.tier_code] = record
        taken.add(tier.tier_code)
        created.append(record)
        plans.append(plan)
    return created, duplicates, enqueue(session, tenant_id, [plan_published(tenant_id, p) for p in plans])
