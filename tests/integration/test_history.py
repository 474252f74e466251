"""History, reports, margins, charts and the what-if simulator on the real broker and a real DuckDB file.

One workload goes through the worker and the projector once per module: tenant ``acme`` on the plans guide's
plans, tenant ``studio`` on the tiers guide's tiers. Every figure is checked against an independent
computation here (Fractions from the source files, or the topics themselves), never against the SQL under test.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image, ImageStat

from ledger.catalog import load_catalog
from ledger.events import UsageRecorded
from ledger.plans import parse_plans_config, plan_id_for
from ledger.tiers import parse_tiers_yaml, tier_to_plan
from projections.projector import Projector
from projections.reports import (
    gates_by_kind,
    limits_reached,
    open_history,
    plan_limits,
    spend_by_day_and_model,
    tier_margins,
    top_users,
    user_history,
    utilisation,
)
from projections.simulate import simulate
from streams.topics import ensure_topics
from tests.conftest import ROOT, WorkerProcess, new_settings, wait_processed
from tests.factories import SEED_PLANS_JSON, T0, assigned, published, seed_plans
from tests.kafka_io import entries, gates, publish

pytestmark = pytest.mark.integration

ACME, STUDIO = "acme", "studio"
DEC = datetime(2026, 12, 1, tzinfo=UTC)
RANGE = {"start": T0, "end": datetime(2027, 1, 1, tzinfo=UTC)}
TIERS_YAML = (ROOT / "examples" / "tiers.yaml").read_text()
PRICES = json.loads((ROOT / "ledger" / "data" / "provider_prices.json").read_text())["models"]
PATCHED = {"gpt-4o": 75_000, "gpt-4o-mini": 300_000}  # the plans guide's PATCH example


@dataclass(frozen=True)
class Call:
    tenant: str
    user: str
    plan: str
    model: str
    input_tokens: int
    output_tokens: int
    at: datetime
    event_id: str


def _workload(seed: int = 5) -> list[Call]:
    rng = random.Random(seed)
    calls: list[Call] = []

    def add(tenant: str, user: str, plan: str, model: str, inp: int, out: int, at: datetime) -> None:
        calls.append(Call(tenant, user, plan, model, inp, out, at, f"{user}-{len(calls)}"))

    for i in range(10):  # free: 2,000 tokens a call; soft at 8,000, hard at 10,000
        for month in (T0, DEC):
            for n in range(rng.randint(2, 7) if month == T0 else rng.randint(1, 3)):
                add(ACME, f"f{i}", "free", "gpt-4o-mini", 1000, 1000, month + timedelta(days=i % 4, hours=i, minutes=n))
    for i in range(20):  # pro: gpt-4o in 10,000-token calls, gpt-4o-mini in 25,000-token calls
        for month in (T0, DEC):
            big = rng.choice([3, 5, 6, 7, 8]) if month == T0 else rng.choice([1, 6])
            mini = rng.choice([0, 4, 8, 11, 12]) if month == T0 else rng.choice([0, 9])
            models = ["gpt-4o"] * big + ["gpt-4o-mini"] * mini
            rng.shuffle(models)
            for n, model in enumerate(models):
                tokens = 10_000 if model == "gpt-4o" else 25_000
                add(ACME, f"p{i}", "pro", model, tokens // 2, tokens // 2, month + timedelta(days=i % 6, hours=i, minutes=n))
    tiers = [t.tier_code for t in parse_tiers_yaml(TIERS_YAML)]
    for i in range(15):
        tier = tiers[i % len(tiers)]
        models = ["claude-sonnet-4-5", "claude-opus-4-5"] if tier == "business" else ["claude-sonnet-4-5"]
        for month in (T0, DEC):
            for n in range(rng.randint(1, 8)):
                add(STUDIO, f"s{i}", tier, rng.choice(models), rng.randint(0, 300_000), rng.randint(0, 150_000),
                    month + timedelta(hours=i, minutes=2 * n))
    return calls


def _studio_plans():  # type: ignore[no-untyped-def]
    catalog = load_catalog()
    return {t.tier_code: tier_to_plan(t, plan_id=plan_id_for(STUDIO, t.tier_code), version=1, catalog=catalog)
            for t in parse_tiers_yaml(TIERS_YAML)}


@dataclass
class World:
    settings: object
    calls: list[Call]
    history: Path


@pytest.fixture(scope="module")
def world(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> World:
    settings = new_settings(bootstrap, tmp_path_factory.mktemp("history"))
    asyncio.run(ensure_topics(settings))
    calls = _workload()
    acme, studio = seed_plans(ACME), _studio_plans()
    setup: list = [published(p, ACME) for p in acme.values()] + [published(p, STUDIO) for p in studio.values()]
    users = {(c.tenant, c.user): c.plan for c in calls}
    setup += [assigned(user, (acme if tenant == ACME else studio)[plan], tenant=tenant)
              for (tenant, user), plan in users.items()]
    publish(settings, setup)
    publish(settings, [UsageRecorded(event_id=c.event_id, tenant=c.tenant, user=c.user, model=c.model,
                                     input_tokens=c.input_tokens, output_tokens=c.output_tokens, session_id="s",
                                     occurred_at=c.at) for c in calls])
    worker = WorkerProcess(settings).start()
    try:
        wait_processed(settings, worker)
    finally:
        worker.stop()
    asyncio.run(Projector(settings).run(until_caught_up=True))
    return World(settings, calls, settings.history_path)


@pytest.fixture
def con(world: World):  # type: ignore[no-untyped-def]
    connection = open_history(world.history)
    yield connection
    connection.close()


# -- an independent oracle -------------------------------------------------------------------------------------------

_ACME_RATES = {p["name"]: p["cost_rates"] for p in json.loads(SEED_PLANS_JSON, parse_float=Fraction)["plans"]}


def oracle_cost(call: Call) -> Fraction:
    """Cost of a call from the source files alone: plans guide rates for acme, provider prices x 1.045 for studio."""
    if call.tenant == ACME:
        rate = {k: Fraction(v) for k, v in _ACME_RATES[call.plan][call.model].items()}
        markup = Fraction(1)
    else:
        rate = {k: Fraction(v) for k, v in PRICES[call.model].items()}
        markup = Fraction("1.045")
    exact = (call.input_tokens * rate["input"] + call.output_tokens * rate["output"]) / 1000 * markup
    return Fraction(round(exact * 10**12), 10**12)


def dec(value: Fraction) -> Decimal:
    return Decimal(value.numerator) / Decimal(value.denominator)


def period(at: datetime) -> datetime:
    return T0 if at < DEC else DEC


def hard_blocks_oracle(calls: list[Call], limits: dict[str, int]) -> dict[tuple[str, datetime, str], bool]:
    """Per (pro user, period, model): did its tokens reach the limit? (spend caps are checked unreached)."""
    tokens: dict[tuple[str, datetime, str], int] = defaultdict(int)
    spend: dict[tuple[str, datetime], Fraction] = defaultdict(Fraction)
    for c in calls:
        if c.tenant == ACME and c.plan == "pro":
            tokens[(c.user, period(c.at), c.model)] += c.input_tokens + c.output_tokens
            spend[(c.user, period(c.at))] += oracle_cost(c)
    assert max(spend.values()) < 5 * Fraction(8, 10)  # below the session cap's soft gate: only token gates fire
    return {key: used >= limits[key[2]] for key, used in tokens.items()}


# -- reports ---------------------------------------------------------------------------------------------------------


def test_spend_by_day_and_model_matches_the_oracle_to_the_last_unit(world, con):
    expected: dict[tuple[object, str], list] = defaultdict(lambda: [0, Fraction(0)])
    for c in world.calls:
        if c.tenant == ACME:
            row = expected[(c.at.date(), c.model)]
            row[0] += 1
            row[1] += oracle_cost(c)
    got = {(r["day"], r["model"]): [r["calls"], r["spend"]] for r in spend_by_day_and_model(con, ACME, **RANGE).dicts()}
    assert got == {k: [n, dec(s)] for k, (n, s) in expected.items()}
    assert len(got) > 10


def test_a_users_history_pages_add_up_and_agree_with_the_live_running_total(world, con):
    user = "p3"
    nov = {"start": T0, "end": DEC}
    page_counts = []
    for by in ("day", "model", "session", "plan_version"):
        full = user_history(con, ACME, user, by=by, limit=10_000, **nov)
        pages, cursor = [], None
        while True:
            page = user_history(con, ACME, user, by=by, limit=1, after=cursor, **nov)
            pages += page.rows
            if (cursor := page.next_cursor) is None:
                break
        assert pages == full.rows and full.next_cursor is None, by
        page_counts.append(len(pages))
    assert max(page_counts) > 1  # some grouping really was paged
    day_cursor = user_history(con, ACME, user, by="day", limit=1, start=T0, end=DEC + timedelta(days=31)).next_cursor
    assert day_cursor is not None  # November's day, with December's on the next page
    for bad in (day_cursor, "bm90IGpzb24", "W10"):  # another grouping's cursor, not JSON, an empty list
        with pytest.raises(ValueError, match="not a cursor"):
            user_history(con, ACME, user, by="model", after=bad, **nov)
        assert sum(r[full.columns.index("spend")] for r in full.rows) == dec(
            sum(oracle_cost(c) for c in world.calls if c.user == user and c.at < DEC))
    # The live total after the user's last November entry is the processor's, read from the entries topic.
    live = max((e for e in entries(world.settings) if e.user == user and e.period_start == T0), key=lambda e: e.seq)
    by_model = user_history(con, ACME, user, by="model", **nov)
    assert sum(r[by_model.columns.index("spend")] for r in by_model.rows) == live.period_spend


def test_top_users_gate_counts_and_limits_reached_match_the_topics(world, con):
    spend: dict[str, Fraction] = defaultdict(Fraction)
    for c in world.calls:
        if c.tenant == ACME:
            spend[c.user] += oracle_cost(c)
    top = top_users(con, ACME, limit=5, **RANGE)
    assert [(r["user"], r["spend"]) for r in top.dicts()] == [
        (u, dec(s)) for u, s in sorted(spend.items(), key=lambda kv: (-kv[1], kv[0]))[:5]]

    raised = [g for g in gates(world.settings) if g.tenant == ACME]
    by_kind: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for g in raised:
        by_kind[(g.kind, g.dimension, g.model or "")].add(g.user)
        counts[(g.kind, g.dimension, g.model or "")] += 1
    got = {(r["kind"], r["dimension"], r["model"]): (r["events"], r["users"]) for r in gates_by_kind(con, ACME, **RANGE).dicts()}
    assert got == {k: (counts[k], len(users)) for k, users in by_kind.items()}

    plan_of = {c.user: c.plan for c in world.calls if c.tenant == ACME}
    reached = {r["plan"]: r for r in limits_reached(con, ACME, **RANGE).dicts()}
    for plan in ("free", "pro"):
        users = {u for u, p in plan_of.items() if p == plan}
        assert reached[plan]["users"] == len(users)
        assert reached[plan]["soft_users"] == len({g.user for g in raised if g.user in users and g.kind == "soft_warning"})
        assert reached[plan]["hard_users"] == len({g.user for g in raised if g.user in users and g.kind == "hard_block"})
        assert 0 < reached[plan]["hard_users"] <= len(users)
    assert reached["free"]["hard_users"] < len({u for u, p in plan_of.items() if p == "free"})


def test_realised_margins_of_the_tiers_guides_tiers_match_an_independent_computation(con, world):
    tiers_raw = [d for d in yaml.safe_load_all(TIERS_YAML) if d]
    cost: dict[str, Fraction] = defaultdict(Fraction)
    periods: dict[str, set[tuple[str, datetime]]] = defaultdict(set)
    for c in world.calls:
        if c.tenant == STUDIO:
            cost[c.plan] += oracle_cost(c)
            periods[c.plan].add((c.user, period(c.at)))
    report = {r["tier"]: r for r in tier_margins(con, STUDIO, parse_tiers_yaml(TIERS_YAML), **RANGE).dicts()}
    assert set(report) == {t["tier_code"] for t in tiers_raw}
    for t in tiers_raw:
        code, price = t["tier_code"], Fraction(t.get("price_amount_cents", 0), 100)
        row = report[code]
        revenue = price * len(periods[code])
        assert row["periods"] == len(periods[code]) > 0
        assert row["revenue"] == dec(revenue)
        assert row["cost_with_markup"] == dec(cost[code])
        assert row["realised_profit"] == dec(revenue - cost[code])
        if revenue:
            pct = (revenue - cost[code]) / revenue * 100
            assert abs(Fraction(row["realised_margin_pct"]) - pct) <= Fraction(1, 200), code
        if t.get("billing_mode") == "paygo" or not t.get("spend_limit_cents"):
            assert row["planned_profit_per_period"] is None
        else:
            assert row["planned_profit_per_period"] == dec(price - Fraction(t["spend_limit_cents"], 100) * Fraction("1.045"))
    assert report["starter"]["planned_profit_per_period"] == Decimal("13.325")


def test_limit_utilisation_is_period_spend_over_the_plans_period_limit(world, con):
    limits = plan_limits(seed_plans(ACME).values())
    rows = utilisation(con, ACME, limits, **RANGE).dicts()
    spend: dict[tuple[str, datetime], Fraction] = defaultdict(Fraction)
    for c in world.calls:
        if c.tenant == ACME:
            spend[(c.user, period(c.at))] += oracle_cost(c)
    assert {(r["user"], r["period_start"]): r["spend"] for r in rows} == {k: dec(v) for k, v in spend.items()}
    assert all(r["utilisation"] == r["spend"] / r["limit"] for r in rows)


# -- the command line and exports ---------------------------------------------------------------------------------


def test_report_commands_print_tables_and_export_csv_json_and_parquet(world, tmp_path):
    from ledger.cli.history import report

    env = {"LEDGER_HOME": str(world.settings.home), "LEDGER_NAMESPACE": world.settings.namespace,
           "KAFKA_BOOTSTRAP_SERVERS": world.settings.bootstrap}
    runner = CliRunner()
    table = runner.invoke(report, ["daily", "--tenant", ACME], env=env)
    assert table.exit_code == 0, table.output
    assert "Spend by day and model" in table.output and "gpt-4o-mini" in table.output

    as_json = runner.invoke(report, ["top", "--tenant", ACME, "--limit", "3", "--format", "json"], env=env)
    rows = json.loads(as_json.stdout)["rows"]  # stdout alone: stderr says which namespace and home it read
    with open_history(world.history) as con:
        expected = top_users(con, ACME, limit=3, **RANGE)
    assert [Decimal(r["spend"]) for r in rows] == [r["spend"] for r in expected.dicts()]

    as_csv = runner.invoke(report, ["history", "p1", "--tenant", ACME, "--by", "model", "--format", "csv"], env=env)
    header, *lines = as_csv.stdout.strip().splitlines()
    assert header.startswith("model,calls,") and len(lines) in (1, 2)

    out = tmp_path / "margins.parquet"
    result = runner.invoke(report, ["margins", "--tenant", STUDIO, "--tiers", str(ROOT / "examples" / "tiers.yaml"),
                                    "--format", "parquet", "--output", str(out)], env=env)
    assert result.exit_code == 0, result.output
    back = pq.read_table(out).to_pylist()
    with open_history(world.history) as con:
        exact = tier_margins(con, STUDIO, parse_tiers_yaml(TIERS_YAML), **RANGE).dicts()
    assert [(r["tier"], r["cost_with_markup"], r["realised_profit"]) for r in back] == [
        (r["tier"], r["cost_with_markup"], r["realised_profit"]) for r in exact]

    refused = runner.invoke(report, ["gates", "--tenant", ACME, "--format", "parquet"], env=env)
    assert refused.exit_code != 0 and "output" in refused.output


# -- charts ----------------------------------------------------------------------------------------------------------


def _series_pixels(path: Path) -> int:
    """Pixels in matplotlib's first two series colours (C0 blue, C1 orange), give or take antialiasing."""
    image = Image.open(path).convert("RGB")
    targets = [(31, 119, 180), (255, 127, 14)]
    return sum(1 for px in image.getdata() if any(sum(abs(a - b) for a, b in zip(px, t, strict=True)) < 30 for t in targets))


def test_charts_are_png_files_of_the_expected_size_that_are_not_blank(world, con, tmp_path):
    from projections.charts import spend_over_time, utilisation_histogram

    spend_png = spend_over_time(con, ACME, tmp_path / "spend.png", **RANGE)
    util_png = utilisation_histogram(con, ACME, plan_limits(seed_plans(ACME).values()), tmp_path / "util.png", **RANGE)
    empty_png = spend_over_time(con, "nobody", tmp_path / "empty.png", **RANGE)
    for path in (spend_png, util_png):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (1000, 500)
            assert max(ImageStat.Stat(image.convert("L")).var) > 100
        assert _series_pixels(path) > 200 > _series_pixels(empty_png), path


# -- what if ---------------------------------------------------------------------------------------------------------


def _figures(outcomes):  # type: ignore[no-untyped-def]
    return {name: (len(o.users), len(o.user_periods), o.entries, o.spend, sorted(o.soft_users), sorted(o.hard_users),
                   o.hard_blocks, o.refused, sorted(o.gate_ids)) for name, o in outcomes.items()}


def test_simulating_the_current_plans_reproduces_what_happened_exactly(con):
    result = simulate(con, ACME, parse_plans_config(SEED_PLANS_JSON), **RANGE)
    assert _figures(result.proposed) == _figures(result.actual)
    assert result.actual["pro"].hard_blocks > 0 and result.actual["free"].hard_blocks > 0
    assert not result.users_not_simulated and result.entries_with_tools == 0


def test_the_plans_guides_patched_quotas_give_fewer_hard_blocks_as_an_oracle_counts_them(world, con):
    config = json.loads(SEED_PLANS_JSON, parse_float=str)  # keep "0.80" as written: gate ids include the threshold
    pro = next(p for p in config["plans"] if p["name"] == "pro")
    pro["model_limits"] = {m: {"max_tokens_per_period": n} for m, n in PATCHED.items()}
    result = simulate(con, ACME, parse_plans_config(json.dumps(config)), **RANGE)

    before = hard_blocks_oracle(world.calls, {"gpt-4o": 50_000, "gpt-4o-mini": 200_000})
    after = hard_blocks_oracle(world.calls, PATCHED)
    assert result.actual["pro"].hard_blocks == sum(before.values())
    assert result.proposed["pro"].hard_blocks == sum(after.values()) < sum(before.values())
    assert len(result.proposed["pro"].hard_users) == len({u for (u, _p, _m), hit in after.items() if hit})
    assert result.proposed["pro"].spend == result.actual["pro"].spend  # quotas change gates, not prices
    assert _figures({"free": result.proposed["free"]}) == _figures({"free": result.actual["free"]})


def test_a_proposal_that_drops_a_model_refuses_its_calls_and_a_missing_plan_skips_its_users(world, con):
    config = json.loads(SEED_PLANS_JSON, parse_float=str)
    config["plans"] = [p for p in config["plans"] if p["name"] == "pro"]
    del config["plans"][0]["cost_rates"]["gpt-4o"], config["plans"][0]["model_limits"]["gpt-4o"]
    result = simulate(con, ACME, parse_plans_config(json.dumps(config)), **RANGE)
    assert result.users_not_simulated == {f"f{i}" for i in range(10)}
    assert "free" not in result.proposed
    big = [c for c in world.calls if c.tenant == ACME and c.plan == "pro" and c.model == "gpt-4o"]
    assert result.proposed["pro"].refused == len(big) > 0
    assert result.proposed["pro"].spend == result.actual["pro"].spend - dec(sum(oracle_cost(c) for c in big))


def test_the_simulate_command_prints_actual_and_proposed_side_by_side(world, tmp_path):
    from ledger.cli.history import simulate as simulate_command

    config = json.loads(SEED_PLANS_JSON, parse_float=str)
    next(p for p in config["plans"] if p["name"] == "pro")["model_limits"] = {
        m: {"max_tokens_per_period": n} for m, n in PATCHED.items()}
    proposed = tmp_path / "proposed.json"
    proposed.write_text(json.dumps(config))
    env = {"LEDGER_HOME": str(world.settings.home), "LEDGER_NAMESPACE": world.settings.namespace,
           "KAFKA_BOOTSTRAP_SERVERS": world.settings.bootstrap}
    result = CliRunner().invoke(simulate_command, ["--plans", str(proposed), "--tenant", ACME, "--from", "2026-11-01",
                                                   "--to", "2027-01-01", "--format", "json", "--quiet"], env=env)
    assert result.exit_code == 0, result.output
    rows = {(r["plan"], r["side"]): r for r in json.loads(result.stdout)["rows"]}
    assert set(rows) == {("free", "actual"), ("free", "proposed"), ("pro", "actual"), ("pro", "proposed")}
    assert rows[("pro", "proposed")]["hard_blocks"] < rows[("pro", "actual")]["hard_blocks"]
    assert rows[("pro", "proposed")]["spend"] == rows[("pro", "actual")]["spend"]
