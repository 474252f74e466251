"""Benchmark: the history side on N generated ledger entries (10 million by default), each figure next to a
raw DuckDB baseline measured in the same run.

- rebuild: the rebuild's write path (`Projector(bulk=True)`: JSON text into Arrow, parsed and cast by
  DuckDB, inserted without the unique keys, offsets in the same transaction, in batches of the projector's
  size; then `finish()` builds the keys) on entries encoded exactly as the processor emits them, fed
  in-process. Pushing 10M entries through Kafka first would measure the broker and the worker, not the
  projection (`make bench` runs `tests.benchmarks.pipeline` for those). Baseline: the same rows, already
  typed, inserted from Arrow into a table without a key. The live projector's path (INSERT OR IGNORE against
  the keys) is measured on the first million for comparison.
- spend by day x model over the tenant, and one user's month by day: the report functions on the projected
  file, and the same functions on a bare copy of the table (no primary key).

Prints figures; asserts nothing (targets: rebuild >= 200,000 entries/s, day x model < 200 ms, a user's month
< 50 ms).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
from aiokafka import TopicPartition

from ledger.settings import Settings
from projections.projector import BATCH_RECORDS_MAX, Projector, connect
from projections.reports import spend_by_day_and_model, user_history

TENANT = "bench"
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "claude-haiku-4-5")
T0 = datetime(2026, 11, 1, tzinfo=UTC)
SPAN = timedelta(days=90)
PARTITIONS = 8
QUERY_RUNS = 15

_TEMPLATE = (
    '{"tenant":"bench","user":"%s","event_id":"e%d","seq":%d,"session_id":"s%d","session_started_at":"%s",'
    '"model":"%s","input_tokens":%d,"output_tokens":%d,"tool_calls":0,"cost":"%d.%012d","plan_id":"plan-pro",'
    '"plan_name":"pro","plan_version":1,"period_start":"%s","period_end":"%s","occurred_at":"%s",'
    '"period_spend":"%d.%012d","session_spend":"%d.%012d","period_model_tokens":%d,"late":false,"schema_version":1}'
)


class _Record(NamedTuple):
    value: bytes
    offset: int


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S+00:00")


def batches(total: int, users: int) -> Iterator[list[tuple[TopicPartition, list[_Record]]]]:
    """Encoded ledger entries, BATCH_RECORDS_MAX at a time, spread over partitions as the topic would hold them."""
    step_s = SPAN.total_seconds() / total
    periods = [(T0, datetime(2026, 12, 1, tzinfo=UTC)), (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
               (datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC))]
    iso_periods = [(_iso(a), _iso(b), a, b) for a, b in periods]
    offsets = [0] * PARTITIONS
    for first in range(0, total, BATCH_RECORDS_MAX):
        per_partition: dict[int, list[_Record]] = {}
        for n in range(first, min(first + BATCH_RECORDS_MAX, total)):
            at = T0 + timedelta(seconds=n * step_s)
            start, end, _, b = next(p for p in iso_periods if at < p[3])
            user = n % users
            inp, out = (n * 7919) % 4000, (n * 104729) % 1500
            cost = inp * 2500 + out * 10000  # picodollars: gpt-4o's rates
            occurred = _iso(at)
            value = (_TEMPLATE % (f"u{user:06d}", n, n // users + 1, n // (users * 50), occurred, MODELS[n % 4], inp, out,
                                  cost // 10**12, cost % 10**12, start, end, occurred, 0, cost, 0, cost, inp + out)).encode()
            partition = user % PARTITIONS
            per_partition.setdefault(partition, []).append(_Record(value, offsets[partition]))
            offsets[partition] += 1
        yield [(TopicPartition("bench.entries", p), records) for p, records in per_partition.items()]


def measure_rebuild(path: Path, total: int, users: int, *, bulk: bool = True) -> tuple[float, float]:
    """(seconds in the projector's write path, seconds generating the input) for ``total`` entries."""
    settings = Settings(home=path.parent, namespace="bench", external_bootstrap="unused:0")
    projector = Projector(settings, path, bulk=bulk)
    write_s = generate_s = 0.0
    t = time.perf_counter()
    for batch in batches(total, users):
        generated = time.perf_counter()
        generate_s += generated - t
        projector.write(batch)
        t = time.perf_counter()
        write_s += t - generated
    if bulk:
        projector.finish()
        write_s += time.perf_counter() - t
    return write_s, generate_s


def measure_arrow_baseline(source: Path, target: Path) -> tuple[int, float]:
    """Insert the projected rows, typed, from Arrow into a table without a key: DuckDB's own ceiling."""
    with connect(source, read_only=True) as src, duckdb.connect(str(target)) as dst:
        reader = src.sql("SELECT * FROM ledger_entries").to_arrow_reader(BATCH_RECORDS_MAX)
        rows, elapsed, created = 0, 0.0, False
        for record_batch in reader:
            dst.register("arrow_rows", record_batch)
            t = time.perf_counter()
            if not created:
                dst.execute("CREATE TABLE ledger_entries AS SELECT * FROM arrow_rows")
                created = True
            else:
                dst.execute("INSERT INTO ledger_entries SELECT * FROM arrow_rows")
            elapsed += time.perf_counter() - t
            dst.unregister("arrow_rows")
            rows += record_batch.num_rows
        dst.execute("CHECKPOINT")
    return rows, elapsed


def latency_ms(run: Callable[[], Any]) -> tuple[float, float]:
    """(median, max) of QUERY_RUNS runs after one warm-up, in milliseconds."""
    run()
    samples = []
    for _ in range(QUERY_RUNS):
        t = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples), max(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--live-entries", type=int, default=1_000_000,
                        help="How many entries go through the live projector's path, for comparison.")
    parser.add_argument("--dir", type=Path, default=None, help="Where the DuckDB files go (default: a temp dir).")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="ledger-history-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    projected, bare, live = folder / "projected.duckdb", folder / "bare.duckdb", folder / "live.duckdb"
    for path in (projected, bare, live):
        path.unlink(missing_ok=True)

    write_s, generate_s = measure_rebuild(projected, args.entries, args.users)
    live_s, _ = measure_rebuild(live, args.live_entries, args.users, bulk=False)
    rows, arrow_s = measure_arrow_baseline(projected, bare)
    assert rows == args.entries, (rows, args.entries)

    month = {"start": datetime(2026, 12, 1, tzinfo=UTC), "end": datetime(2027, 1, 1, tzinfo=UTC)}
    everything = {"start": T0, "end": T0 + SPAN + timedelta(days=1)}
    user = f"u{args.users // 2 + 42:06d}"
    figures = {}
    for name, path in (("projected", projected), ("bare", bare)):
        with connect(path, read_only=True) as con:
            con.execute("SET TimeZone = 'UTC'")
            figures[name] = (
                latency_ms(lambda con=con: spend_by_day_and_model(con, TENANT, **everything)),
                latency_ms(lambda con=con: user_history(con, TENANT, user, by="day", limit=100, **month)),
            )
            day_rows = len(spend_by_day_and_model(con, TENANT, **everything).rows)
            user_rows = sum(r[1] for r in user_history(con, TENANT, user, by="day", limit=100, **month).rows)

    n = args.entries
    print(f"\nhistory benchmark: {n:,} ledger entries, {args.users:,} users, files in {folder}")
    print(f"(input generation, not timed: {generate_s:.1f} s)")
    print(f"rebuild (bulk insert, then the keys):                              {n / write_s:>10,.0f} entries/s ({write_s:.1f} s)")
    baseline = f"{rows / arrow_s:>10,.0f} entries/s ({arrow_s:.1f} s)"
    print(f"baseline: typed Arrow INSERT, table without a key:                 {baseline}")
    print(f"rebuild / baseline:                                                 {arrow_s / write_s:>10.1%}")
    print(f"live projector path (INSERT OR IGNORE on the keys), first {args.live_entries:,}:"
          f" {args.live_entries / live_s:>10,.0f} entries/s ({live_s:.1f} s)")
    (d_med, d_max), (u_med, u_max) = figures["projected"]
    (bd_med, bd_max), (bu_med, bu_max) = figures["bare"]
    print(f"spend by day x model ({day_rows} rows), projected: median {d_med:7.1f} ms, max {d_max:7.1f} ms;"
          f" bare table: median {bd_med:7.1f} ms, max {bd_max:7.1f} ms")
    print(f"one user's month by day ({user_rows} calls), projected: median {u_med:7.1f} ms, max {u_max:7.1f} ms;"
          f" bare table: median {bu_med:7.1f} ms, max {bu_max:7.1f} ms")
    print("targets: rebuild >= 200,000 entries/s; day x model < 200 ms; one user's month < 50 ms")


if __name__ == "__main__":
    main()
