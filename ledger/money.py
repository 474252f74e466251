"""Money: exact decimal dollars, rounded once per priced event.

Every amount is a ``Decimal`` quantised to ``MONEY_PLACES`` places (a
picodollar), so sums are exact and live totals, DuckDB and reports reconcile to
the last unit. Floats are refused.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext

MONEY_PLACES = 12
MONEY_QUANTUM = Decimal(1).scaleb(-MONEY_PLACES)
# 38 digits: the widest DECIMAL DuckDB stores, and wide enough for any tenant's sums.
MONEY_CONTEXT = Context(prec=38, rounding=ROUND_HALF_EVEN)
ZERO = Decimal(0).quantize(MONEY_QUANTUM)


def money(value: Decimal | int | str) -> Decimal:
    """Round an exact amount to the money quantum (half to even)."""
    if isinstance(value, float):
        raise TypeError("money is never a float: pass a Decimal, int or str")
    amount = Decimal(value)
    if not amount.is_finite():
        raise ValueError(f"money must be finite, got {value!r}")
    with localcontext(MONEY_CONTEXT):
        return amount.quantize(MONEY_QUANTUM)


def add(a: Decimal, b: Decimal) -> Decimal:
    """Sum two money amounts exactly (both already quantised)."""
    with localcontext(MONEY_CONTEXT):
        return a + b


def format_usd(amount: Decimal, places: int = 6) -> str:
    """Human display only: never feed the result back into arithmetic."""
    shown = amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)
    return f"${shown:,}"
