"""Scenario tables on the real broker: given a plan and a sequence of commands, then these gate events.

Every scenario runs on its own user through one worker; expectations are written out by hand.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

import msgspec
import pytest

from ledger.events import AnyCommand, ClockTicked, ToppedUp
from ledger.plans import PlansConfig, PlanSpec, build_plan
from projections.projector import Projector
from projections.reports import open_history
from tests.conftest import wait_processed
from tests.factories import T0, TENANT, assigned, published, usage
from tests.kafka_io import entries, gates, publish, rejections

pytestmark = pytest.mark.integration

RATE = {"m": {"input": "0.01", "output": "0.01"}}  # $0.01 per 1K tokens either way


def plan(name: str, version: int = 1, **fields):  # type: ignore[no-untyped-def]
    spec = msgspec.convert({"name": name, "cost_rates": RATE, **fields}, PlanSpec)
    return build_plan(spec, PlansConfig(plans=[spec]), plan_id=f"plan-{name}", version=version)


PLANS = {
    "capped": plan("capped", max_spend_per_period="1.00"),
    "roomy": plan("roomy", max_spend_per_period="49.00"),
    "session": plan("session", max_spend_per_session="0.50"),
    "tokens": plan("tokens", model_limits={"m": {"max_tokens_per_period": 10_000}}),
    "trial": plan("trial", max_spend_per_period="1.00", trial_days=7),
    "unlimited": plan("unlimited", max_spend_per_period="0"),
    "paygo": plan("paygo", billing_mode="paygo"),
    "tools": plan("tools", max_spend_per_period="1.00", tool_costs={"search": "0.25"}),
    "default": msgspec.structs.replace(plan("default", max_spend_per_period="1.00", cost_rates={},
                                            model_limits={"x": {"max_tokens_per_period": 10_000_000}},
                                            default_cost_rate={"input": "0.01", "output": "0.01"})),
    "free": plan("free", model_limits={"m": {"max_tokens_per_period": 10_000}}),
}


def call(user: str, n: int, tokens: int, *, minutes: float | None = None, days: float = 0, **kw) -> AnyCommand:  # type: ignore[no-untyped-def]
    at = T0 + timedelta(days=days, minutes=n if minutes is None else minutes)
    return usage(user, n, model=kw.pop("model", "m"), input_tokens=tokens, output_tokens=0, at=at, **kw)


# user -> (plan, commands, expected gates as (kind, dimension, cause event id, correction))
SCENARIOS: dict[str, tuple[str, list[AnyCommand], list[tuple[str, str, str, bool]]]] = {
    "period": ("capped", [call("period", n, 40_000) for n in (1, 2, 3)],
               [("soft_warning", "period_spend", "period-2", False), ("hard_block", "period_spend", "period-3", False)]),
    "session": ("session", [call("session", n, 20_000) for n in (1, 2, 3)] + [
                    call("session", n, 20_000, minutes=40 + n) for n in (4, 5)],     # 31+ min later: a new session
                [("soft_warning", "session_spend", "session-2", False), ("hard_block", "session_spend", "session-3", False),
                 ("soft_warning", "session_spend", "session-5", False)]),
    "tokens": ("tokens", [call("tokens", n, 4_000) for n in (1, 2, 3)],
               [("soft_warning", "model_tokens", "tokens-2", False), ("hard_block", "model_tokens", "tokens-3", False)]),
    "reset": ("capped", [call("reset", n, 60_000) for n in (1, 2)] + [call("reset", 3, 1_000, days=31)],
              [("soft_warning", "period_spend", "reset-2", False), ("hard_block", "period_spend", "reset-2", False),
               ("unblocked", "period_spend", "reset-3", False)]),
    # The clock user's periods start on Oct 12 (START below): a tick on Nov 12 ends its period and only its.
    "clock": ("capped", [call("clock", 1, 100_000, days=-19),
                         ClockTicked(event_id="tick-nov-12", occurred_at=T0 + timedelta(days=11, seconds=1))],
              [("soft_warning", "period_spend", "clock-1", False), ("hard_block", "period_spend", "clock-1", False),
               ("unblocked", "period_spend", "tick-nov-12", False)]),
    "upgrade": ("capped", [call("upgrade", 1, 100_000), assigned("upgrade", PLANS["roomy"], event_id="up")],
                [("soft_warning", "period_spend", "upgrade-1", False), ("hard_block", "period_spend", "upgrade-1", False),
                 ("unblocked", "period_spend", "up", False)]),
    "trial": ("trial", [call("trial", 1, 100_000, days=1), call("trial", 2, 1_000, days=7)],
              [("soft_warning", "period_spend", "trial-1", False), ("hard_block", "period_spend", "trial-1", False),
               ("unblocked", "period_spend", "trial-2", False)]),
    "unlimited": ("unlimited", [call("unlimited", n, 1_000_000) for n in (1, 2)], []),
    "paygo": ("paygo", [ToppedUp(event_id="pay-1", tenant=TENANT, user="paygo", amount=Decimal("0.50"), occurred_at=T0)]
              + [call("paygo", n, 20_000) for n in (1, 2, 3)]
              + [ToppedUp(event_id="pay-2", tenant=TENANT, user="paygo", amount=Decimal("5"),
                          occurred_at=T0 + timedelta(hours=1))],
              [("hard_block", "balance", "paygo-3", False), ("unblocked", "balance", "pay-2", False)]),
    "tools": ("tools", [call("tools", n, 0, tools={"search": 2}) for n in (1, 2)],
              [("soft_warning", "period_spend", "tools-2", False), ("hard_block", "period_spend", "tools-2", False)]),
    "default": ("default", [call("default", 1, 100_000, model="x")],
                [("soft_warning", "period_spend", "default-1", False), ("hard_block", "period_spend", "default-1", False)]),
    "late": ("free", [call("late", n, 2_000) for n in (1, 2, 3, 4)] + [call("late", 10, 1_000, days=31),
                                                                      call("late", 5, 2_000, days=2)],
             [("soft_warning", "model_tokens", "late-4", False), ("hard_block", "model_tokens", "late-5", True)]),
    "refused": ("free", [call("refused", 1, 1_000, model="gpt-4o")], []),
}


START = {"clock": T0 - timedelta(days=20)}


def test_every_dimension_reset_and_unblock_path_on_the_real_broker(settings, worker):
    commands: list[AnyCommand] = [published(p) for p in PLANS.values()]
    commands += [assigned(user, PLANS[plan_name], start=START.get(user, T0))
                 for user, (plan_name, _, _) in SCENARIOS.items()]
    for _, scenario, _ in SCENARIOS.values():
        commands += scenario
    publish(settings, commands)
    wait_processed(settings, worker)

    raised: dict[str, list[tuple[str, str, str, bool]]] = {user: [] for user in SCENARIOS}
    for g in gates(settings):  # one user's gates share a partition: this is the order they were raised in
        raised[g.user].append((g.kind, g.dimension, g.cause_event_id, g.correction))
    for user, (_, _, expected) in SCENARIOS.items():
        assert raised[user] == expected, user
    # The history has them too, corrections marked as such.
    asyncio.run(Projector(settings).run(until_caught_up=True))
    with open_history(settings.history_path) as con:
        projected = con.execute("SELECT gate_id, kind, correction FROM gate_events").fetchall()
    assert sorted(projected) == sorted((g.gate_id, g.kind, g.correction) for g in gates(settings))

    costs = {e.event_id: e.cost for e in entries(settings)}
    assert costs["tools-1"] == Decimal("0.50") and costs["default-1"] == Decimal("1.00")
    assert costs["period-1"] == Decimal("0.40") and costs["unlimited-1"] == Decimal("10.00")
    assert [(r.code, r.event_id) for r in rejections(settings)] == [("model_not_allowed", "refused-1")]


def test_replaying_the_log_reproduces_every_gate_reset_reservation_and_correction(settings, worker_factory, tmp_path):
    from ledger.events import CheckRequested
    from tests.conftest import outputs, replay_from_offset_0

    checks = [CheckRequested(event_id=f"hold-{n}", request_id=f"req-{n}", tenant=TENANT, user="period", model="m",
                             input_tokens=10_000, reserve=True, occurred_at=T0 + timedelta(minutes=10 + n))
              for n in range(3)]
    commands: list[AnyCommand] = [published(p) for p in PLANS.values()]
    commands += [assigned(user, PLANS[plan_name], start=START.get(user, T0))
                 for user, (plan_name, _, _) in SCENARIOS.items()]
    for _, scenario, _ in SCENARIOS.values():
        commands += scenario
    publish(settings, commands + checks)
    first = worker_factory(settings).start()
    wait_processed(settings, first)
    first.stop()

    replay = replay_from_offset_0(settings, tmp_path / "replay", worker_factory)
    kinds = {g.kind for g in gates(settings)}
    assert {"soft_warning", "hard_block", "unblocked"} <= kinds and any(g.correction for g in gates(settings))
    for name in ("entries", "gates", "rejected", "replies"):
        # The copy lives in another topic, and a dead letter names its source topic: spell that back.
        original = outputs(settings, name)
        assert original == outputs(replay, name, as_namespace=settings.namespace) and any(original.values()), name
