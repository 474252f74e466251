"""The `ledger` command line: broker, worker, projector, the local stack, demo and reports."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from ledger.settings import Settings

API_START_TIMEOUT_S = 60.0


def _settings() -> Settings:
    return Settings.from_env()


def _local_broker(settings: Settings):  # type: ignore[no-untyped-def]
    from streams.kafka_local import LocalBroker

    return LocalBroker(settings.home / "kafka")


@click.group()
def cli() -> None:
    """usage-ledger: priced LLM usage, gate events and spend history per end user."""


# -- broker -------------------------------------------------------------------


@cli.group()
def broker() -> None:
    """The local single-node Kafka broker (unused when KAFKA_BOOTSTRAP_SERVERS is set)."""


@broker.command("fetch")
def broker_fetch() -> None:
    """Download the broker jars from Maven Central into the cache."""
    _local_broker(_settings()).fetch()


@broker.command("start")
def broker_start() -> None:
    """Start the broker and wait until it accepts connections."""
    settings = _settings()
    if settings.external_bootstrap:
        click.echo(f"using the existing cluster at {settings.external_bootstrap}; nothing started")
        return
    local = _local_broker(settings)
    local.start()
    click.echo(f"broker ready at {local.bootstrap} (log: {local.log_file})")


@broker.command("stop")
def broker_stop() -> None:
    _local_broker(_settings()).stop()


@broker.command("status")
def broker_status() -> None:
    """Exit 0 when the broker answers, 1 otherwise."""
    from streams.kafka_local import BrokerError, wait_until_ready

    settings = _settings()
    try:
        wait_until_ready(settings.bootstrap, timeout_s=3)
    except BrokerError as exc:
        click.echo(str(exc))
        sys.exit(1)
    click.echo(f"broker answers at {settings.bootstrap}")


# -- processes ------------------------------------------------------------------


METRICS_PORT_OPTION = click.option(
    "--metrics-port", type=click.IntRange(0, 65535), default=None,
    help="Serve /metrics, /healthz and /readyz on this port (0: none). Default: LEDGER_METRICS_PORT.")


def _with_metrics_port(settings: Settings, port: int | None) -> Settings:
    return settings if port is None else dataclasses.replace(settings, metrics_port=port)


@cli.command()
@click.option("--worker-id", default="0", help="Distinguishes workers on one machine (their data dirs).")
@click.option("--loglevel", default="info", type=click.Choice(["crit", "error", "warn", "info", "debug"]))
@METRICS_PORT_OPTION
def worker(worker_id: str, loglevel: str, metrics_port: int | None) -> None:
    """Run a ledger processor worker in the foreground."""
    from streams.app import run_worker

    run_worker(_with_metrics_port(_settings(), metrics_port), worker_id, loglevel)


@cli.command()
@METRICS_PORT_OPTION
def projector(metrics_port: int | None) -> None:
    """Run the DuckDB projector in the foreground."""
    from projections.projector import run_projector

    run_projector(_with_metrics_port(_settings(), metrics_port))


@cli.command()
@METRICS_PORT_OPTION
def webhooks(metrics_port: int | None) -> None:
    """Deliver gate events to the tenants' webhooks in the foreground (signed, retried, logged)."""
    from streams.webhooks import run_webhooks

    run_webhooks(_with_metrics_port(_settings(), metrics_port))


@cli.command()
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 16))
def up(workers: int) -> None:
    """Start the local stack in the background: broker, worker(s), projector, webhook delivery, API."""
    from ledger.cli import stack
    from streams.topics import ensure_topics

    settings = _settings()
    if not settings.external_bootstrap:
        _local_broker(settings).start()
    asyncio.run(ensure_topics(settings))
    for i in range(workers):
        stack.start(settings, f"worker-{i}", ["worker", "--worker-id", str(i),
                                              "--metrics-port", str(stack.worker_metrics_port(settings, i))])
    stack.start(settings, "projector", ["projector", "--metrics-port", str(stack.projector_metrics_port(settings))])
    stack.start(settings, "webhooks", ["webhooks", "--metrics-port", str(stack.webhooks_metrics_port(settings))])
    stack.start(settings, "api", ["api", "--port", str(settings.api_port)])
    stack.wait_for_http(f"{settings.api_url}/docs", API_START_TIMEOUT_S)
    click.echo(f"API ready at {settings.api_url} (OpenAPI at {settings.api_url}/docs)")
    for name, pid in stack.running(settings).items():
        click.echo(f"{name:<12} pid {pid}  log {settings.logs_dir / (name + '.log')}")
    click.echo(f"metrics: api {settings.api_url}/metrics, projector :{stack.projector_metrics_port(settings)}/metrics, "
               f"webhooks :{stack.webhooks_metrics_port(settings)}/metrics, "
               f"workers :{stack.worker_metrics_port(settings, 0)}.. (one port each)")


@cli.command()
@click.option("--keep-broker", is_flag=True, help="Leave the local broker running.")
def down(keep_broker: bool) -> None:
    """Stop the local stack."""
    from ledger.cli import stack

    settings = _settings()
    for name in stack.running(settings):
        stack.stop(settings, name)
        click.echo(f"stopped {name}")
    if not keep_broker and not settings.external_bootstrap:
        _local_broker(settings).stop()
        click.echo("stopped broker")


@cli.command()
def status() -> None:
    """Which parts of the local stack run, and how far behind they are."""
    from ledger.cli import stack
    from ledger.cli.where import reading_line
    from streams.progress import processor_lag, projector_lag

    settings = _settings()
    click.echo(f"{reading_line(settings)}; broker {settings.bootstrap}")
    for name, pid in stack.running(settings).items():
        click.echo(f"{name:<12} pid {pid}")
    # The processor commits its durable position (stored with its state), so this is what a restart re-reads.
    click.echo(f"processor lag: {asyncio.run(processor_lag(settings))} records past the durable position")
    click.echo(f"projector lag: {asyncio.run(projector_lag(settings, settings.history_path))} records")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=None, type=int, help="Default: LEDGER_API_PORT (18000).")
def api(host: str, port: int | None) -> None:
    """Run the HTTP API (OpenAPI at /docs) in the foreground."""
    import uvicorn

    from ledger.api.app import create_api

    settings = _settings()
    uvicorn.run(create_api(settings, freeze_heap=True), host=host, port=port or settings.api_port, log_level="info",
                access_log=False)


@cli.group()
def tenants() -> None:
    """Tenants of the control plane and their API keys."""


@tenants.command("create")
@click.argument("name")
@click.option("--test", "test_key", is_flag=True, help="Issue a pg_test_ key instead of pg_live_.")
def tenants_create(name: str, test_key: bool) -> None:
    """Create a tenant and print its first key (all scopes). The key is shown once."""
    from ledger.control.store import Conflict, ControlStore

    store = ControlStore(_settings().control_url)
    store.create_schema()
    try:
        with store.session() as session:
            tenant_id, key = session.create_tenant(name, live=not test_key)
    except Conflict as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"tenant {name}: {tenant_id}")
    click.echo(f"key (shown once; store it now): {key}")


@tenants.command("key")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True, type=click.Choice(["admin", "ingest", "read"]))
def tenants_key(name: str, scopes: tuple[str, ...]) -> None:
    """Issue another key for tenant NAME with the given scopes."""
    from ledger.control.keys import Scope
    from ledger.control.store import ControlStore

    store = ControlStore(_settings().control_url)
    with store.session() as session:
        tenant_id = session.tenant_id(name)
        if tenant_id is None:
            raise click.ClickException(f"no tenant {name!r}")
        click.echo(session.create_key(tenant_id, frozenset(Scope(s) for s in scopes)))


@tenants.command("revoke")
@click.argument("name")
@click.option("--key", prompt=True, hide_input=True, help="The key to revoke (prompted, so it stays out of shell history).")
def tenants_revoke(name: str, key: str) -> None:
    from ledger.control.store import ControlStore

    store = ControlStore(_settings().control_url)
    with store.session() as session:
        tenant_id = session.tenant_id(name)
        if tenant_id is None or not session.revoke_key(tenant_id, key):
            raise click.ClickException("no such active key for that tenant")
    click.echo("revoked")


@tenants.command("rate")
@click.argument("name")
@click.option("--per-s", "per_s", type=click.IntRange(1), help="Requests per second per key (default: the settings').")
@click.option("--burst", type=click.IntRange(1), help="Requests a key may make at once (default: the settings').")
def tenants_rate(name: str, per_s: int | None, burst: int | None) -> None:
    """Set tenant NAME's request rate per API key; without options, back to the defaults."""
    from ledger.control.store import ControlStore

    store = ControlStore(_settings().control_url)
    store.create_schema()
    with store.session() as session:
        tenant_id = session.tenant_id(name)
        if tenant_id is None:
            raise click.ClickException(f"no tenant {name!r}")
        try:
            session.set_rate(tenant_id, per_s, burst)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"{name}: {per_s or 'default'} requests/s per key, bursts of {burst or 'default'}")


# -- data -------------------------------------------------------------------------


@cli.group()
def plans() -> None:
    """Plans from a file in the plans guide's format."""


@plans.command("publish")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tenant", required=True)
def plans_publish(file: Path, tenant: str) -> None:
    """Publish version 1 of every plan in FILE to the usage log (idempotent)."""
    from ledger.events import PlanPublished
    from ledger.plans import PlanError, parse_plans_config, plans_from_config
    from streams.publisher import UsagePublisher

    try:
        loaded = plans_from_config(parse_plans_config(file.read_bytes()), tenant)
    except PlanError as exc:
        raise click.ClickException(str(exc)) from None
    now = datetime.now(UTC)
    commands = [PlanPublished(event_id=f"plan-{p.plan_id}-v{p.version}", tenant=tenant, occurred_at=now, plan=p)
                for p in loaded]

    async def go() -> None:
        async with UsagePublisher(_settings()) as publisher:
            await publisher.publish(commands)

    asyncio.run(go())
    for p in loaded:
        click.echo(f"{p.name}: {p.plan_id} v{p.version}")


@cli.command()
@click.argument("user")
@click.argument("plan_id")
@click.option("--tenant", required=True)
@click.option("--start", type=click.DateTime(), help="Subscription start (UTC); defaults to now.")
def assign(user: str, plan_id: str, tenant: str, start: datetime | None) -> None:
    """Put USER on the plan PLAN_ID (a command in the user's partition of the log)."""
    import uuid

    from ledger.events import PlanAssigned
    from streams.publisher import UsagePublisher

    now = datetime.now(UTC)
    period_start = start.replace(tzinfo=UTC) if start else now
    command = PlanAssigned(event_id=str(uuid.uuid4()), tenant=tenant, user=user, plan_id=plan_id,
                           period_start=period_start, occurred_at=now)

    async def go() -> None:
        async with UsagePublisher(_settings()) as publisher:
            await publisher.publish([command])

    asyncio.run(go())


def format_report(con, tenant: str, label: str | None = None) -> str:  # type: ignore[no-untyped-def]
    from ledger.money import format_usd
    from projections.reports import rejections_by_code, render_table, user_spend

    rows = [[r.user, r.plan, str(r.calls), f"{r.input_tokens + r.output_tokens:,}", format_usd(r.spend),
             r.soft_warnings or "-", r.hard_blocks or "-"] for r in user_spend(con, tenant)]
    out = [f"Spend per user, tenant {label or tenant!r}", "",
           render_table(["user", "plan", "calls", "tokens", "spend", "soft warnings", "hard blocks"], rows)]
    rejected = rejections_by_code(con, tenant)
    if rejected:
        out += ["", "Dead-lettered events", "",
                render_table(["code", "count", "example reason"], [[c, str(n), r] for c, n, r in rejected])]
    return "\n".join(out)


@cli.command()
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for processing.")
def demo(timeout: float) -> None:
    """Configure plans and users through the API, publish usage, wait until processed, print the report."""
    from ledger.cli.demo import DEMO_TENANT, DemoApi, bad_records, demo_start, demo_usage
    from projections.projector import connect
    from streams.progress import wait_caught_up
    from streams.publisher import UsagePublisher

    settings = _settings()
    start = demo_start(datetime.now(UTC))
    tenant_id, key = _demo_tenant(settings, DEMO_TENANT)
    plan_ids = DemoApi(settings.api_url, key).configure(start)
    click.echo(f"tenant {DEMO_TENANT!r} ({tenant_id}); plans via the API: "
               + ", ".join(f"{name} {pid}" for name, pid in sorted(plan_ids.items())))
    usage = demo_usage(tenant_id, start)

    async def go() -> None:
        async with UsagePublisher(settings) as publisher:
            await publisher.publish(usage)
            for record_key, value in bad_records(tenant_id, start):
                await publisher.publish_raw(record_key, value)
        await wait_caught_up(settings, settings.history_path, timeout)

    asyncio.run(go())
    click.echo(f"published {len(usage) + 2} usage events (a partition's share envelopes, two are malformed); "
               f"processed and projected into {settings.history_path}\n")
    with connect(settings.history_path, read_only=True) as con:
        click.echo(format_report(con, tenant_id, DEMO_TENANT))
    read_key = _demo_read_key(settings, tenant_id)
    click.echo(f"\nconsole: {settings.api_url}/console (the demo's users, their gates and charts)")
    click.echo(f"read key (sign in with it; also in {settings.home / DEMO_READ_KEY_FILE}): {read_key}")
    click.echo(f"admin key (to edit plans and see webhooks): in {settings.home / 'demo.key'}")


DEMO_READ_KEY_FILE = "demo-read.key"


def _demo_read_key(settings: Settings, tenant_id: str) -> str:
    """A read-scope key of the demo tenant for the console, kept in <home>/demo-read.key (mode 600) between runs."""
    from ledger.control.keys import Scope
    from ledger.control.store import ControlStore

    key_file = settings.home / DEMO_READ_KEY_FILE
    store = ControlStore(settings.control_url)
    try:
        with store.session() as session:
            if key_file.exists():
                kept = key_file.read_text().strip()
                found = session.authenticate(kept)
                if found is not None and found.tenant_id == tenant_id:
                    return kept
            key = session.create_key(tenant_id, frozenset({Scope.read}), label="demo console")
    finally:
        store.dispose()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(key)
    return key


def _demo_tenant(settings: Settings, name: str) -> tuple[str, str]:
    """The demo tenant and an admin key, kept in <home>/demo.key (mode 600) between runs."""
    from ledger.control.keys import ALL_SCOPES
    from ledger.control.store import ControlStore

    key_file = settings.home / "demo.key"
    store = ControlStore(settings.control_url)
    store.create_schema()
    with store.session() as session:
        if key_file.exists():
            found = session.authenticate(key_file.read_text().strip())
            if found is not None:
                return found.tenant_id, key_file.read_text().strip()
        tenant_id = session.tenant_id(name)
        if tenant_id is None:
            tenant_id, key = session.create_tenant(name)
        else:
            key = session.create_key(tenant_id, ALL_SCOPES, label="demo")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(key)
    return tenant_id, key


from ledger.cli.history import projections, report, simulate  # noqa: E402
from ledger.cli.tiers import tiers  # noqa: E402

for command in (tiers, report, projections, simulate):
    cli.add_command(command)

if __name__ == "__main__":
    cli()
