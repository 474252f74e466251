"""The ledger processor: decode a batch of usage-log records, fold each through
the domain core, and collect what to emit and what to store.

It holds no Kafka or Faust objects, so it runs the same in the agent and in
tests. Ordering per user comes from the partition; dedup and conflicts are the
core's (``ledger.account.decide``).
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ledger.account import Account, Decision, PlanHistory, Result, decide
from ledger.events import ClockTicked, PlanPublished, Rejection, user_key
from streams.codecs import decode_command, encode
from streams.topics import Topics

log = logging.getLogger(__name__)

StateValue = Account | PlanHistory


@dataclass(frozen=True)
class Record:
    """One usage-log record as read from Kafka."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class Batch:
    """What one batch produced: messages to send, then state to store, and what to count."""

    outputs: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)
    writes: dict[str, StateValue] = field(default_factory=dict)
    # One result per usage-log record: ok, duplicate, conflict or rejected (a tick is ok).
    results: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)  # by rejection code
    gates: Counter[str] = field(default_factory=Counter)  # by gate kind
    # The offset after the last record of each partition in the batch.
    next_offsets: dict[int, int] = field(default_factory=dict)


def account_key(partition: int, tenant: str, user: str) -> str:
    # The partition is part of every table key: it names the changelog partition
    # the value lives in, so state stays with the partition that owns the user.
    return f"{partition}:a:{user_key(tenant, user)}"


def plan_key(partition: int, tenant: str, plan_id: str) -> str:
    return f"{partition}:p:{tenant}/{plan_id}"


def partition_of(table_key: str) -> int:
    return int(table_key.split(":", 1)[0])


class UsageProcessor:
    def __init__(self, topics: Topics, read_state: Callable[[str], Any],
                 scan_state: Callable[[str], Iterable[tuple[str, Any]]] = lambda prefix: ()) -> None:
        self.topics = topics
        self._read_state = read_state
        self._scan_state = scan_state

    def run(self, records: Iterable[Record]) -> Batch:
        batch = Batch()
        for record in records:
            batch.results[self._apply(record, batch).value] += 1
            batch.next_offsets[record.partition] = record.offset + 1
        return batch

    def _apply(self, record: Record, batch: Batch) -> Result:
        def read(key: str) -> Any:
            return batch.writes[key] if key in batch.writes else self._read_state(key)

        try:
            command = decode_command(record.value or b"")
        except msgspec.DecodeError as exc:
            self._reject(batch, record, "invalid_event", f"invalid event: {exc}")
            return Result.rejected
        p = record.partition
        if isinstance(command, ClockTicked):
            self._tick(command, p, batch, read)
            return Result.ok
        if not isinstance(command, PlanPublished):
            expected = user_key(command.tenant, command.user).encode()
            if record.key != expected:
                self._reject(batch, record, "wrong_key",
                             f"record key {record.key!r} must be {expected!r} (tenant/user) so that "
                             "one user's events share one partition", command)
                return Result.rejected
        akey = None if isinstance(command, PlanPublished) else account_key(p, command.tenant, command.user)
        try:
            decision = decide(read(akey) if akey else None, command,
                              lambda tenant, plan_id: read(plan_key(p, tenant, plan_id)))
        except Exception as exc:  # a bug in the core must not stall the stream or lose the event
            log.exception("core failed on %s:%s@%s", record.topic, p, record.offset)
            self._reject(batch, record, "internal_error", f"internal error: {type(exc).__name__}", command)
            return Result.rejected
        self._collect(decision, record, command, akey, batch)
        return decision.result

    def _tick(self, tick: ClockTicked, partition: int, batch: Batch, read: Callable[[str], Any]) -> None:
        """A clock tick applies to every account of its partition."""
        prefix = f"{partition}:a:"
        keys = {key for key, _ in self._scan_state(prefix)} | {k for k in batch.writes if k.startswith(prefix)}
        for akey in sorted(keys):  # sorted: the same outputs in the same order on every replay
            account = read(akey)
            decision = decide(account, tick, lambda tenant, plan_id: read(plan_key(partition, tenant, plan_id)))
            self._collect(decision, None, tick, akey, batch)

    def _collect(self, decision: Decision, record: Record | None, command: Any, akey: str | None, batch: Batch) -> None:
        if decision.result in (Result.rejected, Result.conflict):
            assert record is not None
            self._reject(batch, record, decision.code, decision.reason, command)
            return
        if decision.account is not None and akey is not None:
            batch.writes[akey] = decision.account
        if decision.plan_history is not None:
            assert record is not None
            history = decision.plan_history
            batch.writes[plan_key(record.partition, history.tenant, history.plan_id)] = history
        if decision.entry is not None:
            entry = decision.entry
            batch.outputs.append((self.topics.entries, user_key(entry.tenant, entry.user).encode(), encode(entry)))
        for gate in decision.gates:
            batch.gates[gate.kind] += 1
            batch.outputs.append((self.topics.gates, user_key(gate.tenant, gate.user).encode(), encode(gate)))
        if decision.reply is not None:
            batch.outputs.append((self.topics.replies, decision.reply.request_id.encode(), encode(decision.reply)))

    def _reject(self, batch: Batch, record: Record, code: str, reason: str, command: Any = None) -> None:
        raw = record.value or b""
        try:
            payload, encoding = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(raw).decode("ascii"), "base64"
        rejection = Rejection(
            rejection_id=f"{record.topic}:{record.partition}:{record.offset}",
            code=code, reason=reason,
            key=record.key.decode("utf-8", "replace") if record.key is not None else None,
            payload=payload, payload_encoding=encoding,
            source_topic=record.topic, source_partition=record.partition, source_offset=record.offset,
            tenant=getattr(command, "tenant", None), user=getattr(command, "user", None),
            event_id=getattr(command, "event_id", None),
        )
        batch.dead_letters[code] += 1
        batch.outputs.append((self.topics.rejected, record.key, encode(rejection)))
