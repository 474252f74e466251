"""The DuckDB history schema. Money is DECIMAL(38,12): the same quantum as the core."""

from __future__ import annotations

import duckdb

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_entries (
    tenant VARCHAR NOT NULL,
    user_id VARCHAR NOT NULL,
    event_id VARCHAR NOT NULL,
    seq BIGINT NOT NULL,
    session_id VARCHAR NOT NULL,
    session_started_at TIMESTAMPTZ NOT NULL,
    model VARCHAR NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    tool_calls BIGINT NOT NULL,
    cost DECIMAL(38, 12) NOT NULL,
    plan_id VARCHAR NOT NULL,
    plan_name VARCHAR NOT NULL,
    plan_version INTEGER NOT NULL,
    period_start TIMESTAMPTZ NOT NULL,
    period_end TIMESTAMPTZ NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    period_spend DECIMAL(38, 12),
    session_spend DECIMAL(38, 12),
    period_model_tokens BIGINT,
    late BOOLEAN NOT NULL,
    PRIMARY KEY (tenant, user_id, event_id)
);
CREATE TABLE IF NOT EXISTS gate_events (
    gate_id VARCHAR PRIMARY KEY,
    tenant VARCHAR NOT NULL,
    user_id VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    dimension VARCHAR NOT NULL,
    model VARCHAR,
    threshold DECIMAL(38, 12) NOT NULL,
    used DECIMAL(38, 12) NOT NULL,
    "limit" DECIMAL(38, 12) NOT NULL,
    scope VARCHAR NOT NULL,
    plan_id VARCHAR NOT NULL,
    plan_version INTEGER NOT NULL,
    cause_event_id VARCHAR NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected_events (
    rejection_id VARCHAR PRIMARY KEY,
    code VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    "key" VARCHAR,
    payload VARCHAR NOT NULL,
    payload_encoding VARCHAR NOT NULL,
    source_topic VARCHAR NOT NULL,
    source_partition INTEGER NOT NULL,
    source_offset BIGINT NOT NULL,
    tenant VARCHAR,
    user_id VARCHAR,
    event_id VARCHAR
);
-- The next offset to read per source partition, written in the same
-- transaction as the rows, so a restart resumes exactly.
CREATE TABLE IF NOT EXISTS projector_offsets (
    topic VARCHAR NOT NULL,
    "partition" INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (topic, "partition")
);
"""

ENTRY_COLUMNS = (
    "tenant", "user_id", "event_id", "seq", "session_id", "session_started_at", "model",
    "input_tokens", "output_tokens", "tool_calls", "cost", "plan_id", "plan_name", "plan_version",
    "period_start", "period_end", "occurred_at", "period_spend", "session_spend",
    "period_model_tokens", "late",
)
GATE_COLUMNS = (
    "gate_id", "tenant", "user_id", "kind", "dimension", "model", "threshold", "used", "limit",
    "scope", "plan_id", "plan_version", "cause_event_id", "occurred_at",
)
REJECTION_COLUMNS = (
    "rejection_id", "code", "reason", "key", "payload", "payload_encoding", "source_topic",
    "source_partition", "source_offset", "tenant", "user_id", "event_id",
)
MONEY_COLUMNS = frozenset({"cost", "period_spend", "session_spend", "threshold", "used", "limit"})


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA)
