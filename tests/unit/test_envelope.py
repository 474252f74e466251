"""Envelopes: many commands of one partition in one usage-log record, each applied as if it were alone."""

from __future__ import annotations

from datetime import timedelta

import msgspec

from ledger import events
from ledger.account import Account
from ledger.events import ClockTicked, Envelope, LedgerEntry, Rejection, user_key
from ledger_sdk.envelopes import ENVELOPE_BYTES_MAX, ENVELOPE_COMMANDS_MAX, ENVELOPE_KEY
from streams.codecs import decode_command, decode_record, decode_state, encode
from streams.processor import ALREADY_APPLIED, Batch, Record, UsageProcessor
from streams.publisher import PLANS_KEY, usage_records
from streams.state import account_key
from streams.topics import Topics, partition_for_key
from tests.factories import T0, TENANT, assigned, published, seed_plans, usage

TOPICS = Topics.for_namespace("t")
PARTITIONS = 4


def users_of(partition: int, count: int) -> list[str]:
    """``count`` user names whose records belong to ``partition`` of PARTITIONS."""
    names = (f"u{n}" for n in range(10_000))
    return [u for u in names if partition_for_key(user_key(TENANT, u).encode(), PARTITIONS) == partition][:count]


def commands(users: list[str]) -> list:  # type: ignore[type-arg]
    plans = seed_plans()
    out = [published(plans["free"]), published(plans["pro"])]
    out += [assigned(u, plans["pro"] if i % 2 else plans["free"]) for i, u in enumerate(users)]
    out += [usage(u, n, input_tokens=40_000 * (n + 1), output_tokens=20_000) for n in range(6) for u in users]
    out += [ClockTicked(event_id="tick-1", occurred_at=T0 + timedelta(days=40))]
    out += [usage(u, 9, at=T0 + timedelta(days=40, minutes=1)) for u in users]
    out += [usage(users[0], 9, at=T0 + timedelta(days=40, minutes=1))]  # a retry of the same event: a duplicate
    return out


def log_of(cmds: list, partition: int, envelopes: bool) -> list[Record]:  # type: ignore[type-arg]
    records = [(key, value) for p, key, value in usage_records(cmds, PARTITIONS, envelopes) if p == partition]
    return [Record(TOPICS.usage, partition, offset, key, value) for offset, (key, value) in enumerate(records)]


def processor(table: dict[str, object]) -> UsageProcessor:
    return UsageProcessor(TOPICS, table.get, lambda prefix: [(k, v) for k, v in table.items() if k.startswith(prefix)],
                          partitions=PARTITIONS)


def fold(log: list[Record], size: int = 3) -> tuple[dict[str, object], list[tuple[str, bytes | None, bytes]], Batch]:
    """Apply the log in batches of ``size`` records; the table, every output, and the last batch."""
    table: dict[str, object] = {}
    outputs: list[tuple[str, bytes | None, bytes]] = []
    batch = Batch()
    for i in range(0, len(log), size):
        batch = processor(table).run(log[i:i + size])
        outputs += batch.outputs
        for key, value in batch.state_in_write_order():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    return table, outputs, batch


def accounts(table: dict[str, object]) -> dict[str, Account]:
    return {k: decode_state(encode(v)) for k, v in table.items() if isinstance(v, Account)}


def entries(outputs: list[tuple[str, bytes | None, bytes]]) -> list[LedgerEntry]:
    return [msgspec.json.decode(v, type=LedgerEntry) for topic, _k, v in outputs if topic == TOPICS.entries]


def rejections(outputs: list[tuple[str, bytes | None, bytes]]) -> list[Rejection]:
    return [msgspec.json.decode(v, type=Rejection) for topic, _k, v in outputs if topic == TOPICS.rejected]


def test_a_partitions_commands_share_envelopes_and_apply_as_plain_records_do() -> None:
    # Given a partition's users, their plans, usage, a tick and a retry, published plain and in envelopes,
    p, users = 2, users_of(2, 5)
    cmds = commands(users)
    plain, enveloped = log_of(cmds, p, envelopes=False), log_of(cmds, p, envelopes=True)
    assert len(enveloped) < len(plain) // 5 and any(r.key == ENVELOPE_KEY for r in enveloped)
    assert [r.key for r in enveloped[:2]] == [PLANS_KEY, PLANS_KEY]  # broadcasts stay plain, in their place
    # then the accounts, the entries and the gates are the same either way,
    plain_table, plain_out, _ = fold(plain)
    env_table, env_out, _ = fold(enveloped)
    strip = {"applied_to": 0}
    assert {k: msgspec.structs.replace(a, **strip) for k, a in accounts(env_table).items()} == {
        k: msgspec.structs.replace(a, **strip) for k, a in accounts(plain_table).items()}
    assert entries(env_out) == entries(plain_out) and len(entries(env_out)) == len(users) * 7
    gates = [v for t, _k, v in plain_out if t == TOPICS.gates]
    assert gates and [v for t, _k, v in env_out if t == TOPICS.gates] == gates
    # and the retry inside an envelope is a duplicate, as it is on its own.
    assert rejections(env_out) == [] and rejections(plain_out) == []


def test_an_envelope_read_again_after_a_crash_changes_nothing_and_replays_byte_for_byte() -> None:
    p, users = 1, users_of(1, 4)
    cmds = commands(users)
    log = log_of(cmds, p, envelopes=True)
    table, outputs, _ = fold(log)
    _, replayed, _ = fold(log)  # a fresh table: a replay from offset 0
    assert replayed == outputs
    read_again = processor(table).run(log)
    # Everything re-read from offset 0 (commits lost): each command (a tick aside) is known by its record's offset.
    assert read_again.outputs == []
    assert read_again.results[ALREADY_APPLIED] == sum(1 for c in cmds if not isinstance(c, ClockTicked))


def test_a_bad_command_in_an_envelope_is_dead_lettered_alone_with_its_own_place_and_payload() -> None:
    # Given an envelope of three users' usage between commands that are not valid, or not of its partition,
    p, (ann, bob, cid) = 0, users_of(0, 3)
    setup = log_of([published(seed_plans()["free"])] + [assigned(u, seed_plans()["free"]) for u in (ann, bob, cid)],
                   p, envelopes=False)
    bad = msgspec.json.encode({**msgspec.to_builtins(usage(bob, 1)), "input_tokens": -5})
    other = users_of(3, 1)[0]  # a user of another partition
    envelope = Envelope(commands=[msgspec.Raw(encode(usage(ann, 1))), msgspec.Raw(bad), msgspec.Raw(b'{"type":"usage","x":1}'),
                                  msgspec.Raw(encode(usage(other, 1))), msgspec.Raw(encode(usage(cid, 1))),
                                  msgspec.Raw(encode(ClockTicked(event_id="tick-x", occurred_at=T0)))])
    log = setup + [Record(TOPICS.usage, p, len(setup), ENVELOPE_KEY, encode(envelope))]
    table, outputs, batch = fold(log, size=len(setup))  # the last batch: the envelope alone
    # then ann's and cid's usage is applied,
    assert sorted(e.user for e in entries(outputs)) == sorted([ann, cid])
    # and each bad command gets its own dead letter: its place in the envelope, its own bytes, its reason.
    dead = {r.rejection_id: r for r in rejections(outputs)}
    offset = len(setup)
    assert sorted(dead) == [f"{TOPICS.usage}:{p}:{offset}:{i}" for i in (1, 2, 3, 5)]
    assert dead[f"{TOPICS.usage}:{p}:{offset}:1"].payload == bad.decode()
    assert dead[f"{TOPICS.usage}:{p}:{offset}:1"].code == "invalid_event"
    assert dead[f"{TOPICS.usage}:{p}:{offset}:2"].payload == '{"type":"usage","x":1}'
    assert dead[f"{TOPICS.usage}:{p}:{offset}:3"].code == "wrong_key" and "partition 3" in dead[
        f"{TOPICS.usage}:{p}:{offset}:3"].reason
    assert "cannot travel in an envelope" in dead[f"{TOPICS.usage}:{p}:{offset}:5"].reason
    assert account_key(p, TENANT, other) not in table
    assert batch.results["ok"] == 2 and batch.results["rejected"] == 4


def test_usage_records_keep_each_partitions_order_and_bound_each_envelope() -> None:
    users = users_of(0, 2) + users_of(1, 2)
    big = [usage(users[0], n, event_id=f"e{n:05d}" + "x" * 100) for n in range(3000)]
    cmds = [usage(u, 0) for u in users] + [published(seed_plans()["free"])] + big + [usage(users[2], 1)]
    records = usage_records(cmds, PARTITIONS)
    by_partition: dict[int, list[str]] = {}
    for p, key, value in records:
        assert len(value) <= ENVELOPE_BYTES_MAX
        decoded = msgspec.json.decode(value)
        inner = decoded["commands"] if key == ENVELOPE_KEY else [decoded]
        by_partition.setdefault(p, []).extend(c["event_id"] for c in inner)
    # Each partition sees its users' commands and the plan in the order they were given, each exactly once.
    for p in range(PARTITIONS):
        expected = [c.event_id for c in cmds
                    if not hasattr(c, "user") or partition_for_key(user_key(c.tenant, c.user).encode(), PARTITIONS) == p]
        assert by_partition[p] == expected
    assert sum(1 for _p, key, _v in records if key == ENVELOPE_KEY) > 3000 * 150 // ENVELOPE_BYTES_MAX


def test_an_envelope_that_is_not_json_is_one_dead_letter() -> None:
    record = Record(TOPICS.usage, 0, 0, ENVELOPE_KEY, b'{"type":"envelope","commands":[{"type":"usage"}, {oops')
    _, outputs, batch = fold([record])
    assert [r.rejection_id for r in rejections(outputs)] == [f"{TOPICS.usage}:0:0"]
    assert batch.results["rejected"] == 1


def test_the_sdks_envelope_bound_is_the_ledgers() -> None:
    assert ENVELOPE_COMMANDS_MAX == events.ENVELOPE_COMMANDS_MAX


def test_the_sdks_kafka_transport_sends_each_users_events_to_its_partition_in_envelopes() -> None:
    from ledger_sdk import KafkaUsageTransport, UsageEvent

    transport = KafkaUsageTransport("127.0.0.1:1", "acme")  # never started: records() needs no broker
    sent = [UsageEvent(user=f"u{n % 7}", model="gpt-4o-mini", input_tokens=n, output_tokens=1) for n in range(100)]
    records = transport.records(sent, list(range(PARTITIONS)))
    assert len(records) < len(sent) // 10
    received = []
    for p, key, value in records:
        raw = [bytes(c) for c in decode_record_commands(value)] if key == ENVELOPE_KEY else [value]
        for command in map(decode_command, raw):
            assert partition_for_key(user_key(command.tenant, command.user).encode(), PARTITIONS) == p
            received.append(command.event_id)
    by_user = {u: [e.event_id for e in sent if e.user == u] for u in {e.user for e in sent}}
    assert sorted(received) == sorted(e.event_id for e in sent)
    assert all([i for i in received if i in ids] == ids for ids in by_user.values())  # each user's order kept


def decode_record_commands(value: bytes) -> list[msgspec.Raw]:
    envelope = decode_record(value)
    assert isinstance(envelope, Envelope)
    return envelope.commands
