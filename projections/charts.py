"""Charts of the history as PNG files: spend over time per model, and limit utilisation per plan or tier.

Matplotlib's Agg canvas draws off screen (no display, no pyplot global state). Amounts become floats only
here, for plotting; every figure behind a chart comes from the exact report queries.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import duckdb
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from projections.reports import spend_by_day_and_model, utilisation

FIGURE_SIZE_IN = (10.0, 5.0)
DPI = 100
UTILISATION_BINS = [i / 10 for i in range(0, 16)]  # 0%..150% in 10% steps; more is clipped into the last bin


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=DPI)
    return path


def spend_over_time(con: duckdb.DuckDBPyConnection, tenant: str, path: Path, *, start: datetime, end: datetime) -> Path:
    """Daily spend per model, one line each."""
    report = spend_by_day_and_model(con, tenant, start=start, end=end)
    series: dict[str, tuple[list[object], list[float]]] = {}
    for row in report.dicts():
        days, amounts = series.setdefault(row["model"], ([], []))
        days.append(row["day"])
        amounts.append(float(row["spend"]))
    figure = Figure(figsize=FIGURE_SIZE_IN)
    axes = figure.add_subplot()
    for model, (days, amounts) in sorted(series.items()):
        axes.plot(days, amounts, marker="o", label=model)
    axes.set_title(f"Spend per model per day (tenant {tenant})")
    axes.set_ylabel("spend, USD")
    axes.grid(True, alpha=0.3)
    if series:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no usage in this range", ha="center", va="center", transform=axes.transAxes)
    figure.autofmt_xdate()
    return _save(figure, path)


def utilisation_histogram(con: duckdb.DuckDBPyConnection, tenant: str, limits: Mapping[str, Decimal], path: Path, *,
                          start: datetime, end: datetime) -> Path:
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
    axes.set_title(f"Period limit utilisation (tenant {tenant})")
    axes.set_xlabel("spend / period limit")
    axes.set_ylabel("user-periods")
    axes.xaxis.set_major_formatter(lambda value, _pos: f"{value:.0%}")
    return _save(figure, path)
