"""The demo workload: the plans guide's two plans, a dozen users, some over their limits.

Dated relative to the day it runs: the usage lies in the three days before today (UTC), in the billing
period the demo's users start on, so live spend right after the demo shows it and the local stack's
wall-clock ticks end no period under it. Deterministic within a day (ids and times depend only on the
date), so running the demo twice the same day adds nothing: the second run's events are all recognised
as duplicates. A run on a later day adds that day's workload under new ids.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ledger.events import UsageRecorded

DEMO_TENANT = "demo"  # the tenant's name in the control plane
# The workload starts this many whole days before the day the demo runs; every event lies before midnight.
DEMO_DAYS = 3
PLANS_FILE = Path(__file__).resolve().parents[2] / "examples" / "plans.json"


def demo_start(now: datetime) -> datetime:
    """The demo's subscription start and first instant: DEMO_DAYS whole days before ``now``'s day (UTC)."""
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=DEMO_DAYS)


# user -> (plan, [(model, input_tokens, output_tokens, calls)], sessions)
USERS: dict[str, tuple[str, list[tuple[str, int, int, int]]]] = {
    "alice": ("free", [("gpt-4o-mini", 1000, 1000, 3)]),          # 6k of 10k tokens: quiet
    "bob": ("free", [("gpt-4o-mini", 1000, 1000, 4)]),            # 8k: soft warning
    "carol": ("free", [("gpt-4o-mini", 1000, 1000, 7)]),          # 14k: soft, then hard block
    "dave": ("free", [("gpt-4o-mini", 1200, 800, 5)]),            # exactly 10k: hard block at 10,000
    "erin": ("free", [("gpt-4o-mini", 300, 200, 6)]),             # 3k: quiet
    "frank": ("pro", [("gpt-4o-mini", 2000, 1000, 20), ("gpt-4o", 1500, 500, 8)]),   # quiet
    "grace": ("pro", [("gpt-4o", 3000, 2000, 9)]),                # 45k of 50k gpt-4o: soft
    "heidi": ("pro", [("gpt-4o", 4000, 2000, 10)]),               # 60k: soft, hard
    "ivan": ("pro", [("gpt-4o", 40000, 60000, 60)]),              # runaway loop: tokens and $5 session cap
    "judy": ("pro", [("gpt-4o-mini", 8000, 4000, 12)]),           # 144k of 200k mini: quiet
}


def demo_usage(tenant: str, start: datetime) -> list[UsageRecorded]:
    """Interleaved usage of every demo user from ``start`` (and three calls a plan refuses), all before the
    day that is DEMO_DAYS after it. The same mix every day; the ids name the day."""
    rng = random.Random(20261101)
    day = f"{start:%Y%m%d}"
    calls: list[UsageRecorded] = []
    for user, (_, mix) in USERS.items():
        t = start + timedelta(hours=rng.randint(1, 48))
        n = 0
        for model, input_tokens, output_tokens, count in mix:
            for _ in range(count):
                n += 1
                t += timedelta(seconds=rng.randint(5, 120))
                calls.append(UsageRecorded(
                    event_id=f"{user}-{day}-call-{n:04d}", tenant=tenant, user=user, model=model,
                    input_tokens=input_tokens, output_tokens=output_tokens,
                    session_id=f"{user}-chat-1", occurred_at=t,
                ))
    # Free users may not call gpt-4o: these land in the dead-letter topic.
    for user in ("alice", "carol", "erin"):
        calls.append(UsageRecorded(
            event_id=f"{user}-{day}-gpt4o", tenant=tenant, user=user, model="gpt-4o", input_tokens=500,
            output_tokens=500, session_id=f"{user}-chat-1",
            occurred_at=start + timedelta(days=DEMO_DAYS) - timedelta(minutes=1),
        ))
    calls.sort(key=lambda c: (c.occurred_at, c.event_id))
    return calls


def bad_records(tenant: str, start: datetime) -> list[tuple[bytes, bytes]]:
    """Two records no producer should send: not JSON, and a negative token count."""
    key = f"{tenant}/mallory".encode()
    at = (start + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [(key, b"{not json"),
            (key, b'{"type":"usage","event_id":"neg-%s","tenant":"%s","user":"mallory","model":"gpt-4o-mini",'
                  b'"input_tokens":-5,"output_tokens":10,"occurred_at":"%s"}'
                  % (start.strftime("%Y%m%d").encode(), tenant.encode(), at.encode()))]


class DemoApi:
    """The demo's operator: configures plans and users through the HTTP API, as a customer would."""

    def __init__(self, base_url: str, key: str) -> None:
        import httpx

        self.http = httpx.Client(base_url=f"{base_url}/api/v1", headers={"Authorization": f"Bearer {key}"},
                                 timeout=30)

    def configure(self, start: datetime) -> dict[str, str]:
        """POST the plans guide's plans.json verbatim, then register every user on their plan from ``start``."""
        answer = self.http.post("/config/plans", content=PLANS_FILE.read_bytes(),
                                headers={"Content-Type": "application/json"})
        answer.raise_for_status()
        body = answer.json()
        plan_ids = {p["name"]: p["id"] for p in body["plans"]} | {d["name"]: d["id"] for d in body["duplicates"]}
        for user, (plan, _) in USERS.items():
            created = self.http.post("/users", json={"external_id": user, "plan_id": plan_ids[plan],
                                                     "period_start": start.isoformat()})
            if created.status_code != 409:  # 409: registered by an earlier run
                created.raise_for_status()
        return plan_ids
