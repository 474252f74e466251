"""The DuckDB history schema. Money is DECIMAL(38,12): the same quantum as the core.

Each projected table is described once (:class:`Table`): its DDL, its unique key and how a topic's JSON
record maps onto its columns all come from that description. The key is a unique index rather than a
primary key, so a rebuild can load a table without it and build the index once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb

MONEY = "DECIMAL(38, 12)"
TIME = "TIMESTAMPTZ"


@dataclass(frozen=True)
class Table:
    name: str
    # (column, SQL type, NOT NULL)
    columns: tuple[tuple[str, str, bool], ...]
    key: tuple[str, ...]
    # column -> the JSON field it is read from, where the names differ
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.columns)

    def create_sql(self) -> str:
        body = ",\n    ".join(f'"{name}" {kind}{" NOT NULL" if required else ""}' for name, kind, required in self.columns)
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n    {body}\n);"

    def index_sql(self) -> str:
        return f"CREATE UNIQUE INDEX IF NOT EXISTS {self.name}_key ON {self.name} ({', '.join(self.key)});"

    def from_json_sql(self, relation: str, column: str = "v") -> str:
        """SELECT the table's columns from ``relation``'s JSON text column: DuckDB parses and casts, exactly."""
        struct = ", ".join(f'"{self.fields.get(name, name)}": "{kind}"' for name, kind, _ in self.columns)
        picks = ", ".join(f'j."{self.fields.get(name, name)}"' for name in self.column_names)
        return f"SELECT {picks} FROM (SELECT from_json({column}, '{{{struct}}}') AS j FROM {relation})"


ENTRIES = Table("ledger_entries", (
    ("tenant", "VARCHAR", True), ("user_id", "VARCHAR", True), ("event_id", "VARCHAR", True), ("seq", "BIGINT", True),
    ("session_id", "VARCHAR", True), ("session_started_at", TIME, True), ("model", "VARCHAR", True),
    ("input_tokens", "BIGINT", True), ("output_tokens", "BIGINT", True), ("tool_calls", "BIGINT", True),
    ("cost", MONEY, True), ("plan_id", "VARCHAR", True), ("plan_name", "VARCHAR", True),
    ("plan_version", "INTEGER", True), ("period_start", TIME, True), ("period_end", TIME, True),
    ("occurred_at", TIME, True), ("period_spend", MONEY, False), ("session_spend", MONEY, False),
    ("period_model_tokens", "BIGINT", False), ("late", "BOOLEAN", True),
), key=("tenant", "user_id", "event_id"), fields={"user_id": "user"})

GATES = Table("gate_events", (
    ("gate_id", "VARCHAR", True), ("tenant", "VARCHAR", True), ("user_id", "VARCHAR", True), ("kind", "VARCHAR", True),
    ("dimension", "VARCHAR", True), ("model", "VARCHAR", False), ("threshold", MONEY, True), ("used", MONEY, True),
    ("limit", MONEY, True), ("scope", "VARCHAR", True), ("plan_id", "VARCHAR", True), ("plan_version", "INTEGER", True),
    ("cause_event_id", "VARCHAR", True), ("occurred_at", TIME, True),
    # True when a late event crossed the threshold in a closed period (added after the first release).
    ("correction", "BOOLEAN", False),
), key=("gate_id",), fields={"user_id": "user"})

REJECTIONS = Table("rejected_events", (
    ("rejection_id", "VARCHAR", True), ("code", "VARCHAR", True), ("reason", "VARCHAR", True), ("key", "VARCHAR", False),
    ("payload", "VARCHAR", True), ("payload_encoding", "VARCHAR", True), ("source_topic", "VARCHAR", True),
    ("source_partition", "INTEGER", True), ("source_offset", "BIGINT", True), ("tenant", "VARCHAR", False),
    ("user_id", "VARCHAR", False), ("event_id", "VARCHAR", False),
), key=("rejection_id",), fields={"user_id": "user"})

PROJECTED = (ENTRIES, GATES, REJECTIONS)

# Copies of the control plane, replaced whole on every sync (see projections/control.py), so reports can
# join usage with the plan versions, users and tiers it ran under.
PLAN_VERSIONS = Table("plan_versions", (
    ("tenant", "VARCHAR", True), ("plan_id", "VARCHAR", True), ("name", "VARCHAR", True), ("version", "INTEGER", True),
    ("created_at", TIME, True), ("billing_mode", "VARCHAR", True), ("period_interval", "VARCHAR", True),
    ("trial_days", "INTEGER", True), ("max_spend_per_period", MONEY, False), ("max_spend_per_session", MONEY, False),
    ("soft_gate_at", MONEY, True), ("hard_gate_at", MONEY, True), ("markup", MONEY, True), ("body", "JSON", True),
), key=("tenant", "plan_id", "version"))

USERS = Table("users", (
    ("tenant", "VARCHAR", True), ("id", "VARCHAR", True), ("user_id", "VARCHAR", True), ("plan_id", "VARCHAR", False),
    ("period_start", TIME, False), ("created_at", TIME, True),
), key=("tenant", "id"))

TIERS = Table("tiers", (
    ("tenant", "VARCHAR", True), ("id", "VARCHAR", True), ("tier_code", "VARCHAR", True), ("plan_id", "VARCHAR", True),
    ("billing_mode", "VARCHAR", True), ("price", MONEY, True), ("price_interval", "VARCHAR", False),
    ("budget", MONEY, False), ("markup", MONEY, True), ("body", "JSON", True),
), key=("tenant", "id"))

CONTROL = (PLAN_VERSIONS, USERS, TIERS)

OFFSETS_SQL = """
-- The next offset to read per source partition, written in the same
-- transaction as the rows, so a restart resumes exactly.
CREATE TABLE IF NOT EXISTS projector_offsets (
    topic VARCHAR NOT NULL,
    "partition" INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (topic, "partition")
);
"""


def create_schema(con: duckdb.DuckDBPyConnection, *, indexes: bool = True) -> None:
    """Create what is missing; ``indexes=False`` leaves the unique keys to :func:`create_indexes` (bulk loads)."""
    con.execute("\n".join(table.create_sql() for table in (*PROJECTED, *CONTROL)) + OFFSETS_SQL)
    # Columns added since a file was first created (CREATE TABLE IF NOT EXISTS leaves such a file as it was).
    con.execute("ALTER TABLE gate_events ADD COLUMN IF NOT EXISTS correction BOOLEAN")
    if indexes:
        create_indexes(con)


def create_indexes(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("\n".join(table.index_sql() for table in (*PROJECTED, *CONTROL)))
