"""The spend chart: daily figures as bars with one tick per day, titled with the tenant's name."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import duckdb
from matplotlib.backends.backend_agg import FigureCanvasAgg

from projections.charts import spend_figure
from projections.schema import create_schema

TENANT_ID = "6f1c0c8e-0000-4000-8000-000000000001"
DAY = datetime(2026, 11, 3, tzinfo=UTC)


def _history() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    create_schema(con)
    con.execute("SET TimeZone = 'UTC'")
    for n, (days, model, cost) in enumerate([(0, "gpt-4o", "0.50"), (0, "gpt-4o-mini", "0.25"), (2, "gpt-4o", "1.00")]):
        at = DAY + timedelta(days=days, hours=3)
        con.execute(
            """INSERT INTO ledger_entries VALUES ($t, 'ana', $id, $n, 's', $at, $model, 10, 10, 0, $cost, 'p', 'pro', 1,
                   $start, $end, $at, NULL, NULL, NULL, false)""",
            {"t": TENANT_ID, "id": f"e{n}", "n": n, "at": at, "model": model, "cost": Decimal(cost),
             "start": DAY, "end": DAY + timedelta(days=30)})
    return con


def test_daily_spend_is_drawn_as_stacked_bars_with_a_tick_per_day_and_the_tenants_name():
    figure = spend_figure(_history(), TENANT_ID, start=DAY, end=DAY + timedelta(days=30), label="acme")
    FigureCanvasAgg(figure)
    (axes,) = figure.axes
    assert axes.get_title() == "Spend per model per day, tenant acme"
    assert TENANT_ID not in axes.get_title()
    assert not axes.get_lines(), "daily figures are totals: no line between them"
    heights = sorted(round(bar.get_height(), 2) for bar in axes.patches)
    assert heights == [0.0, 0.0, 0.0, 0.25, 0.5, 1.0]  # 3 days x 2 models; gpt-4o-mini stacked on the first day
    assert [t.get_text() for t in axes.get_xticklabels()] == ["2026-11-03", "2026-11-04", "2026-11-05"]


def test_without_a_name_the_title_falls_back_to_the_id():
    figure = spend_figure(_history(), TENANT_ID, start=DAY, end=DAY + timedelta(days=30))
    assert figure.axes[0].get_title().endswith(TENANT_ID)
