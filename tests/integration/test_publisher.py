"""The usage-log publisher on the real broker: concurrent calls coalesce into envelopes, and each returns once its
commands are in the log."""

from __future__ import annotations

import asyncio

import pytest

from ledger.settings import Settings
from ledger_sdk.envelopes import ENVELOPE_KEY
from streams.publisher import UsagePublisher
from streams.topics import Topics
from tests.factories import usage
from tests.kafka_io import read_partitions, usage_log

pytestmark = pytest.mark.integration


def test_concurrent_publishes_share_envelopes_and_each_returns_once_its_commands_are_in_the_log(settings: Settings):
    commands = [usage(f"u{n % 50}", n) for n in range(400)]

    async def go() -> list[int]:
        async with UsagePublisher(settings) as publisher:
            async def one(command) -> int:  # type: ignore[no-untyped-def]
                await publisher.publish([command])
                return sum(1 for _p, _k, c in await asyncio.to_thread(usage_log, settings) if c == command)
            # Each call finds its command in the log when it returns (a sample: reading the log is slow).
            found = await asyncio.gather(*(one(c) for c in commands[:5]),
                                         *(publisher.publish([c]) for c in commands[5:]))
            return [n for n in found if n is not None]

    assert asyncio.run(go()) == [1] * 5
    # Every command is in the log once, and the 400 calls took far fewer records than commands.
    assert sorted(c.event_id for _p, _k, c in usage_log(settings)) == sorted(c.event_id for c in commands)
    records = [key for rows in read_partitions(settings, Topics.for_namespace(settings.namespace).usage).values()
               for key, _value in rows]
    assert ENVELOPE_KEY in records and len(records) <= 4 * settings.partitions, len(records)


def test_one_command_per_record_when_asked(settings: Settings):
    commands = [usage("u1", n) for n in range(10)]

    async def go() -> None:
        async with UsagePublisher(settings) as publisher:
            await publisher.publish(commands, envelopes=False)

    asyncio.run(go())
    assert [(key, c.event_id) for _p, key, c in usage_log(settings)] == [(b"acme/u1", c.event_id) for c in commands]
