"""Looking at a worker from outside: its CPU and memory in /proc, its changelog on the broker, a py-spy profile.

Nothing here imports the processor's state types: the state layout is the processor's business, and these
figures must stay meaningful when it changes. Changelog records are grouped by the kind their key names
(``"<partition>:<kind>:..."``, streams/state.py), whatever the kinds are.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.topics import partitions_of


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, every thread included (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (the resident peak) of a live process, in MB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) / 1024
    return out


@dataclass
class KindStats:
    records: int = 0
    key_bytes: int = 0
    value_bytes: int = 0
    value_max: int = 0

    @property
    def bytes(self) -> int:
        return self.key_bytes + self.value_bytes


@dataclass
class Changelog:
    """What a range of a changelog topic holds."""

    records: int = 0
    offsets_spanned: int = 0  # end - start over the partitions: more than ``records`` once compaction removed some
    bytes: int = 0  # len(key) + len(value) of every record read
    value_max: int = 0
    kinds: dict[str, KindStats] = field(default_factory=dict)

    def describe(self, events: int) -> str:
        removed = self.offsets_spanned - self.records
        lines = [f"{self.bytes / max(events, 1):,.0f} bytes of changelog written per usage event "
                 f"({self.bytes:,} bytes in {self.records:,} records for {events:,} events, "
                 f"{self.records / max(events, 1):.3f} records per event); largest value {self.value_max:,} bytes"
                 + (f"; {removed:,} of {self.offsets_spanned:,} offsets hold no record (transaction markers; "
                    f"compacted away, if the tail fell behind)"
                    if removed else "")]
        for kind, k in sorted(self.kinds.items(), key=lambda kv: -kv[1].bytes):
            lines.append(f"    key kind {kind!r:>8}: {k.records:>9,} records, {k.bytes:>13,} bytes, "
                         f"mean value {k.value_bytes / max(k.records, 1):>8,.0f} bytes, largest {k.value_max:,}")
        return "\n".join(lines)


def _kind(key: bytes | None) -> str:
    if key is None:
        return "none"
    try:
        text = json.loads(key)
    except ValueError:
        text = key.decode(errors="replace")
    parts = str(text).split(":")
    return parts[1] if len(parts) > 1 else "other"


async def changelog_ends(bootstrap: str, topic: str) -> dict[int, int]:
    parts = (await partitions_of(bootstrap, (topic,)))[topic]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


def _count(out: Changelog, key: bytes | None, value: bytes | None) -> None:
    k, v = len(key or b""), len(value or b"")
    kind = out.kinds.setdefault(_kind(key), KindStats())
    kind.records += 1
    kind.key_bytes += k
    kind.value_bytes += v
    kind.value_max = max(kind.value_max, v)
    out.records += 1
    out.bytes += k + v
    out.value_max = max(out.value_max, v)


class ChangelogTail:
    """Reads a changelog while it is written, so compaction cannot remove a record before it is counted.

    The changelog rolls a segment every 60 s and is compacted eagerly (streams/app.py): read after a run of a few
    minutes, most of what the run wrote is gone. A thread follows the topic from ``start`` (default: its beginning;
    it may not exist yet: the worker creates it) and ``stop`` reads on to the end offsets at that moment.
    Read committed, as a restore reads it: aborted transactions (a fenced batch) do not count.
    """

    def __init__(self, bootstrap: str, topic: str, start: dict[int, int] | None = None) -> None:
        self.bootstrap, self.topic, self.start_offsets = bootstrap, topic, start
        self.out = Changelog()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="changelog-tail", daemon=True)

    def start(self) -> ChangelogTail:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 120) -> Changelog:
        self._stop.set()
        self._thread.join(timeout_s)
        if self._error is not None:
            raise self._error
        return self.out

    def _run(self) -> None:
        try:
            asyncio.run(self._follow())
        except BaseException as e:  # handed to stop()
            self._error = e

    async def _follow(self) -> None:
        while True:
            try:
                parts = (await partitions_of(self.bootstrap, (self.topic,)))[self.topic]
            except (KeyError, RuntimeError):
                parts = []
            if parts or self._stop.is_set():
                break
            await asyncio.sleep(0.5)
        if not parts:
            return
        tps = [TopicPartition(self.topic, p) for p in parts]
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", isolation_level="read_committed",
                                    max_partition_fetch_bytes=16 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
        await consumer.start()
        try:
            consumer.assign(tps)
            for tp in tps:
                if self.start_offsets and tp.partition in self.start_offsets:
                    consumer.seek(tp, self.start_offsets[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
            firsts = {tp: await consumer.position(tp) for tp in tps}
            ends: dict[TopicPartition, int] | None = None
            idle_since = time.monotonic()
            while True:
                if ends is None and self._stop.is_set():
                    ends = await consumer.end_offsets(tps)
                    self.out.offsets_spanned = sum(ends[tp] - firsts[tp] for tp in tps)
                if ends is not None and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                    return
                batch = await consumer.getmany(timeout_ms=200, max_records=50_000)
                if batch:
                    idle_since = time.monotonic()
                elif ends is not None and time.monotonic() - idle_since > 10:  # only markers left before the end
                    return
                for tp, records in batch.items():
                    for r in records:
                        if ends is None or r.offset < ends[tp]:
                            _count(self.out, r.key, r.value)
        finally:
            await consumer.stop()


# -- py-spy ----------------------------------------------------------------------------------------------------------


def py_spy() -> str | None:
    """The py-spy next to this interpreter (the dev extras install it), else one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_profile(pid: int, out_dir: Path, seconds: float, rate_hz: int = 100) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """Start two py-spy recorders of ``pid`` (speedscope for a look, raw collapsed stacks to rank functions).

    ``--nonblocking``: the worker is never paused to be sampled, so its speed is (nearly) what it is unprofiled.
    """
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed: pip install py-spy (it is in the dev extras)")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = []
    for fmt, name in (("speedscope", "worker-profile.speedscope.json"), ("raw", "worker-profile.collapsed.txt")):
        path = out_dir / name
        log = open(out_dir / f"py-spy-{fmt}.log", "wb")
        started.append((subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                          "--rate", str(rate_hz), "--nonblocking", "--format", fmt, "-o", str(path)],
                                         stdout=log, stderr=subprocess.STDOUT), path))
    return started


def finish_profile(recorders: list[tuple[subprocess.Popen[bytes], Path]], timeout_s: float) -> list[str]:
    """Wait for the recorders; returns a problem per recorder that wrote nothing (empty: all fine)."""
    problems = []
    for proc, path in recorders:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=10)
        if not path.exists() or path.stat().st_size == 0:
            log = path.parent / f"py-spy-{'raw' if path.suffix == '.txt' else 'speedscope'}.log"
            tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
            problems.append(f"py-spy wrote no {path.name} (exit {proc.returncode}): {tail.strip()}")
    return problems


_LINE = re.compile(r":\d+\)$")


def top_own(collapsed: Path, n: int = 15) -> tuple[int, list[tuple[str, int]]]:
    """Functions ranked by own samples (the leaf of each collapsed stack), lines folded into their function."""
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        own[_LINE.sub(")", leaf)] += int(count)
        total += int(count)
    return total, own.most_common(n)


def print_top(collapsed: Path, n: int = 15) -> None:
    total, top = top_own(collapsed, n)
    print(f"top {n} functions by own samples ({total:,} samples, idle excluded):")
    for name, count in top:
        print(f"  {count / max(total, 1):6.1%}  {count:>7,}  {name}")

