"""The cost of one model call under a plan version."""

from __future__ import annotations

from decimal import Decimal, localcontext

from ledger.money import MONEY_CONTEXT, money
from ledger.plans import Plan

TOKENS_PER_RATE_UNIT = 1000


def price(plan: Plan, model: str, input_tokens: int, output_tokens: int,
          tools: dict[str, int]) -> Decimal | None:
    """Cost in dollars, rounded once to the money quantum; None if the model is not allowed.

    cost = (input / 1000 × rate.input + output / 1000 × rate.output + tool costs) × markup.
    Tools the plan does not price cost nothing.
    """
    rate = plan.rate_for(model)
    if rate is None:
        return None
    with localcontext(MONEY_CONTEXT):
        tokens_cost = (input_tokens * rate.input + output_tokens * rate.output) / TOKENS_PER_RATE_UNIT
        tools_cost = sum((calls * plan.tool_costs.get(name, Decimal(0)) for name, calls in tools.items()),
                         Decimal(0))
        return money((tokens_cost + tools_cost) * plan.markup)
