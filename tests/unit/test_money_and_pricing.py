from decimal import Decimal

import pytest

from ledger.money import MONEY_QUANTUM, add, money
from ledger.plans import CostRate, Plan
from ledger.pricing import price
from tests.factories import seed_plans


def test_money_refuses_floats():
    with pytest.raises(TypeError):
        money(0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw, expected", [
    ("0.0000000000005", "0.000000000000"),   # half to even: down to 0
    ("0.0000000000015", "0.000000000002"),   # half to even: up to 2
    ("1", "1.000000000000"),
])
def test_money_rounds_half_to_even_at_the_quantum(raw, expected):
    assert money(raw) == Decimal(expected)
    assert money(raw).as_tuple().exponent == MONEY_QUANTUM.as_tuple().exponent


def test_sums_are_exact():
    total = money(0)
    for _ in range(10_000):
        total = add(total, money("0.00075"))
    assert total == Decimal("7.5")


def test_the_plans_guide_free_call_costs_exactly_0_00075():
    free = seed_plans()["free"]
    assert price(free, "gpt-4o-mini", 1000, 1000, {}) == Decimal("0.00075")


@pytest.mark.parametrize("model, input_tokens, output_tokens, expected", [
    ("gpt-4o", 1000, 1000, "0.0125"),
    ("gpt-4o", 1, 0, "0.0000025"),
    ("gpt-4o-mini", 0, 0, "0"),
    ("gpt-4o-mini", 123_457, 7, "0.01852275"),  # 123.457 × 0.00015 + 0.007 × 0.0006
])
def test_pro_plan_prices(model, input_tokens, output_tokens, expected):
    assert price(seed_plans()["pro"], model, input_tokens, output_tokens, {}) == Decimal(expected)


def test_markup_tools_and_default_rate():
    plan = Plan(plan_id="p", name="p", version=1, markup=Decimal("1.045"),
                model_limits={}, cost_rates={"m": CostRate(input=Decimal("0.001"), output=Decimal("0.002"))},
                default_cost_rate=CostRate(input=Decimal("0.01"), output=Decimal("0.01")),
                tool_costs={"web_search": Decimal("0.01")})
    # (1 × 0.001 + 1 × 0.002 + 2 × 0.01) × 1.045 = 0.024035
    assert price(plan, "m", 1000, 1000, {"web_search": 2, "unpriced_tool": 5}) == Decimal("0.024035")


def test_a_model_the_plan_neither_prices_nor_limits_is_not_allowed():
    assert price(seed_plans()["free"], "gpt-4o", 1000, 1000, {}) is None
