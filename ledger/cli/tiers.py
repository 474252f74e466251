"""`ledger tiers`: margins of subscription tiers (price against API budget), from flags or a tiers YAML file."""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path

import click

from ledger.tiers import (
    PLATFORM_MARKUP,
    YAML_CHARS_MAX,
    Margin,
    Tier,
    TierError,
    display,
    format_usd_cents,
    margin,
    margin_from,
    parse_tiers_yaml,
    target_budget,
)


class DecimalType(click.ParamType):
    """An exact decimal from the command line (``99``, ``$99``, ``1,299.50``); never a float."""

    name = "decimal"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Decimal:
        if isinstance(value, Decimal):
            return value
        text = str(value).strip().removeprefix("$").replace(",", "")
        try:
            number = Decimal(text)
        except InvalidOperation:
            self.fail(f"{value!r} is not a number", param, ctx)
        if not number.is_finite():
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class FractionType(DecimalType):
    """A margin as a fraction (``0.5``) or a percentage (``50%``)."""

    name = "fraction"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Decimal:
        text = str(value).strip()
        if text.endswith("%"):
            return super().convert(text[:-1], param, ctx) / 100
        return super().convert(value, param, ctx)


DECIMAL = DecimalType()
FRACTION = FractionType()

tiers = click.Group("tiers", help="Tier margins: what a subscription leaves after its API budget at cost + platform fee.")


@tiers.command("margin")
@click.option("--price", type=DECIMAL, required=True, help="Subscription price in USD per period.")
@click.option("--budget", type=DECIMAL, required=True, help="API budget in USD per period.")
@click.option("--markup", type=DECIMAL, default=str(PLATFORM_MARKUP), show_default=True,
              help="Provider cost multiplier (1.045 = the 4.5% platform fee).")
def margin_command(price: Decimal, budget: Decimal, markup: Decimal) -> None:
    """Profit and margin of one price and budget."""
    try:
        result = margin_from(price, budget, markup)
    except TierError as exc:
        raise click.UsageError(str(exc)) from None
    for line in _margin_lines(result):
        click.echo(line)


@tiers.command("target")
@click.option("--price", type=DECIMAL, required=True, help="Subscription price in USD per period.")
@click.option("--margin", "target", type=FRACTION, required=True, help="Target margin: 0.5 or 50%.")
@click.option("--markup", type=DECIMAL, default=str(PLATFORM_MARKUP), show_default=True,
              help="Provider cost multiplier (1.045 = the 4.5% platform fee).")
def target_command(price: Decimal, target: Decimal, markup: Decimal) -> None:
    """The API budget that leaves a target margin: price x (1 - margin) / markup."""
    try:
        budget = target_budget(price, target, markup)
    except TierError as exc:
        raise click.UsageError(str(exc)) from None
    cents = int(budget.scaleb(2).to_integral_value(rounding=ROUND_FLOOR))  # down: the margin stays >= target
    click.echo(f"price   {format_usd_cents(price)}")
    click.echo(f"margin  {format((target * 100).normalize(), 'f')}%")
    click.echo(f"budget  {format_usd_cents(budget)}")
    if cents > 0:
        click.echo(f"spend_limit_cents  {cents}  (rounded down, so the margin stays at or above the target)")
    else:
        click.echo("spend_limit_cents  none: the budget is under a cent (and 0 would mean unlimited)")


@tiers.command("show")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def show_command(file: Path) -> None:
    """Each tier of a tiers YAML file (one per document, or a list) with its margin."""
    if file.stat().st_size > YAML_CHARS_MAX * 4:
        raise click.ClickException(f"{file}: too large for a tiers file")
    try:
        parsed = parse_tiers_yaml(file.read_text(encoding="utf-8"))
    except (TierError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{file}: {exc}") from None
    for index, tier in enumerate(parsed):
        if index:
            click.echo("")
        for line in _tier_lines(tier):
            click.echo(line)


def _margin_lines(result: Margin) -> list[str]:
    shown = display(result)
    pct = "n/a (no price)" if shown.margin_pct is None else f"{shown.margin_pct}%"
    return [
        f"price   {format_usd_cents(shown.price_usd)}",
        f"budget  {format_usd_cents(shown.budget_usd)}",
        f"cost    {format_usd_cents(shown.cost_usd)}  (budget x {result.markup})",
        f"profit  {format_usd_cents(shown.profit_usd)}",
        f"margin  {pct}",
    ]


def _tier_lines(tier: Tier) -> list[str]:
    if tier.billing_mode == "paygo":
        price = "pay as you go"
    elif tier.price_amount_cents == 0:
        price = "free"
    else:
        price = format_usd_cents(tier.price_usd) + (f"/{tier.price_interval}" if tier.price_interval else "")
    trial = f", {tier.trial_days}-day trial" if tier.trial_days else ""
    models = ", ".join(f"{m} (default)" if m == tier.default_model else m for m in tier.models)
    lines = [f"{tier.tier_code}: {tier.display_name} ({price}{trial})", f"  models  {models}"]
    if tier.budget_usd is None:
        why = "paygo: customers top up a balance" if tier.billing_mode == "paygo" else "unlimited budget"
        return [*lines, f"  margin  none fixed ({why}; cost varies with usage)"]
    return lines + [f"  {line}" for line in _margin_lines(margin(tier))]


@tiers.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tenant", required=True, help="The tenant's name (see `ledger tenants create`).")
def apply_command(file: Path, tenant: str) -> None:
    """Create the tiers of a YAML FILE for TENANT (each with its plan, published to the log)."""
    import asyncio

    from ledger.catalog import load_catalog
    from ledger.control.config import create_tiers
    from ledger.control.store import Conflict, ControlStore
    from ledger.settings import Settings
    from streams.publisher import UsagePublisher

    try:
        parsed = parse_tiers_yaml(file.read_text(encoding="utf-8"))
    except TierError as exc:
        raise click.ClickException(str(exc)) from None
    settings = Settings.from_env()
    store = ControlStore(settings.control_url)
    store.create_schema()

    async def go() -> tuple[list, list]:  # type: ignore[type-arg]
        from ledger.control.outbox import Relay

        def record(session):  # type: ignore[no-untyped-def]
            tenant_id = session.tenant_id(tenant)
            if tenant_id is None:
                raise click.ClickException(f"no tenant {tenant!r}")
            return create_tiers(session, tenant_id, parsed, load_catalog(overrides=settings.price_overrides))

        created, duplicates, seqs = store.transact(record)
        async with UsagePublisher(settings) as publisher:  # recorded first, then published (see outbox.py)
            await Relay(store, publisher).deliver(seqs)
        return created, duplicates

    try:
        created, duplicates = asyncio.run(go())
    except (TierError, ValueError, Conflict) as exc:
        raise click.ClickException(str(exc)) from None
    for record in created:
        click.echo(f"created {record.tier.tier_code}: tier {record.id}, plan {record.plan_id}")
    for record in duplicates:
        click.echo(f"exists  {record.tier.tier_code}: tier {record.id} (unchanged)")
