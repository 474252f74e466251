"""Charts of the history as PNG files: daily spend per model, and limit utilisation per plan or tier.

Matplotlib's Agg canvas draws off screen (no display, no pyplot global state). Amounts become floats only
here, for plotting; every figure behind a chart comes from the exact report queries.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from projections.reports import spend_by_day_and_model, utilisation

FIGURE_SIZE_IN = (10.0, 5.0)
DPI = 100
DAY_TICKS_MAX = 31
UTILISATION_BINS = [i / 10 for i in range(0, 16)]  # 0%..150% in 10% steps; more is clipped into the last bin


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=DPI)
    return path


def spend_over_time(con: duckdb.DuckDBPyConnection, tenant: str, path: Path, *, start: datetime, end: datetime,
                    label: str | None = None) -> Path:
    """Daily spend per model as stacked bars, one tick per day (a day's figure is a total, not a point on a line).

    ``label`` names the tenant in the title (its name); the id is used when none is given.
    """
    return _save(spend_figure(con, tenant, start=start, end=end, label=label), path)


def spend_figure(con: duckdb.DuckDBPyConnection, tenant: str, *, start: datetime, end: datetime,
                 label: str | None = None) -> Figure:
    report = spend_by_day_and_model(con, tenant, start=start, end=end)
    rows = report.dicts()
    seen = sorted({row["day"] for row in rows})
    # Every day from the first to the last, so a day without usage shows as a gap, not as nothing.
    days = [seen[0] + timedelta(days=i) for i in range((seen[-1] - seen[0]).days + 1)] if seen else []
    models = sorted({row["model"] for row in rows})
    spend = {(row["day"], row["model"]): float(row["spend"]) for row in rows}
    figure = Figure(figsize=FIGURE_SIZE_IN)
    axes = figure.add_subplot()
    positions = list(range(len(days)))
    bottom = [0.0] * len(days)
    for model in models:
        heights = [spend.get((day, model), 0.0) for day in days]
        axes.bar(positions, heights, bottom=bottom, width=0.7, label=model)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.set_title(f"Spend per model per day, tenant {label or tenant}")
    axes.set_ylabel("spend, USD")
    axes.set_xlabel("day (UTC)")
    axes.grid(True, axis="y", alpha=0.3)
    if days:
        # One tick per day, thinned to at most DAY_TICKS_MAX labels so they stay readable.
        every = max(1, -(-len(days) // DAY_TICKS_MAX))
        ticks = positions[::every]
        axes.set_xticks(ticks, [days[i].isoformat() for i in ticks], rotation=30, ha="right")
        axes.set_xlim(-0.6, len(days) - 0.4)
        axes.legend(title="model")
    else:
        axes.set_xticks([])
        axes.text(0.5, 0.5, "no usage in this range", ha="center", va="center", transform=axes.transAxes)
    return figure


def utilisation_histogram(con: duckdb.DuckDBPyConnection, tenant: str, limits: Mapping[str, Decimal], path: Path, *,
                          start: datetime, end: datetime, label: str | None = None) -> Path:
    """How much of their period limit users used: one histogram per plan (or tier), periods starting in range."""
    report = utilisation(con, tenant, limits, start=start, end=end)
    by_plan: dict[str, list[float]] = {}
    for row in report.dicts():
        by_plan.setdefault(row["plan"], []).append(min(float(row["utilisation"]), UTILISATION_BINS[-1]))
    figure = Figure(figsize=FIGURE_SIZE_IN)
    axes = figure.add_subplot()
    if by_plan:
        names = sorted(by_plan)
        axes.hist([by_plan[n] for n in names], bins=UTILISATION_BINS, label=names, stacked=False)
        axes.legend(title="plan")
    else:
        axes.text(0.5, 0.5, "no periods with a limit in this range", ha="center", va="center", transform=axes.transAxes)
    axes.axvline(1.0, color="black", linestyle="--", linewidth=1)
    axes.set_title(f"Period limit utilisation, tenant {label or tenant}")
    axes.set_xlabel("spend / period limit")
    axes.set_ylabel("user-periods")
    axes.xaxis.set_major_formatter(lambda value, _pos: f"{value:.0%}")
    return _save(figure, path)
