"""Report queries over the history file."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import duckdb


@dataclass(frozen=True)
class UserSpend:
    tenant: str
    user: str
    plan: str
    calls: int
    input_tokens: int
    output_tokens: int
    spend: Decimal
    soft_warnings: str
    hard_blocks: str


USER_SPEND_SQL = """
WITH spend AS (
    SELECT tenant, user_id, string_agg(DISTINCT plan_name, ',' ORDER BY plan_name) AS plan,
           count(*) AS calls, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
           sum(cost) AS spend
    FROM ledger_entries WHERE tenant = $tenant GROUP BY tenant, user_id
), gates AS (
    SELECT tenant, user_id,
           string_agg(CASE WHEN kind = 'soft_warning' THEN coalesce(dimension || ':' || model, dimension) END,
                      ' ' ORDER BY occurred_at, gate_id) AS soft_warnings,
           string_agg(CASE WHEN kind = 'hard_block' THEN coalesce(dimension || ':' || model, dimension) END,
                      ' ' ORDER BY occurred_at, gate_id) AS hard_blocks
    FROM gate_events WHERE tenant = $tenant GROUP BY tenant, user_id
)
SELECT s.tenant, s.user_id, s.plan, s.calls, s.input_tokens, s.output_tokens, s.spend,
       coalesce(g.soft_warnings, ''), coalesce(g.hard_blocks, '')
FROM spend s LEFT JOIN gates g USING (tenant, user_id)
ORDER BY s.user_id
"""


def user_spend(con: duckdb.DuckDBPyConnection, tenant: str) -> list[UserSpend]:
    return [UserSpend(*row) for row in con.execute(USER_SPEND_SQL, {"tenant": tenant}).fetchall()]


def rejections_by_code(con: duckdb.DuckDBPyConnection, tenant: str | None = None) -> list[tuple[str, int, str]]:
    """Dead-lettered events by code, with one example reason each."""
    return con.execute(
        """SELECT code, count(*), min(reason) FROM rejected_events
           WHERE $tenant IS NULL OR tenant = $tenant OR tenant IS NULL
           GROUP BY code ORDER BY code""",
        {"tenant": tenant},
    ).fetchall()


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)
