from decimal import Decimal

import pytest

from ledger.plans import PlanError, parse_plans_config, plans_from_config
from tests.factories import SEED_PLANS_JSON, seed_plans


def test_the_plans_guide_config_loads_verbatim_with_defaults_filled():
    plans = seed_plans()
    assert set(plans) == {"free", "pro"}
    free = plans["free"]
    assert free.max_spend_per_period == Decimal("5.00")
    assert free.max_spend_per_session == Decimal("0.50")
    assert free.model_limits["gpt-4o-mini"].max_tokens_per_period == 10000
    assert free.cost_rates["gpt-4o-mini"].input == Decimal("0.00015")  # exact, never via float
    assert (free.soft_gate_at, free.hard_gate_at) == (Decimal("0.80"), Decimal("1.00"))
    assert free.markup == 1 and free.period_interval == "month" and free.version == 1
    assert plans["pro"].model_limits["gpt-4o"].max_tokens_per_period == 50000


def test_plan_ids_are_deterministic_per_tenant():
    config = parse_plans_config(SEED_PLANS_JSON)
    a, b, other = plans_from_config(config, "t1"), plans_from_config(config, "t1"), plans_from_config(config, "t2")
    assert [p.plan_id for p in a] == [p.plan_id for p in b]
    assert {p.plan_id for p in a}.isdisjoint(p.plan_id for p in other)


def test_a_plan_overrides_the_global_thresholds():
    config = parse_plans_config(b'{"soft_gate_at": 0.7, "plans": [{"name": "a", "soft_gate_at": 0.6,'
                                b' "cost_rates": {"m": {"input": 1, "output": 1}}}, {"name": "b"}]}')
    a, b = plans_from_config(config, "t")
    assert (a.soft_gate_at, b.soft_gate_at, a.hard_gate_at) == (Decimal("0.6"), Decimal("0.7"), Decimal("1.00"))


@pytest.mark.parametrize("body, message", [
    (b'{"plans": [{"name": "a", "soft_gate_at": 0.9, "hard_gate_at": 0.8}]}', "soft_gate_at 0.9 is above"),
    (b'{"plans": [{"name": "a", "cost_rates": {"m": {"input": -1, "output": 1}}}]}', "cost_rates.m.input"),
    (b'{"plans": [{"name": "a", "model_limits": {"m": {"max_tokens_per_period": 5}}}]}', "no cost rate"),
    (b'{"plans": [{"name": "a", "max_spend_per_period": -3}]}', "max_spend_per_period"),
    (b'{"plans": [{"name": "a", "max_spend_per_period": 1e999999}]}', "max_spend_per_period"),
    (b'{"plans": [{"name": "a", "markup": 1e999999}]}', "markup"),
    (b'{"plans": [{"name": "a", "colour": "red"}]}', "colour"),
    (b'{"plans": [{"name": "a"}, {"name": "a"}]}', "unique"),
    (b'{"plans": [{"name": "a", "soft_gate_at": 0}]}', "soft_gate_at"),
    (b'not json', "not valid JSON"),
])
def test_invalid_configs_name_the_field(body, message):
    with pytest.raises(PlanError, match=message):
        plans_from_config(parse_plans_config(body), "t")
