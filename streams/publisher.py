"""Writes commands to the usage log: a user's to the user's partition, plan versions and ticks to every partition.

A user's commands go out in envelopes (``ledger.events.Envelope``): the consecutive
commands of one partition share one record, since the processor's consumer pays
per record. A lone command is a plain record keyed by its user, as any other
producer writes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer

from ledger.events import AnyCommand, ClockTicked, PlanPublished, user_key
from ledger.settings import Settings
from ledger_sdk.envelopes import enveloped
from streams.codecs import encode
from streams.topics import Topics, ensure_topics, partition_for_key

PLANS_KEY = b"~plans"
CLOCK_KEY = b"~clock"


def usage_records(commands: Iterable[AnyCommand], partitions: int, envelopes: bool = True
                  ) -> list[tuple[int, bytes, bytes]]:
    """The records (partition, key, value) that carry ``commands``, each partition's in the commands' order.

    With ``envelopes``, the consecutive user commands of a partition (between two broadcasts)
    share envelopes (``ledger_sdk.envelopes.enveloped``, bounded in commands and bytes).
    """
    records: list[tuple[int, bytes, bytes]] = []
    waiting: dict[int, list[tuple[bytes, bytes]]] = {}  # per partition: (key, value) of user commands not yet out

    def flush() -> None:
        for p, items in waiting.items():
            records.extend((p, key, value) for key, value in (enveloped(items) if envelopes else items))
        waiting.clear()

    for command in commands:
        value = encode(command)
        if isinstance(command, PlanPublished | ClockTicked):  # every partition needs to see these
            flush()
            key = PLANS_KEY if isinstance(command, PlanPublished) else CLOCK_KEY
            records.extend((p, key, value) for p in range(partitions))
        else:
            key = user_key(command.tenant, command.user).encode()
            waiting.setdefault(partition_for_key(key, partitions), []).append((key, value))
    flush()
    return records


class UsagePublisher:
    """An idempotent aiokafka producer for the usage log (acks from all replicas).

    Concurrent ``publish`` calls coalesce: while one send waits for the broker, the
    commands of the calls that arrive meanwhile gather, and go out together in the
    next send, a partition's in shared envelopes. An idle publisher sends at once, so
    a lone check waits for nobody; under load, records carry many commands.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics.for_namespace(settings.namespace)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap, acks="all", enable_idempotence=True,
            # No linger: a check's command goes out at once (see the class's docstring for what waits).
            linger_ms=0, max_batch_size=256 * 1024,
        )
        self._partitions: list[int] = []
        self._gathering: list[tuple[list[AnyCommand], asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def __aenter__(self) -> UsagePublisher:
        await ensure_topics(self.settings)
        await self._producer.start()
        try:
            self._partitions = sorted(await self._producer.partitions_for(self.topics.usage))
        except BaseException:
            await self._producer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)
        await self._producer.stop()

    async def publish(self, commands: Iterable[AnyCommand], *, envelopes: bool = True) -> None:
        """Send commands (see ``usage_records``) and return once the broker has them all.

        ``envelopes=False`` sends one command per record, at once, as other producers write them.
        """
        if not envelopes:
            await self._send(list(commands), envelopes=False)
            return
        sent = asyncio.get_running_loop().create_future()
        self._gathering.append((list(commands), sent))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_gathered())
        await sent

    async def _send_gathered(self) -> None:
        while self._gathering:
            taken, self._gathering = self._gathering, []
            try:
                await self._send([command for commands, _ in taken for command in commands], envelopes=True)
            except Exception as exc:  # every caller whose commands were in this send learns it
                for _, sent in taken:
                    if not sent.done():
                        sent.set_exception(exc)
            except BaseException:  # cancelled (the publisher stops): no caller waits for good
                for _, sent in taken + self._gathering:
                    sent.cancel()
                raise
            else:
                for _, sent in taken:
                    if not sent.done():  # a caller that gave up (cancelled) has its commands sent all the same
                        sent.set_result(None)

    async def _send(self, commands: list[AnyCommand], envelopes: bool) -> None:
        pending = [await self._producer.send(self.topics.usage, value, key=key, partition=p)
                   for p, key, value in usage_records(commands, len(self._partitions), envelopes)]
        for fut in pending:
            await fut

    async def publish_raw(self, key: bytes | None, value: bytes) -> None:
        """Send bytes as they are (tests of bad input use this)."""
        await self._producer.send_and_wait(self.topics.usage, value, key=key)
