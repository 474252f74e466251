"""Report queries over the history file: per-user spend, a user's history, tenant reports and tier margins.

Queries return plain rows (money as ``Decimal``); formatting for people or files is ``projections.export``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path
from typing import Any, Literal

import duckdb

from ledger.events import TIMESTAMP_MAX, TIMESTAMP_MIN
from ledger.money import MONEY_CONTEXT, money
from ledger.plans import Plan
from ledger.tiers import Tier, margin


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


# -- history and tenant reports ------------------------------------------------------------------------------------
#
# Every query is scoped to one tenant and takes its values as bound parameters; the only SQL chosen at run time
# is a grouping expression picked from the fixed table below by name. Time ranges are half-open, [start, end),
# on the event time (``occurred_at``), except the period reports (margins, utilisation), which take the billing
# periods that *start* in the range, so a period is never counted in part. Money comes back as DECIMAL(38,12)
# sums; any division is done in Python with Decimal (DuckDB divides decimals as doubles).

HISTORY_ROWS_MAX = 10_000
# The range a query covers when it leaves an end open.
ALL_TIME_START, ALL_TIME_END = TIMESTAMP_MIN, TIMESTAMP_MAX  # every time a command may carry
TOP_USERS_MAX = 1_000

HistoryGrouping = Literal["day", "model", "session", "plan_version"]
# The UTC calendar day of an event, from its epoch microseconds: four times faster than a time-zone conversion
# per row (measured), and exact for every event time after 1970.
UTC_DAY_SQL = "DATE '1970-01-01' + CAST(epoch_us(occurred_at) // 86400000000 AS INTEGER)"
_HISTORY_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    # name -> (output key columns, SQL expression list); days are UTC calendar days.
    "day": (("day",), f"{UTC_DAY_SQL} AS day"),
    "model": (("model",), "model"),
    "session": (("session_id", "session_started_at"), "session_id, session_started_at"),
    "plan_version": (("plan_name", "plan_version"), "plan_name, plan_version"),
}
_SUMS = ("count(*) AS calls, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
         "sum(tool_calls) AS tool_calls, sum(cost) AS spend")
_SUM_COLUMNS = ("calls", "input_tokens", "output_tokens", "tool_calls", "spend")


@dataclass(frozen=True)
class Report:
    """A report as data: a title, column names and rows of plain values (money as Decimal)."""

    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    # Set by paginated reports: the cursor of the next page, None on the last one.
    next_cursor: str | None = None

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def span(start: datetime | None, end: datetime | None) -> dict[str, datetime]:
    """The ``start``/``end`` keywords of a report; an open end covers all time."""
    return {"start": start or ALL_TIME_START, "end": end or ALL_TIME_END}


def open_history(path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection whose timestamps come back in UTC."""
    from projections.projector import connect

    con = connect(path, read_only=True)
    con.execute("SET TimeZone = 'UTC'")
    return con


def user_history(con: duckdb.DuckDBPyConnection, tenant: str, user: str, *, start: datetime, end: datetime,
                 by: HistoryGrouping = "day", limit: int = 100, after: str | None = None) -> Report:
    """One user's spend over [start, end), grouped by day, model, session or plan version, one page at a time.

    Pages are keyset-paginated on the group keys: ``after`` is the previous page's ``next_cursor``, so a page
    costs the same wherever it is and rows written between two pages never shift one.
    """
    if by not in _HISTORY_KEYS:
        raise ValueError(f"group by one of {', '.join(_HISTORY_KEYS)}, not {by!r}")
    if not 1 <= limit <= HISTORY_ROWS_MAX:
        raise ValueError(f"limit must be 1..{HISTORY_ROWS_MAX}")
    keys, expression = _HISTORY_KEYS[by]
    key_row = f"({', '.join(keys)}{',' if len(keys) == 1 else ''})"
    bound = _cursor_values(after, by) if after is not None else None
    after_sql = f"WHERE {key_row} > ({', '.join(f'$k{i}' for i in range(len(keys)))}{',' if len(keys) == 1 else ''})" \
        if bound is not None else ""
    rows = con.execute(
        f"""SELECT * FROM (
                SELECT {expression}, {_SUMS}, min(occurred_at) AS first_at, max(occurred_at) AS last_at
                FROM ledger_entries
                WHERE tenant = $tenant AND user_id = $user AND occurred_at >= $start AND occurred_at < $end
                GROUP BY ALL) {after_sql}
            ORDER BY ALL LIMIT $limit""",
        {"tenant": tenant, "user": user, "start": start, "end": end, "limit": limit + 1,
         **{f"k{i}": value for i, value in enumerate(bound or ())}},
    ).fetchall()
    more = len(rows) > limit
    page = rows[:limit]
    return Report(f"History of {user} by {by.replace('_', ' ')}, {_span(start, end)}",
                  (*keys, *_SUM_COLUMNS, "first_at", "last_at"), page,
                  next_cursor=_cursor(by, page[-1][:len(keys)]) if more else None)


def _cursor(by: str, keys: tuple[Any, ...]) -> str:
    """An opaque page cursor: the grouping and the last row's keys, as URL-safe base64 of JSON."""
    return base64.urlsafe_b64encode(json.dumps([by, *(_plain(k) for k in keys)]).encode()).decode().rstrip("=")


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, date) else value


CURSOR_TEXT_LENGTH_MAX = 1024  # a key of a cursor: a model, session or plan name (128 characters each at most)
CURSOR_INT_MAX = 2 ** 31 - 1  # plan_version is an INTEGER column


def _cursor_text(value: Any) -> str:
    """A text key: a str that UTF-8 can hold (no lone surrogates), of bounded length."""
    if not isinstance(value, str) or len(value) > CURSOR_TEXT_LENGTH_MAX:
        raise ValueError
    value.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate, which DuckDB refuses
    return value


def _cursor_values(cursor: str, by: str) -> tuple[Any, ...]:
    """The keys a cursor holds, typed for the grouping; ValueError for anything else.

    A cursor comes back from the client, so it is hostile input: nesting (RecursionError), integers DuckDB's
    columns cannot hold and strings UTF-8 cannot encode are all "not a cursor", never a query.
    """
    try:
        found = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(found, list) or found[0] != by or len(found) != len(_HISTORY_KEYS[by][0]) + 1:
            raise ValueError
        values = found[1:]
        if by == "day":
            return (date.fromisoformat(_cursor_text(values[0])),)
        if by == "model":
            return (_cursor_text(values[0]),)
        if by == "session":
            return _cursor_text(values[0]), datetime.fromisoformat(_cursor_text(values[1]))
        version = values[1]
        if type(version) is not int or not 0 <= version <= CURSOR_INT_MAX:
            raise ValueError
        return _cursor_text(values[0]), version
    except (ValueError, TypeError, IndexError, OverflowError, RecursionError, binascii.Error, UnicodeDecodeError):
        raise ValueError(f"cursor {cursor[:40]!r} is not a cursor of a history grouped by {by}") from None


def spend_by_day_and_model(con: duckdb.DuckDBPyConnection, tenant: str, *, start: datetime, end: datetime,
                           user: str | None = None) -> Report:
    """Spend per UTC day and model, of the tenant or (``user``) of one of its users."""
    rows = con.execute(
        f"""SELECT {UTC_DAY_SQL} AS day, model, {_SUMS}
            FROM ledger_entries WHERE tenant = $tenant AND occurred_at >= $start AND occurred_at < $end
              AND ($user IS NULL OR user_id = $user)
            GROUP BY ALL ORDER BY ALL""",
        {"tenant": tenant, "start": start, "end": end, "user": user},
    ).fetchall()
    whose = f" of {user}" if user is not None else ""
    return Report(f"Spend{whose} by day and model, {_span(start, end)}", ("day", "model", *_SUM_COLUMNS), rows)


RECENT_ROWS_MAX = 200


def recent_gates(con: duckdb.DuckDBPyConnection, tenant: str, *, limit: int = 20, user: str | None = None) -> Report:
    """The newest gate events of the tenant (or of one user), newest first."""
    if not 1 <= limit <= RECENT_ROWS_MAX:
        raise ValueError(f"limit must be 1..{RECENT_ROWS_MAX}")
    rows = con.execute(
        """SELECT occurred_at, user_id, kind, dimension, model, used, "limit", scope, gate_id FROM gate_events
           WHERE tenant = $tenant AND ($user IS NULL OR user_id = $user)
           ORDER BY occurred_at DESC, gate_id DESC LIMIT $limit""",
        {"tenant": tenant, "user": user, "limit": limit},
    ).fetchall()
    return Report("Newest gate events", ("occurred_at", "user", "kind", "dimension", "model", "used", "limit", "scope",
                                         "gate_id"), rows)


def recent_entries(con: duckdb.DuckDBPyConnection, tenant: str, user: str, *, limit: int = 20) -> Report:
    """One user's newest ledger entries, newest first."""
    if not 1 <= limit <= RECENT_ROWS_MAX:
        raise ValueError(f"limit must be 1..{RECENT_ROWS_MAX}")
    rows = con.execute(
        """SELECT occurred_at, event_id, session_id, model, input_tokens, output_tokens, tool_calls, cost,
                  plan_name, plan_version
           FROM ledger_entries WHERE tenant = $tenant AND user_id = $user
           ORDER BY occurred_at DESC, seq DESC LIMIT $limit""",
        {"tenant": tenant, "user": user, "limit": limit},
    ).fetchall()
    return Report(f"Newest entries of {user}", ("occurred_at", "event_id", "session_id", "model", "input_tokens",
                                                "output_tokens", "tool_calls", "cost", "plan", "plan_version"), rows)


def top_users(con: duckdb.DuckDBPyConnection, tenant: str, *, start: datetime, end: datetime, limit: int = 10) -> Report:
    if not 1 <= limit <= TOP_USERS_MAX:
        raise ValueError(f"limit must be 1..{TOP_USERS_MAX}")
    rows = con.execute(
        f"""SELECT user_id, string_agg(DISTINCT plan_name, ',' ORDER BY plan_name) AS plans, {_SUMS}
            FROM ledger_entries WHERE tenant = $tenant AND occurred_at >= $start AND occurred_at < $end
            GROUP BY user_id ORDER BY spend DESC, user_id LIMIT $limit""",
        {"tenant": tenant, "start": start, "end": end, "limit": limit},
    ).fetchall()
    return Report(f"Top {limit} users by spend, {_span(start, end)}", ("user", "plans", *_SUM_COLUMNS), rows)


def gates_by_kind(con: duckdb.DuckDBPyConnection, tenant: str, *, start: datetime, end: datetime) -> Report:
    rows = con.execute(
        """SELECT kind, dimension, coalesce(model, '') AS model, count(*) AS events, count(DISTINCT user_id) AS users
           FROM gate_events WHERE tenant = $tenant AND occurred_at >= $start AND occurred_at < $end
           GROUP BY ALL ORDER BY ALL""",
        {"tenant": tenant, "start": start, "end": end},
    ).fetchall()
    return Report(f"Gate events by kind, {_span(start, end)}", ("kind", "dimension", "model", "events", "users"), rows)


def limits_reached(con: duckdb.DuckDBPyConnection, tenant: str, *, start: datetime, end: datetime) -> Report:
    """Per plan: users with usage in the range, and how many of them reached a soft or a hard limit.

    A gate event's plan is the plan of the entry that caused it (gate events carry the plan id only).
    """
    rows = con.execute(
        """WITH active AS (
               SELECT plan_name, count(DISTINCT user_id) AS users FROM ledger_entries
               WHERE tenant = $tenant AND occurred_at >= $start AND occurred_at < $end GROUP BY plan_name
           ), reached AS (
               SELECT e.plan_name,
                      count(DISTINCT g.user_id) FILTER (WHERE g.kind = 'soft_warning') AS soft_users,
                      count(DISTINCT g.user_id) FILTER (WHERE g.kind = 'hard_block') AS hard_users,
                      count(*) FILTER (WHERE g.kind = 'hard_block') AS hard_blocks
               FROM gate_events g JOIN ledger_entries e
                 ON e.tenant = g.tenant AND e.user_id = g.user_id AND e.event_id = g.cause_event_id
               WHERE g.tenant = $tenant AND g.occurred_at >= $start AND g.occurred_at < $end
               GROUP BY e.plan_name
           )
           SELECT a.plan_name, a.users, coalesce(r.soft_users, 0), coalesce(r.hard_users, 0), coalesce(r.hard_blocks, 0)
           FROM active a LEFT JOIN reached r USING (plan_name) ORDER BY a.plan_name""",
        {"tenant": tenant, "start": start, "end": end},
    ).fetchall()
    out = [(plan, users, soft, hard, blocks, _ratio(soft, users), _ratio(hard, users))
           for plan, users, soft, hard, blocks in rows]
    return Report(f"Users who reached their limits, {_span(start, end)}",
                  ("plan", "users", "soft_users", "hard_users", "hard_blocks", "soft_share", "hard_share"), out)


def period_spend(con: duckdb.DuckDBPyConnection, tenant: str, *, start: datetime, end: datetime
                 ) -> list[tuple[str, str, datetime, Decimal]]:
    """(plan, user, period start, spend) of every user-period that starts in [start, end).

    Spend is every entry of the period, late ones included (history counts them in their period). A user who
    changed plans within a period appears once per plan.
    """
    return con.execute(
        """SELECT plan_name, user_id, period_start, sum(cost) FROM ledger_entries
           WHERE tenant = $tenant AND period_start >= $start AND period_start < $end
           GROUP BY ALL ORDER BY ALL""",
        {"tenant": tenant, "start": start, "end": end},
    ).fetchall()


def utilisation(con: duckdb.DuckDBPyConnection, tenant: str, limits: Mapping[str, Decimal], *,
                start: datetime, end: datetime) -> Report:
    """Spend per user-period as a share of the plan's period limit (plans without a limit are left out)."""
    rows = [(plan, user, period, spend, limits[plan], spend / limits[plan])
            for plan, user, period, spend in period_spend(con, tenant, start=start, end=end)
            if limits.get(plan)]
    return Report(f"Limit utilisation per user and period, periods starting {_span(start, end)}",
                  ("plan", "user", "period_start", "spend", "limit", "utilisation"), rows)


def tier_margins(con: duckdb.DuckDBPyConnection, tenant: str, tiers: Iterable[Tier], *,
                 start: datetime, end: datetime) -> Report:
    """Per tier: the guide's planned margin next to the realised one, over the periods that start in the range.

    A tier's plan is the plan named by its ``tier_code``. Per billing period with usage, the tier earns its
    price; realised cost is the sum of the entries' ``cost``, which is already provider cost x the plan's
    markup (rounded once per event), so realised profit = price x periods - sum(cost), and provider cost is
    shown as sum(cost) / markup. Planned profit is the guide's price - budget x markup per period. Periods in
    which a subscriber made no call are not in the ledger and are not counted (they would only add profit);
    trials are not known to the ledger either, so every period counts at full price.
    """
    spent: dict[str, tuple[int, Decimal]] = {}
    for plan, _user, _period, spend in period_spend(con, tenant, start=start, end=end):
        periods, total = spent.get(plan, (0, Decimal(0)))
        spent[plan] = (periods + 1, total + spend)
    rows = []
    for tier in sorted(tiers, key=lambda t: t.tier_code):
        periods, cost = spent.get(tier.tier_code, (0, Decimal(0)))
        with localcontext(MONEY_CONTEXT):
            revenue = tier.price_usd * periods
            profit = revenue - cost
            provider = money(cost / tier.markup)
        planned = None if tier.budget_usd is None else margin(tier)
        rows.append((
            tier.tier_code, tier.billing_mode, tier.price_usd, tier.budget_usd, periods,
            planned.profit_usd if planned else None, _pct(planned.margin) if planned else None,
            revenue, provider, cost, profit, _pct(profit / revenue) if revenue else None,
        ))
    return Report(f"Planned and realised margin per tier, periods starting {_span(start, end)}",
                  ("tier", "billing", "price", "budget", "periods", "planned_profit_per_period", "planned_margin_pct",
                   "revenue", "provider_cost", "cost_with_markup", "realised_profit", "realised_margin_pct"), rows)


def plan_limits(plans: Iterable[Plan]) -> dict[str, Decimal]:
    """Period spend limit by plan name (the newest version given wins; plans without one are left out)."""
    return {p.name: p.max_spend_per_period for p in sorted(plans, key=lambda p: p.version) if p.max_spend_per_period}


def tier_limits(tiers: Iterable[Tier]) -> dict[str, Decimal]:
    """A tier's budget is its plan's period limit (calls are charged at provider cost x markup against it)."""
    return {t.tier_code: budget for t in tiers if (budget := t.budget_usd) is not None}


def _ratio(part: int, whole: int) -> Decimal | None:
    return (Decimal(part) / Decimal(whole)).quantize(Decimal("0.0001")) if whole else None


def _pct(fraction: Decimal | None) -> Decimal | None:
    return None if fraction is None else (fraction * 100).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def _span(start: datetime, end: datetime) -> str:
    return f"[{start.isoformat()}, {end.isoformat()})"
