"""`ledger projections rebuild` on the real broker: from offset 0 into a fresh file, swapped in atomically."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from projections.projector import Projector, connect
from projections.rebuild import rebuild, staging_path, swap_in
from streams.progress import projector_lag
from tests.conftest import wait_processed
from tests.factories import T0, assigned, published, seed_plans, usage
from tests.kafka_io import publish, publish_raw

pytestmark = pytest.mark.integration

TABLES = ("ledger_entries", "gate_events", "rejected_events", "projector_offsets")


def snapshot(path: Path) -> dict[str, list[tuple]]:  # type: ignore[type-arg]
    with connect(path, read_only=True) as con:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}


def load(settings, n_users: int, calls: int, first: int = 0, seed: int = 3) -> None:  # type: ignore[no-untyped-def]
    plans = seed_plans()
    rng = random.Random(seed)
    users = {f"u{i}": ("free" if i % 2 else "pro") for i in range(n_users)}
    commands: list = []
    if first == 0:
        commands += [published(p) for p in plans.values()] + [assigned(u, plans[p]) for u, p in users.items()]
    commands += [usage(u, n, input_tokens=rng.randint(0, 2000), output_tokens=rng.randint(0, 2000),
                       at=T0 + timedelta(minutes=n)) for n in range(first, first + calls) for u in users]
    publish(settings, commands)


def test_rebuilding_twice_gives_identical_tables_equal_to_the_live_projection(settings, worker):
    load(settings, 20, 15)
    publish_raw(settings, [(b"acme/u1", b"not json"), (b"acme/u2", b'{"type": "usage"}')])
    wait_processed(settings, worker)
    asyncio.run(Projector(settings).run(until_caught_up=True))
    live = snapshot(settings.history_path)
    assert len(live["ledger_entries"]) == 300 and live["gate_events"] and len(live["rejected_events"]) == 2

    seen: list[tuple[int, int]] = []
    first = rebuild(settings, progress=lambda done, total: seen.append((done, total)))
    assert snapshot(settings.history_path) == live
    assert (first.entries, first.rejections) == (300, 2) and first.records == sum(len(live[t]) for t in TABLES[:3])
    assert seen and seen[-1][0] == seen[-1][1] == first.records
    assert not staging_path(settings.history_path).exists()

    rebuild(settings)
    assert snapshot(settings.history_path) == live


def wait_projected(settings, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while (lag := asyncio.run(projector_lag(settings, settings.history_path))) > 0:
        assert time.monotonic() < deadline, f"the live projector is still {lag} records behind"
        time.sleep(0.3)


def test_a_running_projector_that_is_ahead_of_the_new_file_resumes_from_it_and_loses_nothing(settings, worker, tmp_path):
    load(settings, 10, 10)
    wait_processed(settings, worker)
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=lambda: loop.run_until_complete(Projector(settings).run(stop)), daemon=True)
    runner.start()
    try:
        wait_projected(settings)
        # Given a rebuilt file that ends here, while the live projector goes on to write more into the old file,
        staged = staging_path(settings.history_path)
        asyncio.run(Projector(settings, staged).run(until_caught_up=True))
        load(settings, 10, 10, first=10)
        wait_processed(settings, worker)
        wait_projected(settings)
        # when the rebuilt file is swapped in, the live projector must go back to the offsets the new file stores.
        swap_in(staged, settings.history_path)
        wait_projected(settings)
        # And a full rebuild while usage keeps arriving and the projector keeps writing loses nothing either.
        load(settings, 10, 10, first=20)
        rebuild(settings)
        wait_processed(settings, worker)
        wait_projected(settings)
    finally:
        loop.call_soon_threadsafe(stop.set)
        runner.join(timeout=30)
    fresh = tmp_path / "fresh.duckdb"
    asyncio.run(Projector(settings, fresh).run(until_caught_up=True))
    after = snapshot(settings.history_path)
    assert len(after["ledger_entries"]) == 10 * 30
    assert after == snapshot(fresh)


def test_the_rebuild_command_prints_what_it_rebuilt(settings, worker):
    from ledger.cli.history import projections

    load(settings, 4, 5)
    wait_processed(settings, worker)
    env = {"LEDGER_HOME": str(settings.home), "LEDGER_NAMESPACE": settings.namespace,
           "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap}
    result = CliRunner().invoke(projections, ["rebuild", "--quiet"], env=env)
    assert result.exit_code == 0, result.output
    assert "20 entries" in result.output
    assert len(snapshot(settings.history_path)["ledger_entries"]) == 20
