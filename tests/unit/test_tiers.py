"""Tiers and margins against the tiers guide's own examples, copied verbatim, and a Fraction oracle."""

from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.catalog import load_catalog
from ledger.plans import CostRate
from ledger.pricing import price
from ledger.tiers import (
    PLATFORM_MARKUP,
    Tier,
    TierError,
    display,
    format_usd_cents,
    margin,
    margin_from,
    parse_tier_yaml,
    parse_tiers_yaml,
    target_budget,
    tier_to_plan,
    to_cents,
)

# -- the guide's YAML blocks, verbatim (Common Tier Patterns) -------------------------------------

STARTER_YAML = """\
tier_code: "starter"
display_name: "Starter"
price_amount_cents: 2900      # $29/month
price_interval: "month"
spend_limit_cents: 1500       # $15 API budget
trial_days: 7
models:
  - claude-sonnet-4-5 (default)
"""

PRO_YAML = """\
tier_code: "pro"
display_name: "Pro"
price_amount_cents: 9900      # $99/month
price_interval: "month"
spend_limit_cents: 6000       # $60 API budget
trial_days: 14
models:
  - claude-sonnet-4-5 (default)
  - claude-sonnet-4-5
"""

BUSINESS_YAML = """\
tier_code: "business"
display_name: "Business"
price_amount_cents: 29900     # $299/month
price_interval: "month"
spend_limit_cents: 20000      # $200 API budget
models:
  - claude-sonnet-4-5 (default)
  - claude-sonnet-4-5
  - claude-opus-4-5
"""

FREE_YAML = """\
tier_code: "free"
display_name: "Free"
price_amount_cents: 0
spend_limit_cents: 500        # $5 API budget
models:
  - claude-sonnet-4-5 (default)
"""

PAYGO_YAML = """\
tier_code: "paygo"
display_name: "Pay As You Go"
billing_mode: "paygo"
models:
  - claude-sonnet-4-5 (default)
  - claude-sonnet-4-5
"""

GUIDE_BLOCKS = [STARTER_YAML, PRO_YAML, BUSINESS_YAML, FREE_YAML, PAYGO_YAML]
GUIDE = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "004_25faf8faf41da118.txt"
SONNET, OPUS = "claude-sonnet-4-5", "claude-opus-4-5"
D = Decimal


@pytest.mark.skipif(not GUIDE.exists(), reason="the seed guide lives outside the repository")
@pytest.mark.parametrize("block", GUIDE_BLOCKS, ids=["starter", "pro", "business", "free", "paygo"])
def test_the_yaml_constants_are_the_guides_blocks_verbatim(block):
    assert block in GUIDE.read_text(encoding="utf-8")


# -- given the guide's blocks, when parsed, then every field is as written -------------------------


@pytest.mark.parametrize(
    "block, code, name, mode, price_cents, interval, spend_cents, trial, models", [
        (STARTER_YAML, "starter", "Starter", "subscription", 2900, "month", 1500, 7, (SONNET,)),
        (PRO_YAML, "pro", "Pro", "subscription", 9900, "month", 6000, 14, (SONNET,)),
        (BUSINESS_YAML, "business", "Business", "subscription", 29900, "month", 20000, 0, (SONNET, OPUS)),
        (FREE_YAML, "free", "Free", "subscription", 0, None, 500, 0, (SONNET,)),
        (PAYGO_YAML, "paygo", "Pay As You Go", "paygo", 0, None, 0, 0, (SONNET,)),
    ], ids=["starter", "pro", "business", "free", "paygo"])
def test_the_guides_blocks_parse_verbatim(block, code, name, mode, price_cents, interval, spend_cents, trial, models):
    tier = parse_tier_yaml(block)
    assert (tier.tier_code, tier.display_name, tier.billing_mode) == (code, name, mode)
    assert (tier.price_amount_cents, tier.price_interval, tier.spend_limit_cents, tier.trial_days) == (
        price_cents, interval, spend_cents, trial)
    assert tier.models == models  # the "(default)" suffix parsed off, repeats dropped in order
    assert tier.default_model == SONNET
    assert tier.markup == D("1.045") and isinstance(tier.markup, Decimal)


def test_all_the_guides_blocks_load_as_one_multi_document_file_or_a_list():
    codes = ["starter", "pro", "business", "free", "paygo"]
    assert [t.tier_code for t in parse_tiers_yaml("---\n".join(GUIDE_BLOCKS))] == codes
    as_list = "".join("- " + block.replace("\n", "\n  ").rstrip() + "\n" for block in GUIDE_BLOCKS)
    assert [t.tier_code for t in parse_tiers_yaml(as_list)] == codes
    assert parse_tiers_yaml("---\n" + STARTER_YAML + "---\n") == [parse_tier_yaml(STARTER_YAML)]


# -- margins: the guide's figures, expected values written out by hand -------------------------------


@pytest.mark.parametrize("block, cost_exact, profit_exact, cost, profit, pct", [
    # Margin: $29 - ($15 x 1.045) = $13.32 (46%); the table shows cost $15.68
    (STARTER_YAML, "15.675", "13.325", "15.68", "13.32", "46"),
    # Margin: $99 - ($60 x 1.045) = $36.30 (37%); cost $62.70
    (PRO_YAML, "62.7", "36.3", "62.70", "36.30", "37"),
    # Margin: $299 - ($200 x 1.045) = $90.00 (30%); cost $209.00
    (BUSINESS_YAML, "209", "90", "209.00", "90.00", "30"),
], ids=["starter", "pro", "business"])
def test_the_guides_tier_margins(block, cost_exact, profit_exact, cost, profit, pct):
    exact = margin(parse_tier_yaml(block))
    assert (exact.cost_usd, exact.profit_usd) == (D(cost_exact), D(profit_exact))
    shown = display(exact)
    assert (str(shown.cost_usd), str(shown.profit_usd), str(shown.margin_pct)) == (cost, profit, pct)


def test_a_free_user_costs_five_dollars_twenty_three_and_has_no_margin():
    exact = margin(parse_tier_yaml(FREE_YAML))
    assert exact.cost_usd == D("5.225") and exact.profit_usd == D("-5.225")
    assert exact.margin is None and exact.margin_pct is None  # no price, no percentage
    shown = display(exact)
    assert (str(shown.cost_usd), str(shown.profit_usd), shown.margin_pct) == ("5.23", "-5.23", None)
    assert format_usd_cents(exact.cost_usd) == "$5.23"


@pytest.mark.parametrize("block, field", [(PAYGO_YAML, "paygo"), (STARTER_YAML.replace("1500", "0"), "unlimited")])
def test_a_tier_without_a_fixed_budget_has_no_fixed_margin(block, field):
    tier = parse_tier_yaml(block)
    assert tier.budget_usd is None
    with pytest.raises(TierError, match=field):
        margin(tier)


@pytest.mark.parametrize("price_usd, budget_usd, cost, profit, pct", [
    # Tiered Margins
    (29, 10, "10.45", "18.55", "64"),
    (99, 50, "52.25", "46.75", "47"),
    (299, 180, "188.10", "110.90", "37"),
    # Budget vs. Subscription
    (99, 30, "31.35", "67.65", "68"),
    (99, 60, "62.70", "36.30", "37"),
    (99, 85, "88.83", "10.17", "10"),  # exact: cost 88.825, profit 10.175
    (29, 50, "52.25", "-23.25", "-80"),
    # Value-Based Pricing: $99/month with $30 budget -> 68%
    ("99.00", "30.00", "31.35", "67.65", "68"),
], ids=["starter-10", "pro-50", "business-180", "high", "balanced", "low", "subsidized", "value-based"])
def test_the_guides_margin_tables(price_usd, budget_usd, cost, profit, pct):
    shown = display(margin_from(price_usd, budget_usd))
    assert (str(shown.cost_usd), str(shown.profit_usd), str(shown.margin_pct)) == (cost, profit, pct)


@pytest.mark.parametrize("price_usd, target, shown, exact", [
    # Budget = $99 x 0.50 / 1.045 = $47.37, i.e. 9900/209 exactly
    (99, "0.5", "47.37", Fraction(9900, 209)),
    (99, "0.3", "66.32", Fraction(99 * 7 * 1000, 10 * 1045)),
    (29, "0", "27.75", Fraction(29000, 1045)),
    (29, "-0.8", "49.95", Fraction(29 * 18 * 100, 1045)),
])
def test_target_budget(price_usd, target, shown, exact):
    budget = target_budget(price_usd, target)
    assert str(to_cents(budget)) == shown
    assert abs(Fraction(budget) - exact) < Fraction(1, 10**30)


def test_money_is_exact_decimal_and_floats_are_refused():
    tier = parse_tier_yaml(STARTER_YAML + "markup: 1.05\n")  # a YAML float, read from its own text
    assert tier.markup == D("1.05") and type(tier.markup) is Decimal
    assert parse_tier_yaml(STARTER_YAML.replace("2900 ", "2900.0")).price_amount_cents == 2900
    for call in (lambda: margin_from(29.0, 15), lambda: margin_from(29, 15, 1.045), lambda: target_budget(99, 0.5)):
        with pytest.raises(TierError, match="float"):
            call()


@pytest.mark.parametrize("edit, message", [
    (lambda y: y.replace('tier_code: "starter"\n', ""), "tier_code"),
    (lambda y: y.replace('"starter"', '"star ter"'), "tier_code"),
    (lambda y: y.replace('display_name: "Starter"', 'display_name: ""'), "display_name"),
    (lambda y: y + 'billing_mode: "monthly"\n', "billing_mode must be one of subscription, paygo, got 'monthly'"),
    (lambda y: y.replace("1500", "-1500"), "spend_limit_cents must be between 0"),
    (lambda y: y.replace("2900 ", "-2900"), "price_amount_cents must be between 0"),
    (lambda y: y.replace("2900 ", "29.50"), "price_amount_cents must be a whole number"),
    (lambda y: y.replace("2900 ", '"2900"'), "price_amount_cents must be a whole number"),
    (lambda y: y.replace("2900 ", "true"), "price_amount_cents must be a whole number"),
    (lambda y: y.replace('"month"', '"week"'), "price_interval must be one of month, year, got 'week'"),
    (lambda y: y.replace("trial_days: 7", "trial_days: -7"), "trial_days"),
    (lambda y: y.replace("trial_days: 7", "trial_days: 9999"), "trial_days"),
    (lambda y: y + "markup: 0\n", "markup must be above 0"),
    (lambda y: y + "markup: .inf\n", "markup must be finite"),
    (lambda y: y + 'markup: "lots"\n', "markup must be a number"),
    (lambda y: y.split("models:")[0], "models must be a non-empty list"),
    (lambda y: y.split("models:")[0] + "models: []\n", "models must be a non-empty list"),
    (lambda y: y + "  - claude-opus-4-5 (default)\n", "more than one default: claude-sonnet-4-5, claude-opus-4-5"),
    (lambda y: y + "  - claude opus\n", r"models\[1\]"),
    (lambda y: y + "  - 42\n", r"models\[1\]"),
    (lambda y: y + "colour: red\n", "unknown field 'colour'"),
    (lambda y: y + "trial_days: 3\n", "duplicate key 'trial_days'"),
    (lambda y: y + "models: [\n", "not valid YAML"),
    (lambda y: "just words\n", "expected a mapping"),
    (lambda y: y + "---\n" + y, "tier_code must be unique"),
    (lambda y: y + "---\n" + y.replace("starter", "other"), "expected exactly one tier, found 2"),
    (lambda y: y + 'billing_mode: "paygo"\n', "price_amount_cents must be 0 for a paygo tier"),
    (lambda y: y.replace("2900 ", "0").replace("trial_days: 7", "billing_mode: paygo"), "price_interval must be absent"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_tiers_name_the_field(edit, message):
    with pytest.raises(TierError, match=message):
        parse_tier_yaml(edit(STARTER_YAML))


@pytest.mark.parametrize("call, message", [
    (lambda: margin_from(-1, 10), "price_usd"),
    (lambda: margin_from(29, -1), "budget_usd"),
    (lambda: margin_from(29, 10, 0), "markup"),
    (lambda: margin_from("NaN", 10), "price_usd must be finite"),
    (lambda: margin_from("abc", 10), "price_usd must be a number"),
    (lambda: target_budget(99, 1), "target_margin must be below 1"),  # a budget of 0 would read as unlimited
    (lambda: target_budget(0, "0.5"), "price_usd must be above 0"),
])
def test_invalid_margin_inputs_name_the_field(call, message):
    with pytest.raises(TierError, match=message):
        call()


# -- tiers to plans ----------------------------------------------------------------------------


CATALOG = load_catalog()


@pytest.mark.parametrize("block, limit, interval, allowed, refused", [
    (STARTER_YAML, D("15.00"), "month", {SONNET}, {OPUS, "gpt-4o"}),
    (BUSINESS_YAML, D("200.00"), "month", {SONNET, OPUS}, {"gpt-4o"}),
    (FREE_YAML, D("5.00"), "month", {SONNET}, {OPUS}),
    (PAYGO_YAML, None, "month", {SONNET}, {OPUS}),
    (STARTER_YAML.replace("1500", "0"), None, "month", {SONNET}, {OPUS}),
    (STARTER_YAML.replace('"month"', '"year"'), D("15.00"), "year", {SONNET}, {OPUS}),
], ids=["starter", "business", "free", "paygo", "unlimited", "yearly"])
def test_a_tier_becomes_a_plan(block, limit, interval, allowed, refused):
    tier = parse_tier_yaml(block)
    plan = tier_to_plan(tier, plan_id="p-1", version=3, catalog=CATALOG)
    assert (plan.plan_id, plan.name, plan.version) == ("p-1", tier.tier_code, 3)
    assert plan.max_spend_per_period == limit and plan.max_spend_per_session is None
    assert plan.period_interval == interval and plan.markup == D("1.045")
    assert set(plan.cost_rates) == allowed and plan.default_cost_rate is None
    assert all(plan.allows(m) for m in allowed) and not any(plan.allows(m) for m in refused)


def test_a_tier_plan_prices_at_provider_rate_plus_the_platform_fee():
    plan = tier_to_plan(parse_tier_yaml(STARTER_YAML), plan_id="p", version=1, catalog=CATALOG)
    assert plan.cost_rates[SONNET] == CostRate(input=D("0.003"), output=D("0.015"))  # $3 / $15 per million
    # (1000/1000 x 0.003 + 1000/1000 x 0.015) x 1.045 = 0.01881
    assert price(plan, SONNET, 1000, 1000, {}) == D("0.018810000000")
    assert price(plan, OPUS, 1000, 1000, {}) is None


class _Rates:
    def __init__(self, rates: dict[str, CostRate]) -> None:
        self.rates = rates

    def rate(self, model: str) -> CostRate | None:
        return self.rates.get(model)


def test_a_model_missing_from_the_catalog_is_named():
    with pytest.raises(TierError, match="'claude-opus-4-5' has no price"):
        tier_to_plan(parse_tier_yaml(BUSINESS_YAML), plan_id="p", version=1,
                     catalog=_Rates({SONNET: CostRate(input=D(1), output=D(1))}))
    with pytest.raises(TierError, match="version"):
        tier_to_plan(parse_tier_yaml(STARTER_YAML), plan_id="p", version=0, catalog=CATALOG)


def test_a_tier_is_immutable():
    tier = parse_tier_yaml(STARTER_YAML)
    with pytest.raises(AttributeError):
        tier.spend_limit_cents = 0  # type: ignore[misc]
    assert isinstance(tier, Tier) and hash(tier) == hash(parse_tier_yaml(STARTER_YAML))


# -- properties against a Fraction oracle ------------------------------------------------------------

cents = st.integers(min_value=0, max_value=10**9)  # up to $10 million
markups = st.one_of(st.just(PLATFORM_MARKUP), st.integers(500, 5000).map(lambda m: Decimal(m).scaleb(-3)))


@settings(max_examples=400, deadline=None)
@given(price_cents=cents.filter(bool), budget_cents=cents.filter(bool), markup=markups)
def test_target_budget_inverts_margin_from(price_cents, budget_cents, markup):
    price_usd, budget_usd = Decimal(price_cents).scaleb(-2), Decimal(budget_cents).scaleb(-2)
    ratio = margin_from(price_usd, budget_usd, markup).margin
    assert ratio is not None
    recovered = target_budget(price_usd, ratio, markup)
    # The margin is a quotient rounded to 38 digits, so the round trip is exact to within ~1e-30 of a
    # dollar, never exact in general (1/3 has no finite decimal). The budget is whole cents, so the
    # comparison that must hold exactly is at the cent; the bound shows how far inside it we are.
    assert recovered.quantize(Decimal("0.01")) == budget_usd
    assert abs(Fraction(recovered) - Fraction(budget_cents, 100)) < Fraction(1, 10**24)


@settings(max_examples=400, deadline=None)
@given(price_cents=cents, budget_cents=cents, markup=markups)
def test_cost_and_profit_are_exact(price_cents, budget_cents, markup):
    result = margin_from(Decimal(price_cents).scaleb(-2), Decimal(budget_cents).scaleb(-2), markup)
    cost = Fraction(budget_cents, 100) * Fraction(markup)
    assert Fraction(result.cost_usd) == cost
    assert Fraction(result.profit_usd) == Fraction(price_cents, 100) - cost
    if price_cents:
        exact = (Fraction(price_cents, 100) - cost) / Fraction(price_cents, 100)
        assert abs(Fraction(result.margin) - exact) <= abs(exact) / 10**36 + Fraction(1, 10**37)
    shown = display(result)
    assert shown.price_usd - shown.cost_usd == shown.profit_usd
    assert abs(Fraction(shown.profit_usd) - Fraction(result.profit_usd)) <= Fraction(1, 200)
