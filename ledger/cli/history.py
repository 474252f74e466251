"""`ledger report`, `ledger projections rebuild` and `ledger simulate`: the history in DuckDB, for people and files.

Every report is scoped to one tenant (a name from the control plane, or an id) and prints a readable table,
or CSV / JSON / Parquet with ``--format`` (and ``--output FILE``). Charts are PNG files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from ledger.settings import Settings


class Instant(click.ParamType):
    """A date or an ISO 8601 time; without a zone it is UTC."""

    name = "time"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"{value!r} is not a date (2026-11-01) or an ISO time (2026-11-01T10:00:00Z)", param, ctx)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


INSTANT = Instant()


def _settings() -> Settings:
    return Settings.from_env()


def _tenant_id(settings: Settings, tenant: str) -> str:
    """A tenant's id from its name in the control plane; anything else is taken as an id."""
    from ledger.control.store import ControlStore

    store = ControlStore(settings.control_url)
    try:
        store.create_schema()
        with store.session() as session:
            return session.tenant_id(tenant) or tenant
    finally:
        store.dispose()


@contextmanager
def _history(settings: Settings) -> Iterator[Any]:
    from ledger.cli.where import reading_line
    from projections.reports import open_history

    # On standard error, so a CSV or JSON report on standard output stays clean.
    click.echo(f"{reading_line(settings)}; history {settings.history_path}", err=True)
    if not settings.history_path.exists():
        raise click.ClickException(f"no history file at {settings.history_path}: run the projector "
                                   "(`ledger up` or `ledger projector`) or `ledger projections rebuild`")
    con = open_history(settings.history_path)
    try:
        yield con
    finally:
        con.close()


def _common(command: Callable[..., Any]) -> Callable[..., Any]:
    """--tenant, --from, --to, --format and --output, shared by every report."""
    options = [
        click.option("--tenant", default="demo", show_default=True, help="A tenant's name or id."),
        click.option("--from", "start", type=INSTANT, default=None, help="Start of the range (inclusive); default: all."),
        click.option("--to", "end", type=INSTANT, default=None, help="End of the range (exclusive); default: all."),
        click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table",
                     show_default=True),
        click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Write to FILE instead of standard output (required for parquet)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _emit(report: Any, fmt: str, output: Path | None) -> None:
    from projections.export import write

    try:
        text = write(report, fmt, output)  # type: ignore[arg-type]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if text is not None:
        click.echo(text)
    else:
        click.echo(f"wrote {len(report.rows)} rows to {output}", err=True)


def _range(start: datetime | None, end: datetime | None) -> dict[str, datetime]:
    from projections.reports import span

    return span(start, end)


# -- ledger report ----------------------------------------------------------------------------------------------------


@click.group(invoke_without_command=True)
@click.option("--tenant", default="demo", show_default=True, help="A tenant's name or id (for the summary).")
@click.pass_context
def report(ctx: click.Context, tenant: str) -> None:
    """Reports from the history file; without a subcommand, per-user spend and gate events."""
    if ctx.invoked_subcommand is not None:
        return
    from ledger.money import format_usd
    from projections.reports import rejections_by_code, render_table, user_spend

    settings = _settings()
    tenant_id = _tenant_id(settings, tenant)
    with _history(settings) as con:
        rows = [[r.user, r.plan, str(r.calls), f"{r.input_tokens + r.output_tokens:,}", format_usd(r.spend),
                 r.soft_warnings or "-", r.hard_blocks or "-"] for r in user_spend(con, tenant_id)]
        click.echo(f"Spend per user, tenant {tenant!r}\n")
        click.echo(render_table(["user", "plan", "calls", "tokens", "spend", "soft warnings", "hard blocks"], rows))
        rejected = rejections_by_code(con, tenant_id)
    if rejected:
        click.echo("\nDead-lettered events\n")
        click.echo(render_table(["code", "count", "example reason"], [[c, str(n), r] for c, n, r in rejected]))


@report.command("history")
@click.argument("user")
@_common
@click.option("--by", type=click.Choice(["day", "model", "session", "plan_version"]), default="day", show_default=True)
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--after", default=None, help="The cursor a previous page printed: the page after it.")
def history_command(user: str, tenant: str, start: datetime | None, end: datetime | None, fmt: str,
                    output: Path | None, by: str, limit: int, after: str | None) -> None:
    """USER's spend over a range, grouped by day, model, session or plan version (paginated)."""
    from projections.reports import user_history

    settings = _settings()
    with _history(settings) as con:
        try:
            page = user_history(con, _tenant_id(settings, tenant), user, by=by, limit=limit,  # type: ignore[arg-type]
                                after=after, **_range(start, end))
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        _emit(page, fmt, output)


@report.command("daily")
@_common
def daily_command(tenant: str, start: datetime | None, end: datetime | None, fmt: str, output: Path | None) -> None:
    """The tenant's spend by day (UTC) and model."""
    from projections.reports import spend_by_day_and_model

    settings = _settings()
    with _history(settings) as con:
        _emit(spend_by_day_and_model(con, _tenant_id(settings, tenant), **_range(start, end)), fmt, output)


@report.command("top")
@_common
@click.option("--limit", type=click.IntRange(1, 1000), default=10, show_default=True)
def top_command(tenant: str, start: datetime | None, end: datetime | None, fmt: str, output: Path | None,
                limit: int) -> None:
    """The users who spent the most."""
    from projections.reports import top_users

    settings = _settings()
    with _history(settings) as con:
        _emit(top_users(con, _tenant_id(settings, tenant), limit=limit, **_range(start, end)), fmt, output)


@report.command("gates")
@_common
def gates_command(tenant: str, start: datetime | None, end: datetime | None, fmt: str, output: Path | None) -> None:
    """Gate events by kind, dimension and model."""
    from projections.reports import gates_by_kind

    settings = _settings()
    with _history(settings) as con:
        _emit(gates_by_kind(con, _tenant_id(settings, tenant), **_range(start, end)), fmt, output)


@report.command("limits")
@_common
def limits_command(tenant: str, start: datetime | None, end: datetime | None, fmt: str, output: Path | None) -> None:
    """Per plan: how many users reached their soft and their hard limits."""
    from projections.reports import limits_reached

    settings = _settings()
    with _history(settings) as con:
        _emit(limits_reached(con, _tenant_id(settings, tenant), **_range(start, end)), fmt, output)


@report.command("margins")
@_common
@click.option("--tiers", "tiers_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A tiers YAML file; default: the tenant's tiers in the control plane.")
def margins_command(tenant: str, start: datetime | None, end: datetime | None, fmt: str, output: Path | None,
                    tiers_file: Path | None) -> None:
    """Per tier: planned margin (price - budget x markup) next to realised (price - actual cost x markup)."""
    from projections.reports import tier_margins

    settings = _settings()
    tenant_id = _tenant_id(settings, tenant)
    tiers = _load_tiers(settings, tenant_id, tiers_file)
    with _history(settings) as con:
        _emit(tier_margins(con, tenant_id, tiers, **_range(start, end)), fmt, output)


@report.command("utilisation")
@_common
@click.option("--plans", "plans_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A plans-guide JSON file; default: the tenant's plans and tiers in the control plane.")
def utilisation_command(tenant: str, start: datetime | None, end: datetime | None, fmt: str, output: Path | None,
                        plans_file: Path | None) -> None:
    """Spend per user and period as a share of the plan's period limit."""
    from projections.reports import utilisation

    settings = _settings()
    tenant_id = _tenant_id(settings, tenant)
    limits = _load_limits(settings, tenant_id, plans_file)
    with _history(settings) as con:
        _emit(utilisation(con, tenant_id, limits, **_range(start, end)), fmt, output)


@report.command("chart")
@click.argument("kind", type=click.Choice(["spend", "utilisation"]))
@click.option("--tenant", default="demo", show_default=True, help="A tenant's name or id.")
@click.option("--from", "start", type=INSTANT, default=None)
@click.option("--to", "end", type=INSTANT, default=None)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The PNG file.")
@click.option("--plans", "plans_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="For utilisation: a plans-guide JSON file (default: the control plane's plans and tiers).")
def chart_command(kind: str, tenant: str, start: datetime | None, end: datetime | None, output: Path,
                  plans_file: Path | None) -> None:
    """A PNG chart: spend over time per model, or limit utilisation per plan/tier as a histogram."""
    from projections.charts import spend_over_time, utilisation_histogram

    settings = _settings()
    tenant_id = _tenant_id(settings, tenant)
    with _history(settings) as con:
        label = tenant if tenant != tenant_id else None  # the tenant's name when one was given
        if kind == "spend":
            spend_over_time(con, tenant_id, output, label=label, **_range(start, end))
        else:
            utilisation_histogram(con, tenant_id, _load_limits(settings, tenant_id, plans_file), output,
                                  label=label, **_range(start, end))
    click.echo(f"wrote {output}")


def _load_tiers(settings: Settings, tenant_id: str, tiers_file: Path | None) -> list[Any]:
    from ledger.tiers import TierError, parse_tiers_yaml

    if tiers_file is not None:
        try:
            return parse_tiers_yaml(tiers_file.read_text(encoding="utf-8"))
        except TierError as exc:
            raise click.ClickException(f"{tiers_file}: {exc}") from None
    from ledger.control.store import ControlStore

    store = ControlStore(settings.control_url)
    try:
        store.create_schema()
        with store.session() as session:
            return [tier for _id, _plan, tier in session.tiers(tenant_id)]
    finally:
        store.dispose()


def _load_limits(settings: Settings, tenant_id: str, plans_file: Path | None) -> dict[str, Decimal]:
    from ledger.plans import PlanError, parse_plans_config, plans_from_config
    from projections.reports import plan_limits, tier_limits

    if plans_file is not None:
        try:
            return plan_limits(plans_from_config(parse_plans_config(plans_file.read_bytes()), tenant_id))
        except PlanError as exc:
            raise click.ClickException(f"{plans_file}: {exc}") from None
    from ledger.control.store import ControlStore

    store = ControlStore(settings.control_url)
    try:
        store.create_schema()
        with store.session() as session:
            limits = plan_limits(session.plans(tenant_id))
            limits.update(tier_limits(tier for _id, _plan, tier in session.tiers(tenant_id)))
    finally:
        store.dispose()
    return limits


# -- ledger projections rebuild -------------------------------------------------------------------------------------


@click.group()
def projections() -> None:
    """The DuckDB history file."""


@projections.command("rebuild")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def rebuild_command(quiet: bool) -> None:
    """Replay entries, gate events and dead letters from offset 0 into a fresh file, then swap it in."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from projections.rebuild import rebuild

    settings = _settings()
    columns = (TextColumn("rebuilding {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=quiet, transient=False) as bar:
        task = bar.add_task(settings.history_path.name, total=None)
        result = rebuild(settings, progress=lambda done, total: bar.update(task, completed=done, total=total))
    rate = result.records / result.seconds if result.seconds else 0.0
    click.echo(f"rebuilt {result.path}: {result.entries:,} entries, {result.gates:,} gate events, "
               f"{result.rejections:,} dead letters from {result.records:,} records in {result.seconds:.1f} s "
               f"({rate:,.0f} records/s)")


# -- ledger simulate -------------------------------------------------------------------------------------------------


@click.command()
@click.option("--plans", "plans_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The proposed plans, in the plans guide's JSON format; plans match recorded ones by name.")
@click.option("--tenant", default="demo", show_default=True, help="A tenant's name or id.")
@click.option("--from", "start", type=INSTANT, required=True, help="Simulate the billing periods that start from here...")
@click.option("--to", "end", type=INSTANT, required=True, help="...to here (exclusive).")
@click.option("--tiers", "tiers_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A tiers YAML file for revenue and profit per tier (default: the control plane's tiers).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def simulate(plans_file: Path, tenant: str, start: datetime, end: datetime, tiers_file: Path | None, fmt: str,
             output: Path | None, quiet: bool) -> None:
    """What if these plans had applied? Re-price recorded usage with the processor's own core, side by side."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ledger.plans import PlanError, parse_plans_config
    from projections.reports import Report
    from projections.simulate import WhatIf
    from projections.simulate import simulate as run

    try:
        config = parse_plans_config(plans_file.read_bytes())
    except PlanError as exc:
        raise click.ClickException(f"{plans_file}: {exc}") from None
    settings = _settings()
    tenant_id = _tenant_id(settings, tenant)
    tiers = _load_tiers(settings, tenant_id, tiers_file)
    with _history(settings) as con, Progress(TextColumn("simulating users"), BarColumn(), MofNCompleteColumn(),
                                             disable=quiet) as bar:
        task = bar.add_task("users", total=None)
        result = run(con, tenant_id, config, start=start, end=end, tiers=tiers,
                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    _emit(Report(f"What if {plans_file.name} had applied to the periods starting [{start.isoformat()}, {end.isoformat()})",
                 WhatIf.COLUMNS, result.rows()), fmt, output)
    if result.entries_with_tools:
        click.echo(f"note: {result.entries_with_tools} entries had tool calls; the history keeps their count, not the "
                   "tools, so tool costs are not re-priced", err=True)
    if result.users_not_simulated:
        click.echo(f"note: {len(result.users_not_simulated)} users are on plans the proposal does not name; "
                   "they are not simulated", err=True)
