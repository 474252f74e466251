"""Reports out: a readable table, or CSV, JSON and Parquet for other tools.

Money stays exact in every file format: CSV and JSON carry decimal strings, Parquet carries decimals.
Only the table for people rounds (to 6 places; percentages to 2).
"""

from __future__ import annotations

import csv
import io
import json
from datetime import date, datetime
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from ledger.money import MONEY_CONTEXT
from projections.reports import Report, render_table

Format = Literal["table", "csv", "json", "parquet"]
FORMATS: tuple[Format, ...] = ("table", "csv", "json", "parquet")
DISPLAY_PLACES = 6


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def _display(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        if column.endswith(("_pct", "_share")) or column == "utilisation":
            shown = value * 100 if not column.endswith("_pct") else value
            return f"{shown:,.2f}%"
        return f"{value:,.{DISPLAY_PLACES}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return _text(value)


def to_table(report: Report) -> str:
    rows = [[_display(c, v) for c, v in zip(report.columns, row, strict=True)] for row in report.rows]
    out = [report.title, "", render_table(list(report.columns), rows)]
    if report.next_cursor is not None:
        out += ["", f"more rows: --after {report.next_cursor}"]
    return "\n".join(out)


def to_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(report.columns)
    writer.writerows([_text(v) for v in row] for row in report.rows)
    return buffer.getvalue()


def to_json(report: Report) -> str:
    rows = [{c: (None if v is None else v if isinstance(v, bool | int) and not isinstance(v, Decimal) else _text(v))
             for c, v in zip(report.columns, row, strict=True)} for row in report.rows]
    body: dict[str, Any] = {"title": report.title, "columns": list(report.columns), "rows": rows}
    if report.next_cursor is not None:
        body["next_cursor"] = report.next_cursor
    return json.dumps(body, indent=2)


def to_arrow(report: Report) -> pa.Table:
    """Decimal columns become decimal128 wide enough for every value (38 digits at most)."""
    columns = {}
    for index, name in enumerate(report.columns):
        values = [row[index] for row in report.rows]
        decimals = [v for v in values if isinstance(v, Decimal)]
        if decimals:
            scale = max(-v.as_tuple().exponent for v in decimals)  # type: ignore[operator]
            scale = max(0, min(scale, 18))
            with localcontext(MONEY_CONTEXT):
                exact = [None if v is None else v.quantize(Decimal(1).scaleb(-scale)) for v in values]
            columns[name] = pa.array(exact, type=pa.decimal128(38, scale))
        else:
            columns[name] = pa.array(values)
    return pa.table(columns)


def write(report: Report, fmt: Format, output: Path | None = None) -> str | None:
    """Render ``report``; returns the text when there is no ``output`` file (Parquet needs one)."""
    if fmt == "parquet":
        if output is None:
            raise ValueError("parquet needs an output file (--output FILE)")
        pq.write_table(to_arrow(report), output)
        return None
    text = {"table": to_table, "csv": to_csv, "json": to_json}[fmt](report)
    if output is None:
        return text
    output.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return None
