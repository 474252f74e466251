"""Benchmark: the processor's sustained rate end to end with one worker and with two
(separate processes, one consumer group), next to the raw rate of a plain aiokafka
consumer that reads and decodes the same topic in the same run (the ceiling) and the
rate of a do-nothing Faust agent on that topic (Faust's own per-record floor).
Also: worker CPU per event, changelog bytes per event (young users, and old users at
steady state), and a py-spy profile of one worker at full speed.

Run with `make bench`. Prints figures; asserts nothing (these machines are noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from ledger.events import AnyCommand, UsageRecorded
from ledger.settings import Settings
from streams.codecs import decode_command
from streams.progress import end_offsets
from streams.topics import Topics, changelog_topic, ensure_topics, partitions_of
from tests.benchmarks.observe import (
    Changelog,
    ChangelogTail,
    changelog_ends,
    cpu_seconds,
    finish_profile,
    print_top,
    start_profile,
)
from tests.conftest import ROOT, WorkerProcess, delete_namespaces, free_port, new_settings
from tests.factories import T0, assigned, published, seed_plans, usage
from tests.kafka_io import publish

SAMPLE_EVERY_S = 0.25
# After the last entry, the batch's state and position follow it to the changelog (the processor awaits its outputs
# first): read the changelog this long after.
STATE_SETTLE_S = 2.0


def workload(users: int, events: int, seed: int = 1) -> tuple[list[AnyCommand], list[UsageRecorded]]:
    rng = random.Random(seed)
    plans = seed_plans()
    names = {f"bench{i:05d}": ("free" if i % 2 else "pro") for i in range(users)}
    setup: list[AnyCommand] = [published(p) for p in plans.values()]
    setup += [assigned(u, plans[p]) for u, p in names.items()]
    calls = []
    for n in range(events):
        user = f"bench{n % users:05d}"
        model = "gpt-4o-mini" if names[user] == "free" else rng.choice(["gpt-4o-mini", "gpt-4o"])
        calls.append(usage(user, n, model=model, input_tokens=rng.randint(0, 2000), output_tokens=rng.randint(0, 800),
                           at=T0 + timedelta(milliseconds=10 * n)))
    return setup, calls


async def raw_consume_rate(settings: Settings, topic: str) -> tuple[int, float]:
    """Read the whole topic with a bare consumer, decoding every record as the processor does."""
    parts = (await partitions_of(settings.bootstrap, (topic,)))[topic]
    tps = [TopicPartition(topic, p) for p in parts]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            await consumer.seek_to_beginning(tp)
        total, started = 0, time.perf_counter()
        remaining = sum(ends.values())
        while remaining > 0:
            for _tp, records in (await consumer.getmany(timeout_ms=500, max_records=10_000)).items():
                for record in records:
                    decode_command(record.value)
                total += len(records)
                remaining -= len(records)
        return total, time.perf_counter() - started
    finally:
        await consumer.stop()


@dataclass
class Run:
    sustained: float  # events/s between 10% and 90% of the output, once the group has settled
    total_s: float  # from the workers' start until the last entry
    settled_s: float  # from the workers' start until every partition had its owner
    shares: list[float]  # events each worker processed
    cpu_s: float  # CPU seconds (user + system) the workers used, start to finish
    cpu_us_per_event: float  # worker CPU between the 10% and 90% samples, per entry produced in between
    pids: list[int]
    changelog: Changelog | None  # what the run wrote to the account changelog, when it was followed


def _ready_partitions(port: int) -> int | None:
    """Usage partitions the worker owns once it says it is ready, else None."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    except httpx.TransportError:
        return None
    match = re.search(r"(\d+) usage partition", answer.text)
    return int(match.group(1)) if answer.status_code == 200 and match else None


def _processed(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "ledger_events_processed_total")


@dataclass
class Profile:
    """Where a py-spy profile of the first worker goes, and for how long it samples (from 10% of the output)."""

    out_dir: Path
    seconds: float
    problems: list[str]


def processor_rate(settings: Settings, expected_entries: int, workers: int = 1, standby_replicas: int = 1,
                   timeout_s: float = 900, profile: Profile | None = None, follow_changelog: bool = False) -> Run:
    """Start ``workers`` worker processes in one consumer group and time the entries they produce."""
    topics = Topics.for_namespace(settings.namespace)
    ports = [free_port() for _ in range(workers)]
    tail = ChangelogTail(settings.bootstrap, changelog_topic(settings.namespace)).start() if follow_changelog else None
    procs = [WorkerProcess(settings, str(i), env={"LEDGER_METRICS_PORT": str(port),
                                                  "LEDGER_STANDBY_REPLICAS": str(standby_replicas)}).start()
             for i, port in enumerate(ports)]
    pids = [p.proc.pid for p in procs if p.proc is not None]
    started = time.perf_counter()
    samples: list[tuple[float, int, float]] = []  # (time, entries, workers' CPU seconds)
    settled_at: float | None = None
    recorders = None
    try:
        while True:
            produced = sum(asyncio.run(end_offsets(settings, (topics.entries,))).values())
            now = time.perf_counter()
            samples.append((now, produced, sum(cpu_seconds(pid) for pid in pids if Path(f"/proc/{pid}").exists())))
            if settled_at is None:
                owned = [_ready_partitions(port) for port in ports]
                if all(n is not None for n in owned) and sum(n or 0 for n in owned) == settings.partitions:
                    settled_at = now
            if profile is not None and recorders is None and produced >= 0.1 * expected_entries:
                try:
                    recorders = start_profile(pids[0], profile.out_dir, profile.seconds)
                except OSError as e:
                    profile.problems.append(f"py-spy did not start: {e}")
                    recorders = []
            if produced >= expected_entries:
                break
            if not all(p.alive() for p in procs) or now - started > timeout_s:
                raise RuntimeError(f"workers stalled at {produced}/{expected_entries}\n{procs[0].log_tail()}")
            time.sleep(SAMPLE_EVERY_S)
        if profile is not None and recorders:
            profile.problems += finish_profile(recorders, timeout_s=profile.seconds + 60)
        shares = [_processed(port) for port in ports]
        cpu_s = sum(cpu_seconds(pid) for pid in pids)
        if tail is not None:
            time.sleep(STATE_SETTLE_S)
    finally:
        for proc in procs:
            proc.stop()
    written = tail.stop() if tail is not None else None
    if settled_at is None:
        settled_at = samples[-1][0]
    low = next(s for s in samples if s[1] >= 0.1 * expected_entries and s[0] >= settled_at)
    high = next((s for s in samples if s[1] >= 0.9 * expected_entries and s[0] > low[0]), samples[-1])
    return Run(sustained=(high[1] - low[1]) / (high[0] - low[0]) if high[0] > low[0] else float("nan"),
               total_s=samples[-1][0] - started, settled_s=settled_at - started, shares=shares, cpu_s=cpu_s,
               cpu_us_per_event=(high[2] - low[2]) / (high[1] - low[1]) * 1e6 if high[1] > low[1] else float("nan"),
               pids=pids, changelog=written)


@dataclass
class Floor:
    rate: float  # records/s from the agent's first record to its last
    cpu_us_per_record: float
    records: int
    mode: str


def faust_floor(settings: Settings, topic: str, mode: str = "take_events", timeout_s: float = 900) -> Floor:
    """The do-nothing Faust agent (tests/benchmarks/faust_floor.py) over ``topic``, in its own process and group."""
    app_id = f"{settings.namespace}-faust-floor-{mode}"  # under the namespace: its cleanup deletes Faust's topics
    done = subprocess.run([sys.executable, "-m", "tests.benchmarks.faust_floor", "--bootstrap", settings.bootstrap,
                           "--topic", topic, "--partitions", str(settings.partitions), "--app-id", app_id,
                           "--mode", mode], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    found = re.search(r'\{"records".*?\}', done.stdout + done.stderr)
    if found is None:
        raise RuntimeError(f"the do-nothing agent printed no figures (exit {done.returncode}):\n{done.stderr[-3000:]}")
    figures = json.loads(found.group(0))
    return Floor(rate=figures["records"] / figures["seconds"], cpu_us_per_record=figures["cpu_s"] / figures["records"] * 1e6,
                 records=figures["records"], mode=mode)


@dataclass
class Steady:
    history_events: int
    events: int
    rate: float  # measured events over the time from their publish to their last entry
    cpu_us_per_event: float
    changelog: Changelog


def steady_state(settings: Settings, setup: list[AnyCommand], history: list[UsageRecorded],
                 measured: list[UsageRecorded], timeout_s: float = 900) -> Steady:
    """Old users: one worker folds ``history`` (filling every user's dedup window), then ``measured``; only the
    changelog written for ``measured`` counts, read from the end offsets seen between the two."""
    topics = Topics.for_namespace(settings.namespace)
    changelog = changelog_topic(settings.namespace)
    publish(settings, setup)
    publish(settings, history)
    port = free_port()
    worker = WorkerProcess(settings, "0", env={"LEDGER_METRICS_PORT": str(port)}).start()
    assert worker.proc is not None
    pid = worker.proc.pid

    def wait_entries(n: int) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(asyncio.run(end_offsets(settings, (topics.entries,))).values()) < n:
            if not worker.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"worker stalled before {n} entries\n{worker.log_tail()}")
            time.sleep(SAMPLE_EVERY_S)

    try:
        wait_entries(len(history))
        time.sleep(STATE_SETTLE_S)
        tail = ChangelogTail(settings.bootstrap, changelog, asyncio.run(changelog_ends(settings.bootstrap, changelog))).start()
        cpu_before, t = cpu_seconds(pid), time.perf_counter()
        publish(settings, measured)
        wait_entries(len(history) + len(measured))
        elapsed, cpu = time.perf_counter() - t, cpu_seconds(pid) - cpu_before
        time.sleep(STATE_SETTLE_S)
        written = tail.stop()
    finally:
        worker.stop()
    return Steady(history_events=len(history), events=len(measured), rate=len(measured) / elapsed,
                  cpu_us_per_event=cpu / len(measured) * 1e6, changelog=written)


def fresh_namespace(bootstrap: str, home: Path, setup: list, calls: list,  # type: ignore[type-arg]
                    envelopes: bool = True) -> tuple[Settings, float]:
    """A new namespace holding the workload (a partition's commands in envelopes, or one per record); returns it
    and the publish time."""
    settings = new_settings(bootstrap, home)
    asyncio.run(ensure_topics(settings))
    t = time.perf_counter()
    publish(settings, setup, envelopes=envelopes)
    publish(settings, calls, envelopes=envelopes)
    return settings, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--steady-users", type=int, default=200)
    parser.add_argument("--steady-events", type=int, default=500, help="measured events per old user")
    parser.add_argument("--steady-history", type=int, default=1_000,
                        help="events per user before measuring (fills a dedup window of this many ids)")
    parser.add_argument("--profile-seconds", type=float, default=20, help="0: no profiled run")
    parser.add_argument("--profile-dir", type=Path, default=ROOT / ".ledger" / "bench")
    parser.add_argument("--profile-plain", action="store_true",
                        help="profile a run on single-command records instead of envelopes")
    parser.add_argument("--no-two-workers", action="store_true", help="skip the two 2-worker runs")
    parser.add_argument("--floor-events", action="store_true", help="also run the do-nothing agent with stream.events()")
    args = parser.parse_args()
    # A new topic's partitions have no leader for a moment: the producer retries, and says so once per partition.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    home = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    setup, calls = workload(args.users, args.events)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    # One namespace per run: each run's group starts from offset 0 and writes its own entries topic. The ceiling
    # and the floor are per record: they read the namespace of one command per record, as other producers write.
    one, publish_s = fresh_namespace(bootstrap, home / "one", setup, calls, envelopes=False)
    namespaces = {one.namespace}
    runs: dict[str, Run] = {}
    floors: list[Floor] = []
    profile: Profile | None = None
    try:
        usage_topic = Topics.for_namespace(one.namespace).usage
        raw_n, raw_s = asyncio.run(raw_consume_rate(one, usage_topic))
        floors.append(faust_floor(one, usage_topic))
        if args.floor_events:
            floors.append(faust_floor(one, usage_topic, mode="events"))
        # The changelog is followed while it is written: it rolls a segment every 60 s and is compacted eagerly.
        runs["1 worker"] = processor_rate(one, args.events, workers=1, follow_changelog=True)
        young = runs["1 worker"].changelog
        assert young is not None
        enveloped, enveloped_publish_s = fresh_namespace(bootstrap, home / "enveloped", setup, calls)
        namespaces.add(enveloped.namespace)
        runs["1 worker, envelopes"] = processor_rate(enveloped, args.events, workers=1)
        if not args.no_two_workers:
            two, _ = fresh_namespace(bootstrap, home / "two", setup, calls)
            namespaces.add(two.namespace)
            runs["2 workers, envelopes"] = processor_rate(two, args.events, workers=2)
            two_bare, _ = fresh_namespace(bootstrap, home / "two-bare", setup, calls)
            namespaces.add(two_bare.namespace)
            runs["2 workers, envelopes, no standby"] = processor_rate(two_bare, args.events, workers=2, standby_replicas=0)
        if args.profile_seconds > 0:
            profiled, _ = fresh_namespace(bootstrap, home / "profiled", setup, calls, envelopes=not args.profile_plain)
            namespaces.add(profiled.namespace)
            profile = Profile(args.profile_dir / time.strftime("%Y%m%d-%H%M%S"), args.profile_seconds, [])
            name = "1 worker, profiled" if args.profile_plain else "1 worker, envelopes, profiled"
            runs[name] = processor_rate(profiled, args.events, workers=1, profile=profile)
        steady_settings = new_settings(bootstrap, home / "steady")
        asyncio.run(ensure_topics(steady_settings))
        namespaces.add(steady_settings.namespace)
        s_setup, s_calls = workload(args.steady_users, args.steady_users * (args.steady_history + args.steady_events),
                                    seed=2)
        split = args.steady_users * args.steady_history
        steady = steady_state(steady_settings, s_setup, s_calls[:split], s_calls[split:])
    finally:  # 200k records per namespace, on a shared broker
        delete_namespaces(bootstrap, namespaces)
    raw = raw_n / raw_s
    floor = floors[0]

    print(f"\nworkload: {args.events:,} usage events over {args.users:,} users, {one.partitions} partitions, "
          f"{os.cpu_count()} CPUs shared with the broker (and anyone else on the machine)")
    print(f"load average before the runs:                 {load_before}")
    print(f"publish (aiokafka producer, acks=all):        {args.events / publish_s:>10,.0f} events/s one per record, "
          f"{args.events / enveloped_publish_s:,.0f} events/s in envelopes")
    print("runs on single-command records unless named 'envelopes'")
    print(f"ceiling: raw aiokafka consume + decode:       {raw:>10,.0f} events/s (one consumer, same topic)")
    for f in floors:
        call = "take_events(5000, within=0.01)" if f.mode == "take_events" else "events()"
        print(f"floor: do-nothing Faust agent, {call}: {f.rate:,.0f} records/s, "
              f"{f.cpu_us_per_record:,.0f} CPU µs per record ({f.records:,} records, memory store, own group) "
              f"= {f.rate / raw:.1%} of the raw rate")
    for name, run in runs.items():
        shares = " / ".join(f"{n:,.0f}" for n in run.shares)
        print(f"processor, {name + ',':<36} sustained (10%..90%): {run.sustained:>8,.0f} events/s "
              f"= {run.sustained / floor.rate:.2f}x the do-nothing agent, {run.sustained / raw:.1%} of the raw rate, "
              f"{run.sustained / runs['1 worker'].sustained:.2f}x one worker on single-command records; "
              f"CPU {run.cpu_us_per_event:,.0f} µs per event (10%..90%), {run.cpu_s * 1e6 / args.events:,.0f} µs "
              f"over the whole process ({run.cpu_s:.0f} CPU-s); whole run {run.total_s:.1f} s, group settled after "
              f"{run.settled_s:.1f} s; records per worker {shares}")
    print(f"changelog, 1 worker, young users ({args.events // args.users} events each, followed while written):")
    print("  " + young.describe(args.events))
    print(f"changelog at steady state: {args.steady_users} old users ({args.steady_history:,} events each before), "
          f"then {args.steady_events} events each ({steady.events:,}), one worker: {steady.rate:,.0f} events/s "
          f"from their publish to their last entry, CPU {steady.cpu_us_per_event:,.0f} µs per event")
    print("  " + steady.changelog.describe(steady.events))
    if profile is not None:
        for problem in profile.problems:
            print(f"profile: {problem}")
        collapsed = profile.out_dir / "worker-profile.collapsed.txt"
        if collapsed.exists() and collapsed.stat().st_size:
            print(f"profile of the worker at full speed ({profile.seconds:.0f} s from 10% of the output, py-spy "
                  f"--nonblocking): {profile.out_dir}/worker-profile.speedscope.json (open in https://speedscope.app), "
                  f"{collapsed} (collapsed stacks)")
            print_top(collapsed)
    print(f"load average after the runs:                  {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"(other processes share these CPUs: compare within a run, not across runs)")


if __name__ == "__main__":
    main()
