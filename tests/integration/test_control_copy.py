"""The history file's copies of the control plane: every plan version, user and tier, exactly, on both databases."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import msgspec
import pytest

from ledger.catalog import load_catalog
from ledger.control.store import ControlStore
from ledger.plans import PlanPatch, revise
from ledger.tiers import parse_tiers_yaml, tier_to_plan
from projections.projector import Projector
from projections.reports import open_history
from tests.conftest import ROOT
from tests.factories import T0, seed_plans

pytestmark = pytest.mark.integration


def test_plan_versions_users_and_tiers_are_copied_and_a_copy_replaces_the_last(store_url, tmp_path):
    from ledger.settings import Settings

    settings = Settings(home=tmp_path, namespace="copy", external_bootstrap="unused:0", database_url=store_url)
    store = ControlStore(store_url)
    store.create_schema()
    with store.session() as session:
        acme, _ = session.create_tenant("acme")
        other, _ = session.create_tenant("other")
        plans = seed_plans(acme)
        for plan in plans.values():
            session.add_plan_version(acme, plan)
        pro_v2 = revise(plans["pro"], PlanPatch(max_spend_per_period=Decimal("75.00")))
        session.add_plan_version(acme, pro_v2)
        tiers = parse_tiers_yaml((ROOT / "examples" / "tiers.yaml").read_text())
        for n, tier in enumerate(tiers):
            plan = tier_to_plan(tier, plan_id=f"tier-plan-{n}", version=1, catalog=load_catalog())
            session.add_plan_version(other, plan)
            session.add_tier(other, tier, plan.plan_id)
        ana = session.create_user(acme, "ana")
        session.set_subscription(acme, ana.id, pro_v2.plan_id, T0 + timedelta(hours=5))
        session.create_user(other, "bo")

    projector = Projector(settings)
    projector.sync_control()
    with open_history(settings.history_path) as con:
        versions = con.execute("SELECT tenant, name, version, max_spend_per_period, soft_gate_at, body->>'plan_id' "
                               "FROM plan_versions WHERE tenant = $t ORDER BY name, version", {"t": acme}).fetchall()
        assert versions == [(acme, "free", 1, plans["free"].max_spend_per_period, Decimal("0.8"),
                             plans["free"].plan_id),
                            (acme, "pro", 1, Decimal("49"), Decimal("0.8"), plans["pro"].plan_id),
                            (acme, "pro", 2, Decimal("75"), Decimal("0.8"), plans["pro"].plan_id)]
        assert con.execute("SELECT tenant, user_id, plan_id, period_start FROM users ORDER BY user_id").fetchall() == [
            (acme, "ana", pro_v2.plan_id, T0 + timedelta(hours=5)), (other, "bo", None, None)]
        copied = con.execute("SELECT tier_code, price, budget, markup, body FROM tiers ORDER BY tier_code").fetchall()
        assert [(code, price, budget, markup) for code, price, budget, markup, _ in copied] == sorted(
            (t.tier_code, t.price_usd, t.budget_usd, t.markup) for t in tiers)
        assert {msgspec.json.decode(body, type=type(tiers[0])) for *_, body in copied} == set(tiers)

    with store.session() as session:  # a user is added: the next copy has them, and nothing twice
        session.create_user(other, "cy")
    projector.sync_control()
    with open_history(settings.history_path) as con:
        assert con.execute("SELECT count(*), count(DISTINCT id) FROM users").fetchone() == (3, 3)
        assert con.execute("SELECT count(*) FROM plan_versions").fetchone() == (3 + len(tiers),)
    store.dispose()
