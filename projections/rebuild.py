"""Rebuild the history file from offset 0: project every ledger entry, gate event and dead letter into a
fresh DuckDB file next to the live one, then swap it in atomically.

The swap happens while this process holds the live file's lock, so a projector that is running keeps its
batches whole: it either commits to the old file before the swap, or notices the new file (by identity)
and resumes from the offsets stored in it (``Projector.run``). Readers see the old file or the new one,
never a half-built one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from aiokafka import TopicPartition

from ledger.settings import Settings
from projections.projector import Projector, connect
from streams.progress import end_offsets
from streams.topics import Topics

REBUILD_SUFFIX = ".rebuild"

Progress = Callable[[int, int], None]  # (records done, records in total)


@dataclass(frozen=True)
class RebuildResult:
    path: Path
    records: int
    entries: int
    gates: int
    rejections: int
    seconds: float


class _CountingProjector(Projector):
    def __init__(self, settings: Settings, path: Path, progress: Progress | None, total: int) -> None:
        super().__init__(settings, path, bulk=True)
        self._progress = progress
        self._total = total

    def write(self, batch: Iterable[tuple[TopicPartition, list]]) -> bool:  # type: ignore[type-arg]
        written = super().write(batch)
        if self._progress is not None:
            self._progress(self.rows_written, self._total)
        return written


def staging_path(live: Path) -> Path:
    """Where the new file is built: beside the live one, so the final rename stays on one file system."""
    return live.with_name(live.name + REBUILD_SUFFIX)


def rebuild(settings: Settings, *, path: Path | None = None, progress: Progress | None = None) -> RebuildResult:
    """Replay the output topics from offset 0 into a fresh file and swap it in place of ``path``."""
    import time

    live = path or settings.history_path
    live.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(live)
    for leftover in (staging, Path(f"{staging}.wal")):  # a rebuild that died half way
        leftover.unlink(missing_ok=True)
    topics = Topics.for_namespace(settings.namespace)
    total = sum(asyncio.run(end_offsets(settings, (topics.entries, topics.gates, topics.rejected))).values())
    started = time.perf_counter()
    projector = _CountingProjector(settings, staging, progress, total)
    asyncio.run(projector.run(until_caught_up=True))
    projector.finish()
    with connect(staging) as con:
        con.execute("CHECKPOINT")  # everything in the main file: no WAL travels with the rename
        counts = [con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
                  for table in ("ledger_entries", "gate_events", "rejected_events")]
    swap_in(staging, live)
    if progress is not None:
        progress(projector.rows_written, max(total, projector.rows_written))
    return RebuildResult(path=live, records=projector.rows_written, entries=counts[0], gates=counts[1],
                         rejections=counts[2], seconds=time.perf_counter() - started)


def swap_in(staging: Path, live: Path) -> None:
    """Replace the live file by the staged one (atomic rename on one file system)."""
    if not live.exists():
        os.replace(staging, live)
        return
    # Hold the live file's lock across the rename: no projector is between BEGIN and COMMIT on it, and
    # its WAL is checkpointed, so no stale WAL can be replayed onto the new file.
    with connect(live) as con:
        con.execute("CHECKPOINT")
        os.replace(staging, live)
