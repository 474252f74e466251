"""Tiers and margins: what an end customer buys (price, API budget, models) and what it leaves the operator.

The tiers guide's model: profit = subscription price - API budget x markup (provider cost plus the
4.5% platform fee). Every value here is an exact ``Decimal``; rounding to cents happens only in
:func:`display`, for people. A tier becomes a priced :class:`~ledger.plans.Plan` with
:func:`tier_to_plan`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation, localcontext
from typing import Any, Literal, Protocol

import msgspec
import yaml

from ledger.money import MONEY_CONTEXT
from ledger.plans import MODEL_NAME_LENGTH_MAX, PLAN_NAME_LENGTH_MAX, PLANS_PER_FILE_MAX, CostRate, Plan

__all__ = [
    "PLATFORM_MARKUP",
    "BillingMode",
    "Margin",
    "MarginDisplay",
    "PriceInterval",
    "RateSource",
    "Tier",
    "TierError",
    "display",
    "format_usd_cents",
    "margin",
    "margin_from",
    "parse_tier",
    "parse_tier_yaml",
    "parse_tiers_yaml",
    "target_budget",
    "tier_to_plan",
    "to_cents",
]

# Provider cost + the 4.5% platform fee: the guide's "x 1.045".
PLATFORM_MARKUP = Decimal("1.045")
MARKUP_MAX = Decimal(10)
CENTS_MAX = 10**12  # $10 billion: far above any tier, low enough that every product stays exact in 38 digits
TRIAL_DAYS_MAX = 365
TIER_CODE_LENGTH_MAX = PLAN_NAME_LENGTH_MAX  # the tier code becomes the plan's name
DISPLAY_NAME_LENGTH_MAX = 128
MODELS_PER_TIER_MAX = 256
TIERS_PER_FILE_MAX = PLANS_PER_FILE_MAX
YAML_CHARS_MAX = 1_000_000
USD_MAX = Decimal(CENTS_MAX).scaleb(-2)

CENT = Decimal("0.01")
WHOLE = Decimal(1)
HUNDRED = Decimal(100)
DEFAULT_SUFFIX = "(default)"

BillingMode = Literal["subscription", "paygo"]
PriceInterval = Literal["month", "year"]
BILLING_MODES: tuple[BillingMode, ...] = ("subscription", "paygo")
PRICE_INTERVALS: tuple[PriceInterval, ...] = ("month", "year")

TIER_FIELDS = frozenset({
    "tier_code", "display_name", "billing_mode", "spend_limit_cents", "models",
    "price_amount_cents", "price_interval", "trial_days", "markup",
})
_TIER_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_MODEL_NAME = re.compile(r"\S+")
_DEFAULT_MARK = re.compile(r"^(?P<name>.*?)\s*\(default\)$")


class TierError(ValueError):
    """A tier or margin input that cannot be accepted; the message names the field."""


class Tier(msgspec.Struct, frozen=True, kw_only=True):
    """One tier of the guide. ``spend_limit_cents`` 0 means unlimited; paygo tiers have no budget."""

    tier_code: str
    display_name: str
    models: tuple[str, ...]
    default_model: str
    billing_mode: BillingMode = "subscription"
    spend_limit_cents: int = 0
    price_amount_cents: int = 0
    price_interval: PriceInterval | None = None
    trial_days: int = 0
    markup: Decimal = PLATFORM_MARKUP

    @property
    def price_usd(self) -> Decimal:
        return Decimal(self.price_amount_cents).scaleb(-2)

    @property
    def budget_usd(self) -> Decimal | None:
        """The API budget in dollars; None when there is none (unlimited, or paygo)."""
        if self.billing_mode == "paygo" or self.spend_limit_cents == 0:
            return None
        return Decimal(self.spend_limit_cents).scaleb(-2)


class Margin(msgspec.Struct, frozen=True, kw_only=True):
    """Exact figures for one price and budget. ``margin`` is a fraction, ``margin_pct`` the same x 100."""

    price_usd: Decimal
    budget_usd: Decimal
    markup: Decimal
    cost_usd: Decimal  # budget x markup: what the budget costs the operator when fully used
    profit_usd: Decimal  # price - cost
    margin: Decimal | None  # profit / price; None when the price is 0
    margin_pct: Decimal | None


class MarginDisplay(msgspec.Struct, frozen=True, kw_only=True):
    """A margin rounded for people: cents half-up, profit = shown price - shown cost, whole percent."""

    price_usd: Decimal
    budget_usd: Decimal
    cost_usd: Decimal
    profit_usd: Decimal
    margin_pct: Decimal | None


class RateSource(Protocol):
    """Where provider rates come from (``ledger.catalog.PriceCatalog``, or a stub in tests)."""

    def rate(self, model: str) -> CostRate | None: ...


# -- margins ------------------------------------------------------------------------------------


def margin_from(price_usd: Decimal | int | str, budget_usd: Decimal | int | str,
                markup: Decimal | int | str = PLATFORM_MARKUP) -> Margin:
    """The guide's formula: cost = budget x markup, profit = price - cost, margin = profit / price."""
    price = _amount("price_usd", price_usd)
    budget = _amount("budget_usd", budget_usd)
    rate = _markup("markup", markup)
    with localcontext(MONEY_CONTEXT):
        # Inputs are bounded, so cost and profit are exact; only the ratio is rounded (to 38 digits).
        cost = budget * rate
        profit = price - cost
        ratio = profit / price if price else None
        pct = profit * HUNDRED / price if price else None
    return Margin(price_usd=price, budget_usd=budget, markup=rate, cost_usd=cost, profit_usd=profit,
                  margin=ratio, margin_pct=pct)


def margin(tier: Tier) -> Margin:
    """The margin of a tier with a fixed budget; a tier without one has no fixed margin."""
    budget = tier.budget_usd
    if budget is None:
        why = "paygo tiers have no budget" if tier.billing_mode == "paygo" else "spend_limit_cents 0 is unlimited"
        raise TierError(f"tier {tier.tier_code!r}: no fixed margin ({why}; cost varies with usage)")
    return margin_from(tier.price_usd, budget, tier.markup)


def target_budget(price_usd: Decimal | int | str, target_margin: Decimal | int | str,
                  markup: Decimal | int | str = PLATFORM_MARKUP) -> Decimal:
    """The budget that leaves ``target_margin`` (a fraction): price x (1 - margin) / markup, unrounded.

    Round it down to whole cents for a ``spend_limit_cents`` that keeps the margin at or above target.
    """
    price = _amount("price_usd", price_usd)
    wanted = _decimal("target_margin", target_margin)
    rate = _markup("markup", markup)
    if price == 0:
        raise TierError("price_usd must be above 0: a margin is a share of the price")
    if wanted >= 1:
        raise TierError(f"target_margin must be below 1 (a fraction, 0.5 = 50%), got {wanted}")
    if wanted < -USD_MAX:
        raise TierError(f"target_margin is out of range, got {wanted}")
    with localcontext(MONEY_CONTEXT):
        return price * (1 - wanted) / rate


def to_cents(amount: Decimal) -> Decimal:
    """Display rounding: to the cent, half up (the guide shows $5.225 as $5.23). Never feed it back."""
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


def display(m: Margin) -> MarginDisplay:
    """The guide's table row: price and cost to the cent, profit as their difference, whole percent.

    Profit is shown as shown-price - shown-cost so a row adds up (Starter: $29.00 - $15.68 = $13.32,
    where the exact profit is $13.325).
    """
    price, cost = to_cents(m.price_usd), to_cents(m.cost_usd)
    pct = None if m.margin_pct is None else m.margin_pct.quantize(WHOLE, rounding=ROUND_HALF_UP)
    return MarginDisplay(price_usd=price, budget_usd=to_cents(m.budget_usd), cost_usd=cost,
                         profit_usd=price - cost, margin_pct=pct)


def format_usd_cents(amount: Decimal) -> str:
    """``$1,234.50`` / ``-$23.25``: an amount rounded to the cent, for people."""
    cents = to_cents(amount)
    sign = "-" if cents < 0 else ""
    return f"{sign}${abs(cents):,.2f}"


# -- tiers to plans -------------------------------------------------------------------------------


def tier_to_plan(tier: Tier, *, plan_id: str, version: int, catalog: RateSource) -> Plan:
    """The tier as a plan version: its budget is the period limit, its models the only ones priced.

    The plan counts spend at provider rate x the tier's markup against ``spend_limit_cents``.
    """
    if not plan_id:
        raise TierError(f"tier {tier.tier_code!r}: plan_id must not be empty")
    if version < 1:
        raise TierError(f"tier {tier.tier_code!r}: version must be at least 1, got {version}")
    rates: dict[str, CostRate] = {}
    for model in tier.models:
        rate = catalog.rate(model)
        if rate is None:
            raise TierError(f"tier {tier.tier_code!r}: model {model!r} has no price in the provider catalog")
        rates[model] = rate
    return Plan(
        plan_id=plan_id,
        name=tier.tier_code,
        version=version,
        max_spend_per_period=tier.budget_usd,
        cost_rates=rates,
        markup=tier.markup,
        period_interval=tier.price_interval or "month",
        billing_mode=tier.billing_mode,
        trial_days=tier.trial_days,
    )


# -- parsing -----------------------------------------------------------------------------------------


def parse_tier_yaml(text: str) -> Tier:
    """Exactly one tier from YAML (a mapping, as the guide writes it)."""
    tiers = parse_tiers_yaml(text)
    if len(tiers) != 1:
        raise TierError(f"expected exactly one tier, found {len(tiers)}")
    return tiers[0]


def parse_tiers_yaml(text: str) -> list[Tier]:
    """Tiers from YAML: one mapping per document (documents separated by ``---``), or lists of them."""
    if len(text) > YAML_CHARS_MAX:
        raise TierError(f"tier YAML is longer than {YAML_CHARS_MAX} characters")
    try:
        documents = list(yaml.load_all(text, Loader=_TierLoader))  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise TierError(f"not valid YAML: {exc}") from None
    raw: list[object] = []
    for document in documents:
        if document is None:  # an empty document, e.g. before a leading ---
            continue
        raw.extend(document if isinstance(document, list) else [document])
    if len(raw) > TIERS_PER_FILE_MAX:
        raise TierError(f"tiers_per_file_max: at most {TIERS_PER_FILE_MAX} tiers in one request or file, got {len(raw)}")
    tiers = [parse_tier(item, where=f"tier #{index}") for index, item in enumerate(raw, start=1)]
    codes = [tier.tier_code for tier in tiers]
    duplicates = sorted({code for code in codes if codes.count(code) > 1})
    if duplicates:
        raise TierError(f"tier_code must be unique within one file: {', '.join(duplicates)}")
    return tiers


def parse_tier(raw: object, *, where: str = "tier") -> Tier:
    """Validate one tier given as a mapping (decoded YAML or JSON). Money must not arrive as a float."""
    if not isinstance(raw, Mapping):
        raise TierError(f"{where}: expected a mapping of tier fields, got {type(raw).__name__}")
    unknown = sorted(str(key) for key in raw if key not in TIER_FIELDS)
    if unknown:
        raise TierError(f"{where}: unknown field {', '.join(map(repr, unknown))}")
    code = raw.get("tier_code")
    if not isinstance(code, str) or not _TIER_CODE.fullmatch(code) or len(code) > TIER_CODE_LENGTH_MAX:
        raise TierError(f"{where}: tier_code must be 1 to {TIER_CODE_LENGTH_MAX} letters, digits, '_', '.' "
                        f"or '-', got {code!r}")
    where = f"tier {code!r}"
    name = raw.get("display_name")
    if not isinstance(name, str) or not name.strip() or len(name) > DISPLAY_NAME_LENGTH_MAX:
        raise TierError(f"{where}: display_name must be a non-empty string of at most "
                        f"{DISPLAY_NAME_LENGTH_MAX} characters, got {name!r}")
    mode = raw.get("billing_mode", "subscription")
    if mode not in BILLING_MODES:
        raise TierError(f"{where}: billing_mode must be one of {', '.join(BILLING_MODES)}, got {mode!r}")
    interval = raw.get("price_interval")
    if interval is not None and interval not in PRICE_INTERVALS:
        raise TierError(f"{where}: price_interval must be one of {', '.join(PRICE_INTERVALS)}, got {interval!r}")
    spend = _whole(where, "spend_limit_cents", raw.get("spend_limit_cents", 0), CENTS_MAX)
    price = _whole(where, "price_amount_cents", raw.get("price_amount_cents", 0), CENTS_MAX)
    trial = _whole(where, "trial_days", raw.get("trial_days", 0), TRIAL_DAYS_MAX)
    if mode == "paygo":
        # The guide: billing fields are for subscriptions only; a paygo tier has no price to charge.
        for field, value in (("price_amount_cents", price), ("trial_days", trial)):
            if value:
                raise TierError(f"{where}: {field} must be 0 for a paygo tier (billing fields are subscription only)")
        if interval is not None:
            raise TierError(f"{where}: price_interval must be absent for a paygo tier (billing fields are subscription only)")
    try:
        markup = _markup("markup", raw.get("markup", PLATFORM_MARKUP))
    except TierError as exc:
        raise TierError(f"{where}: {exc}") from None
    models, default = _models(where, raw.get("models"))
    return Tier(tier_code=code, display_name=name, billing_mode=mode, spend_limit_cents=spend,
                price_amount_cents=price, price_interval=interval, trial_days=trial, markup=markup,
                models=models, default_model=default)


def _models(where: str, raw: object) -> tuple[tuple[str, ...], str]:
    """The allowed models, de-duplicated in order, and the one marked ``(default)`` (else the first)."""
    if not isinstance(raw, list) or not raw:
        raise TierError(f"{where}: models must be a non-empty list of model names")
    if len(raw) > MODELS_PER_TIER_MAX:
        raise TierError(f"{where}: models lists more than {MODELS_PER_TIER_MAX} entries")
    models: list[str] = []
    defaults: list[str] = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, str):
            raise TierError(f"{where}: models[{index}] must be a model name, got {entry!r}")
        text = entry.strip()
        marked = _DEFAULT_MARK.match(text)
        name = marked.group("name") if marked else text
        if not _MODEL_NAME.fullmatch(name) or len(name) > MODEL_NAME_LENGTH_MAX:
            raise TierError(f"{where}: models[{index}] must be a model name (no spaces, at most "
                            f"{MODEL_NAME_LENGTH_MAX} characters), optionally followed by {DEFAULT_SUFFIX!r}; "
                            f"got {entry!r}")
        if marked and name not in defaults:
            defaults.append(name)
        if name not in models:
            models.append(name)
    if len(defaults) > 1:
        raise TierError(f"{where}: models marks more than one default: {', '.join(defaults)}")
    return tuple(models), defaults[0] if defaults else models[0]


def _whole(where: str, field: str, value: object, maximum: int) -> int:
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        value = int(value)  # 2900.0 in YAML
    if isinstance(value, bool) or not isinstance(value, int):
        raise TierError(f"{where}: {field} must be a whole number, got {value!r}")
    if not 0 <= value <= maximum:
        raise TierError(f"{where}: {field} must be between 0 and {maximum}, got {value}")
    return value


def _decimal(field: str, value: object) -> Decimal:
    if isinstance(value, float):
        raise TierError(f"{field} must be exact (a Decimal, int or string), never a float: got {value!r}")
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise TierError(f"{field} must be a number, got {value!r}")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise TierError(f"{field} must be a number, got {value!r}") from None
    if not number.is_finite():
        raise TierError(f"{field} must be finite, got {value!r}")
    return number


def _amount(field: str, value: object) -> Decimal:
    number = _decimal(field, value)
    if not 0 <= number <= USD_MAX:
        raise TierError(f"{field} must be between 0 and {USD_MAX}, got {number}")
    return number


def _markup(field: str, value: object) -> Decimal:
    number = _decimal(field, value)
    if not 0 < number <= MARKUP_MAX:
        raise TierError(f"{field} must be above 0 and at most {MARKUP_MAX}, got {number}")
    return number


class _TierLoader(yaml.SafeLoader):
    """Safe YAML where floats are Decimals from their own text, and a repeated key is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    text = str(loader.construct_scalar(node)).replace("_", "").lower()
    special = {".inf": "Infinity", "+.inf": "Infinity", "-.inf": "-Infinity", ".nan": "NaN"}
    try:
        return Decimal(special.get(text, text))
    except InvalidOperation:  # YAML 1.1 sexagesimal floats (1:30.5): not money anyone writes
        raise yaml.constructor.ConstructorError(None, None, f"unsupported number {text!r}", node.start_mark) from None


_TierLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)
