"""Writes commands to the usage log: keyed by user, plan versions to every partition."""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import AIOKafkaProducer

from ledger.events import AnyCommand, ClockTicked, PlanPublished, user_key
from ledger.settings import Settings
from streams.codecs import encode
from streams.topics import Topics, ensure_topics

PLANS_KEY = b"~plans"
CLOCK_KEY = b"~clock"


class UsagePublisher:
    """An idempotent aiokafka producer for the usage log (acks from all replicas)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics.for_namespace(settings.namespace)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap, acks="all", enable_idempotence=True,
            # No linger: a check's command goes out at once. Concurrent sends still share a request, as
            # what arrives while one is in flight waits for the next.
            linger_ms=0, max_batch_size=256 * 1024,
        )
        self._partitions: list[int] = []

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
        await self._producer.stop()

    async def publish(self, commands: Iterable[AnyCommand]) -> int:
        """Send commands in order and wait until the broker has them all."""
        pending = []
        for command in commands:
            value = encode(command)
            if isinstance(command, PlanPublished | ClockTicked):  # every partition needs to see these
                key = PLANS_KEY if isinstance(command, PlanPublished) else CLOCK_KEY
                for partition in self._partitions:
                    pending.append(await self._producer.send(self.topics.usage, value, key=key, partition=partition))
            else:
                key = user_key(command.tenant, command.user).encode()
                pending.append(await self._producer.send(self.topics.usage, value, key=key))
        for fut in pending:
            await fut
        return len(pending)

    async def publish_raw(self, key: bytes | None, value: bytes) -> None:
        """Send bytes as they are (tests of bad input use this)."""
        await self._producer.send_and_wait(self.topics.usage, value, key=key)
