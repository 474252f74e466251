"""The ledger processor: decode a batch of usage-log records, fold each through
the domain core, and collect what to emit and what to store.

It holds no Kafka or Faust objects, so it runs the same in the agent and in
tests. Ordering per user comes from the partition; dedup and conflicts are the
core's (``ledger.account.decide``).

Two rules make a batch safe to apply again after a crash:

- The live state is never changed here. The fold works on copies
  (``ledger.account.clone``); the caller stores ``Batch.writes`` once the
  batch's outputs are durable, or drops them.
- Every stored value is stamped with the offset after the last record of its
  partition in the batch (``applied_to``). A record whose offset is below the
  stamp of the value it would change is already in that value, and its outputs
  were durable before the value was written: it is skipped (``already_applied``),
  however many records ago it was. Dedup by event id is for client retries.
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ledger.account import Account, Decision, PlanHistory, Result, Seen, clone, decide, within_horizon
from ledger.events import ClockTicked, Envelope, PlanPublished, Rejection, SpendQueried, user_key
from streams.codecs import decode_command, decode_record, decode_state, encode
from streams.state import Position, account_key, dedup_key, dedup_owner, partition_of, plan_key, position_key
from streams.topics import Topics, partition_for_key

log = logging.getLogger(__name__)

StateValue = Account | PlanHistory | Position | Seen
# Every record the processor writes (output or state), key and value, stays under this: below every topic's
# max.message.bytes (at least streams.topics.MESSAGE_BYTES_MIN, 1,048,588, checked at start-up) and its producers'
# max_request_size (streams.app.PRODUCER_REQUEST_BYTES_MAX), with room for headers and the batch's framing.
RECORD_BYTES_MAX = 1_000_000
# A dead letter quotes the rejected record; past this it quotes the start and says so.
DEAD_LETTER_PAYLOAD_CHARS_MAX = 64 * 1024
DEAD_LETTER_KEY_BYTES_MAX = 1024
ALREADY_APPLIED = "already_applied"
# A partition's remembered ids are swept (those past their account's horizon deleted) once it has remembered this
# many since the last sweep, and at least as many as the sweep before kept: a sweep reads every value in the table.
SWEEP_IDS_MIN = 20_000


def _decoded(value: Any) -> Any:
    """A state value, decoded if the table keeps it as the changelog holds it (``streams.codecs.kept_encoded``)."""
    return decode_state(value) if isinstance(value, bytes) else value


def too_large(key: bytes | str | None, value: bytes) -> bool:
    """Whether a record of this key and value would pass RECORD_BYTES_MAX."""
    return len(key or b"") + len(value) > RECORD_BYTES_MAX


@dataclass(frozen=True)
class Record:
    """One usage-log record as read from Kafka, or one command of an envelope record (``index``, its place in it)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    index: int | None = None

    @property
    def source_id(self) -> str:
        """The command's place in the log, unique and the same on every replay."""
        place = f"{self.topic}:{self.partition}:{self.offset}"
        return place if self.index is None else f"{place}:{self.index}"


@dataclass
class Batch:
    """What one batch produced: messages to send, then state to store, and what to count."""

    outputs: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)
    writes: dict[str, StateValue | None] = field(default_factory=dict)  # None deletes the key
    # One result per usage-log record: ok, duplicate, conflict, rejected (a tick is ok), or
    # already_applied (read again after a crash: its effects and outputs are durable already).
    results: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)  # by rejection code
    gates: Counter[str] = field(default_factory=Counter)  # by gate kind
    # The offset after the last record of each partition in the batch.
    next_offsets: dict[int, int] = field(default_factory=dict)
    # Each write as the changelog will hold it (None: a tombstone).
    encoded: dict[str, bytes | None] = field(default_factory=dict)

    def state_in_write_order(self) -> list[tuple[str, StateValue | None]]:
        """Remembered ids, then accounts, then plan histories, then positions.

        A partition's writes are one transaction, and a restore reads only committed
        ones; the order still makes any prefix of them safe to restore. An id is only seen
        while its number is within its account's count, so an id stored without its
        account means nothing, and the batch applied again stores it again; an account
        is never stored without the ids it counts. Accounts read plan histories (never
        the reverse), so a history is only ever newer than the accounts restored
        beside it if every account of the batch is stored too, and re-applying the
        batch's records then changes no account.
        """
        rank = {"d": 0, "a": 1, "p": 2, "pos": 3}
        return sorted(self.writes.items(), key=lambda kv: rank[kv[0].split(":", 2)[1]])


def merged(batches: list[Batch]) -> Batch:
    """The state of consecutive batches, as one batch of all their records would have written it: a later
    batch's value of a key replaces an earlier one's, and each partition's next offset is the last batch's.
    Outputs and counts stay with each batch."""
    if len(batches) == 1:
        return batches[0]
    state = Batch()
    for batch in batches:
        state.writes.update(batch.writes)
        state.encoded.update(batch.encoded)
        state.next_offsets.update(batch.next_offsets)
    return state


def commands_of(record: Record) -> list[tuple[Record, Any]]:
    """A record's commands, each with its own record (its bytes, its place) and its decoding or DecodeError."""
    try:
        decoded = decode_record(record.value or b"")
    except msgspec.DecodeError as exc:
        return [(record, exc)]
    if not isinstance(decoded, Envelope):
        return [(record, decoded)]
    units: list[tuple[Record, Any]] = []
    for index, raw in enumerate(decoded.commands):
        unit = Record(record.topic, record.partition, record.offset, record.key, bytes(raw), index)
        try:
            units.append((unit, decode_command(unit.value or b"")))
        except msgspec.DecodeError as exc:  # this command alone is dead-lettered
            units.append((unit, exc))
    return units


class UsageProcessor:
    def __init__(self, topics: Topics, read_state: Callable[[str], Any],
                 scan_state: Callable[[str], Iterable[tuple[str, Any]]] = lambda prefix: (), *, partitions: int) -> None:
        self.topics = topics
        self.partitions = partitions  # of the usage log: an envelope's commands must belong to its partition
        self._watched: frozenset[str] = frozenset()  # keys whose every new value is measured (see run)
        self._read_state = read_state
        self._scan_state = scan_state
        self.sweep_ids_min = SWEEP_IDS_MIN
        self._since_sweep: Counter[int] = Counter()  # per partition, ids remembered since its last sweep
        self._kept_at_sweep: Counter[int] = Counter()  # per partition, ids the last sweep kept

    def run(self, records: Iterable[Record]) -> Batch:
        """Fold records (each partition's in offset order, without gaps) into a batch; live state is not touched.

        A value that would be stored past RECORD_BYTES_MAX would fail its changelog write and stop the
        partition. The batch is then folded again watching those values: each command that would take
        one past the bound is dead-lettered (too_large) and leaves it as it was.
        """
        records = list(records)
        batch = self._run(records, frozenset())
        oversized = frozenset(key for key, raw in batch.encoded.items() if raw is not None and too_large(key, raw))
        if oversized:
            log.warning("state values would pass %s bytes; refusing the commands that take them there: %s",
                        RECORD_BYTES_MAX, sorted(oversized))
            batch = self._run(records, oversized)
        self._sweep(batch)  # once, on the batch that is kept
        return batch

    def _run(self, records: list[Record], watched: frozenset[str]) -> Batch:
        batch = Batch()
        self._watched = watched
        for record in records:
            batch.next_offsets[record.partition] = record.offset + 1
            for unit, command in commands_of(record):
                try:
                    result = self._apply(unit, command, batch)
                except Exception as exc:  # a poison command must not stop the partition: it alone is set aside
                    log.exception("processing failed on %s", unit.source_id)
                    self._reject(batch, unit, "internal_error", f"internal error: {type(exc).__name__}")
                    result = Result.rejected
                batch.results[result if isinstance(result, str) else result.value] += 1
        for key, value in batch.writes.items():
            if isinstance(value, Account | PlanHistory):
                value.applied_to = batch.next_offsets[partition_of(key)]
        for p, next_offset in batch.next_offsets.items():
            batch.writes[position_key(p)] = Position(partition=p, next_offset=next_offset)
        batch.encoded = {key: encode(value) for key, value in batch.writes.items()}  # tombstones come after (_sweep)
        return batch

    def _sweep(self, batch: Batch) -> None:
        """Delete remembered ids that have left their account's horizon, in partitions that remembered enough.

        What an id means never depends on a sweep (``within_horizon`` decides), so when
        one runs is free: it only bounds the table.
        """
        self._since_sweep.update(partition_of(key) for key, value in batch.writes.items() if isinstance(value, Seen))
        for p in batch.next_offsets:
            if self._since_sweep[p] < max(self.sweep_ids_min, self._kept_at_sweep[p]):
                continue
            kept, expired = 0, []
            for key, raw in self._scan_state(f"{p}:d:"):
                if key in batch.writes:
                    continue
                owner = dedup_owner(key)
                account = batch.writes[owner] if owner in batch.writes else self.stored(owner)
                if isinstance(account, Account) and within_horizon(account, _decoded(raw)) is not None:
                    kept += 1
                else:
                    expired.append(key)
            for key in expired:
                batch.writes[key] = batch.encoded[key] = None
            log.info("partition %s: swept %s remembered id(s) past their horizon, kept %s", p, len(expired), kept)
            self._since_sweep[p], self._kept_at_sweep[p] = 0, kept

    def stored(self, key: str) -> Any:
        """A stored value (decoded: the table may keep it as the changelog holds it)."""
        return _decoded(self._read_state(key))

    def answer(self, partition: int, query: SpendQueried) -> tuple[str, bytes, bytes] | None:
        """A spend query's reply (topic, key, value) from the stored state; it changes nothing."""
        account = self.stored(account_key(partition, query.tenant, query.user))
        try:
            decision = decide(account, query, lambda tenant, plan_id: self.stored(plan_key(partition, tenant, plan_id)))
        except Exception:  # a bug in the core must not stop the worker; the asker gets a 504
            log.exception("core failed on a spend query for %s/%s", query.tenant, query.user)
            return None
        if decision.reply is None:
            return None
        return self.topics.replies, decision.reply.request_id.encode(), encode(decision.reply)

    def read(self, batch: Batch, key: str) -> Any:
        """A value as this batch sees it: its own write, else a copy of the stored value that the fold may change."""
        if key in batch.writes:
            value = batch.writes[key]
            return clone(value) if key in self._watched and isinstance(value, Account) else value
        raw = self._read_state(key)
        if isinstance(raw, bytes):
            return decode_state(raw)  # a new object: the fold may change it
        return clone(raw) if isinstance(raw, Account) else raw  # plan histories are replaced, never changed

    def _apply(self, record: Record, command: Any, batch: Batch) -> Result | str:
        """Fold one command (or dead-letter why it did not decode): a plain record's, or one of an envelope's."""
        def read(key: str) -> Any:
            return self.read(batch, key)

        if isinstance(command, msgspec.DecodeError):
            self._reject(batch, record, "invalid_event", f"invalid event: {command}")
            return Result.rejected
        p = record.partition
        if record.index is not None and isinstance(command, ClockTicked | PlanPublished | SpendQueried):
            self._reject(batch, record, "invalid_event", f"invalid event: a {type(command).__name__} cannot travel in "
                         "an envelope (it belongs to every partition, or beside the log)", command)
            return Result.rejected
        if isinstance(command, ClockTicked):
            self._tick(command, record.offset, p, batch, read)
            return Result.ok
        if isinstance(command, PlanPublished):
            akey, stored = None, read(plan_key(p, command.tenant, command.plan.plan_id))
        else:
            akey = account_key(p, command.tenant, command.user)
            stored = read(akey)
            misplaced = self._misplaced(record, command, stored)
            if misplaced:
                self._reject(batch, record, "wrong_key", misplaced, command)
                return Result.rejected
        if stored is not None and record.offset < stored.applied_to:
            return ALREADY_APPLIED
        try:
            decision = decide(stored if akey else None, command,
                              lambda tenant, plan_id: read(plan_key(p, tenant, plan_id)),
                              lambda event_id: read(dedup_key(p, command.tenant, command.user, event_id)))
        except Exception as exc:  # a bug in the core must not stall the stream or lose the event
            log.exception("core failed on %s:%s@%s", record.topic, p, record.offset)
            self._reject(batch, record, "internal_error", f"internal error: {type(exc).__name__}", command)
            return Result.rejected
        if not self._collect(decision, record, command, akey, batch) and decision.result is Result.ok:
            return Result.rejected  # too large to emit
        return decision.result

    def _misplaced(self, record: Record, command: Any, stored: Any) -> str | None:
        """Why a user's command is in the wrong place of the log (its user's records must share one partition)."""
        expected = user_key(command.tenant, command.user).encode()
        if record.index is None:
            if record.key != expected:
                return (f"record key {record.key!r} must be {expected!r} (tenant/user) so that "
                        "one user's events share one partition")
            return None
        # In an envelope the record's key is not the user's: the partition is checked instead. An account
        # already in this partition was put here by a command checked before, so only a new one costs a hash.
        if stored is None and partition_for_key(expected, self.partitions) != record.partition:
            return (f"user {expected.decode()!r} belongs to partition {partition_for_key(expected, self.partitions)}, "
                    f"not {record.partition}: an envelope holds the commands of its own partition only")
        return None

    def _tick(self, tick: ClockTicked, offset: int, partition: int, batch: Batch, read: Callable[[str], Any]) -> None:
        """A clock tick applies to every account of its partition (that does not already hold it)."""
        prefix = f"{partition}:a:"
        keys = {key for key, _ in self._scan_state(prefix)} | {k for k in batch.writes if k.startswith(prefix)}
        for akey in sorted(keys):  # sorted: the same outputs in the same order on every replay
            account = read(akey)
            if offset < account.applied_to:
                continue
            decision = decide(account, tick, lambda tenant, plan_id: read(plan_key(partition, tenant, plan_id)))
            self._collect(decision, None, tick, akey, batch)

    def _collect(self, decision: Decision, record: Record | None, command: Any, akey: str | None, batch: Batch) -> bool:
        """Add a decision's outputs and state to the batch, all or nothing; False if it was dead-lettered instead."""
        if decision.result in (Result.rejected, Result.conflict):
            assert record is not None
            self._reject(batch, record, decision.code, decision.reason, command)
            return False
        outputs = []
        if decision.entry is not None:
            entry = decision.entry
            outputs.append((self.topics.entries, user_key(entry.tenant, entry.user).encode(), encode(entry)))
        for gate in decision.gates:
            outputs.append((self.topics.gates, user_key(gate.tenant, gate.user).encode(), encode(gate)))
        if decision.reply is not None:
            outputs.append((self.topics.replies, decision.reply.request_id.encode(), encode(decision.reply)))
        if record is not None and any(too_large(key, value) for _topic, key, value in outputs):
            self._reject(batch, record, "too_large", f"an output of this command would pass {RECORD_BYTES_MAX} "
                         "bytes; it is not applied", command)
            return False
        if self._watched:
            history = decision.plan_history
            changed = [(akey, decision.account)] if decision.account is not None and akey is not None else []
            if history is not None and record is not None:
                changed.append((plan_key(record.partition, history.tenant, history.plan_id), history))
            for key, value in changed:
                if key in self._watched and too_large(key, encode(value)):
                    if record is None:  # a clock tick never grows a value; leave this one as it was
                        return False
                    self._reject(batch, record, "too_large", f"the state this command changes would be stored as "
                                 f"more than {RECORD_BYTES_MAX} bytes; it is not applied", command)
                    return False
        if decision.account is not None and akey is not None:
            batch.writes[akey] = decision.account
        if decision.remembered is not None:
            assert akey is not None  # only a user's command is remembered
            event_id, seen = decision.remembered
            batch.writes[dedup_key(partition_of(akey), command.tenant, command.user, event_id)] = seen
        if decision.plan_history is not None:
            assert record is not None
            history = decision.plan_history
            batch.writes[plan_key(record.partition, history.tenant, history.plan_id)] = history
        for gate in decision.gates:
            batch.gates[gate.kind] += 1
        batch.outputs += outputs
        return True

    def _reject(self, batch: Batch, record: Record, code: str, reason: str, command: Any = None) -> None:
        raw = record.value or b""
        try:
            payload, encoding = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(raw).decode("ascii"), "base64"
        if len(payload) > DEAD_LETTER_PAYLOAD_CHARS_MAX:  # its source offset still finds the whole record
            payload, reason = payload[:DEAD_LETTER_PAYLOAD_CHARS_MAX], f"{reason} (payload truncated)"
        key = record.key[:DEAD_LETTER_KEY_BYTES_MAX] if record.key is not None else None
        rejection = Rejection(
            rejection_id=record.source_id,
            code=code, reason=reason,
            key=key.decode("utf-8", "replace") if key is not None else None,
            payload=payload, payload_encoding=encoding,
            source_topic=record.topic, source_partition=record.partition, source_offset=record.offset,
            tenant=getattr(command, "tenant", None), user=getattr(command, "user", None),
            event_id=getattr(command, "event_id", None),
        )
        batch.dead_letters[code] += 1
        batch.outputs.append((self.topics.rejected, key, encode(rejection)))
