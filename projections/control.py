"""Copies the control plane's plan versions, users and tiers into the history file.

They are not events on the log, so they are copied whole: every sync replaces the three tables in one
transaction. Reports can then join usage with the plan versions, users and tiers it ran under.
"""

from __future__ import annotations

from typing import Any

import duckdb
import msgspec
import pyarrow as pa

from ledger.control.store import ControlStore, Snapshot
from projections.schema import CONTROL, PLAN_VERSIONS, TIERS, USERS

_encoder = msgspec.json.Encoder()  # decimals as strings: DuckDB casts them exactly


def rows(snapshot: Snapshot) -> dict[str, list[dict[str, Any]]]:
    """The copies' rows by table name."""
    return {
        PLAN_VERSIONS.name: [{
            "tenant": tenant, "plan_id": plan.plan_id, "name": plan.name, "version": plan.version,
            "created_at": created_at, "billing_mode": plan.billing_mode, "period_interval": plan.period_interval,
            "trial_days": plan.trial_days, "max_spend_per_period": plan.max_spend_per_period,
            "max_spend_per_session": plan.max_spend_per_session, "soft_gate_at": plan.soft_gate_at,
            "hard_gate_at": plan.hard_gate_at, "markup": plan.markup, "body": plan,
        } for tenant, plan, created_at in snapshot.plan_versions],
        USERS.name: [{
            "tenant": tenant, "id": user.id, "user_id": user.external_id, "plan_id": user.plan_id,
            "period_start": user.period_start, "created_at": user.created_at,
        } for tenant, user in snapshot.users],
        TIERS.name: [{
            "tenant": tenant, "id": tier_id, "tier_code": tier.tier_code, "plan_id": plan_id,
            "billing_mode": tier.billing_mode, "price": tier.price_usd, "price_interval": tier.price_interval,
            "budget": tier.budget_usd, "markup": tier.markup, "body": tier,
        } for tenant, tier_id, plan_id, tier in snapshot.tiers],
    }


def sync_control(con: duckdb.DuckDBPyConnection, store: ControlStore) -> dict[str, int]:
    """Replace the copies with the control plane's current content; returns the rows per table."""
    with store.session() as session:
        snapshot = session.snapshot()
    copied = rows(snapshot)
    con.execute("BEGIN")
    try:
        for table in CONTROL:
            con.execute(f"DELETE FROM {table.name}")
            if copied[table.name]:
                con.register("control_rows", pa.table({"v": pa.array([_encoder.encode(r) for r in copied[table.name]],
                                                                      pa.string())}))
                con.execute(f"INSERT INTO {table.name} {table.from_json_sql('control_rows')}")
                con.unregister("control_rows")
    except BaseException:
        con.execute("ROLLBACK")  # the connection may be a rebuild's, held for its next batches
        raise
    con.execute("COMMIT")
    return {table.name: len(copied[table.name]) for table in CONTROL}
