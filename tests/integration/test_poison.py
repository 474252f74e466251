"""One tenant's commands cannot make the shared processor drop another tenant's usage.

The probe that found it: tenant B published a plan of about 1 MB and patched it a
few times; its history outgrew Kafka's message limit, the state write failed, and
Faust acknowledged the batch, so tenant A's usage in it was silently lost. Here the
commands go straight onto the log (the API refuses such plans before that).
"""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest

from ledger.plans import CostRate
from streams.topics import changelog_topic
from tests.conftest import wait_processed
from tests.factories import Ledger, assigned, published, seed_plans, usage
from tests.kafka_io import entries, publish, publish_raw, read_partitions, rejections
from tests.reliability.audit import stored_accounts

pytestmark = pytest.mark.integration


def test_a_plan_too_large_to_store_is_dead_lettered_and_every_other_tenants_event_is_applied(settings, worker):
    a_plans, b_plans = seed_plans("tenant-a"), seed_plans("tenant-b")
    free = b_plans["free"]
    rates = {f"{'m' * 120}-{i:05d}": CostRate(input=Decimal("0.001"), output=Decimal("0.002")) for i in range(5000)}
    huge = [msgspec.structs.replace(free, version=v, cost_rates=rates) for v in range(2, 6)]
    a_plans_published = [published(p, tenant="tenant-a") for p in a_plans.values()]
    a_assigned = [assigned(f"a{u}", a_plans["pro"], tenant="tenant-a") for u in range(12)]
    publish(settings, a_plans_published + [published(free, tenant="tenant-b")] + a_assigned)
    # Tenant A's 12 x 40 events, with tenant B's four oversized versions among them.
    events = [usage(f"a{u}", n, tenant="tenant-a") for n in range(40) for u in range(12)]
    for i, chunk_start in enumerate(range(0, len(events), 120)):
        publish(settings, events[chunk_start:chunk_start + 120])
        publish(settings, [published(huge[i], tenant="tenant-b")])
    publish_raw(settings, [(b"k" * 100_000, b"{" * 500_000)])  # a huge key and a deeply nested body, for good measure
    wait_processed(settings, worker, timeout_s=120)

    assert worker.alive(), worker.log_tail()
    assert "Traceback" not in worker.log_tail(100_000)
    assert sorted(e.event_id for e in entries(settings)) == sorted({e.event_id for e in events})
    refused = rejections(settings)
    too_large = {(r.tenant, r.event_id) for r in refused if r.code == "too_large"}
    # v1 is small and v2 still fits beside it; from v3 the history would not fit in one record.
    assert too_large == {("tenant-b", f"plan-{free.plan_id}-v{v}") for v in range(3, 6)}
    assert {r.code for r in refused} == {"too_large", "invalid_event"}
    # All of tenant A's spend, as the core's fold of tenant A's commands alone gives it (the probe saw 1 of 480).
    oracle = Ledger()
    oracle.apply_all([*a_plans_published, *a_assigned, *events])
    stored = {a.user: a.period_spend for records in read_partitions(settings, changelog_topic(settings.namespace)).values()
              for a in stored_accounts(records) if a.tenant == "tenant-a"}
    expected = {f"a{u}": oracle.account(f"a{u}", "tenant-a").period_spend for u in range(12)}
    assert stored == expected
    print(f"tenant A: {len(events)} events, {len(entries(settings))} entries, spend {sum(stored.values())} of "
          f"{sum(expected.values())}; tenant B: {len(too_large)} version(s) dead-lettered too_large; worker alive")
