"""Topic names and their creation. Every topic of one namespace has the same partition count."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from ledger.settings import Settings

# Usage is the source of truth: never deleted by age or size.
LEADER_WAIT_S_MAX = 30.0
KEEP_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}
# What an existing log topic must say: deleted by nothing, and never compacted (compaction keeps one record per key,
# that is one event per user).
KEPT_FOREVER = {**KEEP_FOREVER, "cleanup.policy": "delete"}
# Spend queries are questions, not facts: kept an hour, long enough for any worker to answer them.
TRANSIENT = {"retention.ms": str(3600 * 1000)}
# The largest record batch every topic of a namespace (and the account changelog) must accept: the broker's default
# message.max.bytes. The processor keeps each record it writes within streams.processor.RECORD_BYTES_MAX (1,000,000
# bytes, key included) and dead-letters a command that would pass it (too_large); a topic whose limit is lower would
# refuse such a write, and a refused state write stops the worker, again at every restart. So topics are created with
# this limit, and an existing one with less is refused at start-up.
MESSAGE_BYTES_MIN = 1_048_588
MESSAGE_BYTES = {"max.message.bytes": str(MESSAGE_BYTES_MIN)}


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition a keyed record goes to, as every producer of ours picks it (murmur2, as Kafka's Java client)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class TopicConfigError(RuntimeError):
    """An existing topic would lose records; the message names the setting and how to fix it."""


@dataclass(frozen=True)
class Topics:
    usage: str
    entries: str
    gates: str
    rejected: str
    replies: str
    queries: str

    @classmethod
    def for_namespace(cls, namespace: str) -> Topics:
        return cls(
            usage=f"{namespace}.usage",
            entries=f"{namespace}.entries",
            gates=f"{namespace}.gates",
            rejected=f"{namespace}.rejected",
            replies=f"{namespace}.replies",
            queries=f"{namespace}.queries",
        )

    def all(self) -> tuple[str, ...]:
        return (self.usage, self.entries, self.gates, self.rejected, self.replies, self.queries)

    def kept_forever(self) -> tuple[str, ...]:
        """The log, and the outputs a history rebuild reads from offset 0 (replies are transient)."""
        return (self.usage, self.entries, self.gates, self.rejected)


async def ensure_topics(settings: Settings) -> Topics:
    """Create the namespace's topics if they are missing (idempotent)."""
    topics = Topics.for_namespace(settings.namespace)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, settings.partitions, 1,
                     topic_configs={**(TRANSIENT if name == topics.queries else KEEP_FOREVER), **MESSAGE_BYTES})
            for name in topics.all()
            if name not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process won the race
                await admin.create_topics(missing)
            await _wait_for_leaders(admin, [t.name for t in missing])
        if existing_logs := [name for name in topics.kept_forever() if name in existing]:
            await _check_kept_forever(admin, existing_logs, settings.bootstrap)
        written = [*topics.all(), changelog_topic(settings.namespace)]
        if existing_written := [name for name in written if name in existing]:
            await _check_message_bytes(admin, existing_written, settings.bootstrap)
    finally:
        await admin.close()
    return topics


async def _check_kept_forever(admin: AIOKafkaAdminClient, names: list[str], bootstrap: str) -> None:
    """Refuse to run on a log topic someone created or altered to delete records: they would vanish silently.

    A late event is accepted however old it is (it corrects history), and a replay
    or rebuild reads from offset 0, so a finite retention loses events without a trace.
    """
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, dict.fromkeys(KEPT_FOREVER)) for name in names]
    for response in await admin.describe_configs(resources):
        for _error, _message, _type, name, entries in response.resources:
            actual = {entry[0]: entry[1] for entry in entries}
            wrong = {key: actual.get(key) for key, value in KEPT_FOREVER.items() if actual.get(key) != value}
            if wrong:
                found = ", ".join(f"{key}={value}" for key, value in wrong.items())
                needed = ",".join(f"{key}={value}" for key, value in KEPT_FOREVER.items())
                raise TopicConfigError(
                    f"topic {name} has {found}: the ledger's log topics must keep every record ({needed}), or "
                    f"events older than the retention are lost. Fix: kafka-configs.sh --bootstrap-server {bootstrap} "
                    f"--alter --entity-type topics --entity-name {name} --add-config {needed}")


async def _check_message_bytes(admin: AIOKafkaAdminClient, names: list[str], bootstrap: str) -> None:
    """Refuse to run on a topic that would refuse a record the processor may write (see MESSAGE_BYTES_MIN)."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, dict.fromkeys(MESSAGE_BYTES)) for name in names]
    for response in await admin.describe_configs(resources):
        for error, message, _type, name, entries in response.resources:
            if error:
                raise TopicConfigError(f"topic {name}: the broker did not describe its configuration (error {error}: "
                                       f"{message}), so its record limit cannot be checked")
            actual = {entry[0]: entry[1] for entry in entries}.get("max.message.bytes")
            if actual is None or int(actual) < MESSAGE_BYTES_MIN:
                raise TopicConfigError(
                    f"topic {name} has max.message.bytes={actual}: the ledger writes records of up to "
                    f"{MESSAGE_BYTES_MIN} bytes to it, and a refused write stops the worker. Fix: kafka-configs.sh "
                    f"--bootstrap-server {bootstrap} --alter --entity-type topics --entity-name {name} "
                    f"--add-config max.message.bytes={MESSAGE_BYTES_MIN}")


ACCOUNTS_TABLE = "accounts"


def processor_app_id(namespace: str) -> str:
    """The processor's Faust app id, which is also its consumer group."""
    return f"{namespace}-processor"


def changelog_topic(namespace: str) -> str:
    """The account table's changelog, which Faust creates and names ``<app id>-<table>-changelog``."""
    return f"{processor_app_id(namespace)}-{ACCOUNTS_TABLE}-changelog"


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    """New partitions refuse writes until they have a leader; wait for that."""
    deadline = time.monotonic() + LEADER_WAIT_S_MAX
    while time.monotonic() < deadline:
        described = await admin.describe_topics(names)
        if all(t.get("error_code", 0) == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
               for t in described):
            return
        await asyncio.sleep(0.1)


async def partitions_of(bootstrap: str, names: tuple[str, ...]) -> dict[str, list[int]]:
    """Partition numbers of each named topic that exists."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(names))
    finally:
        await admin.close()
    return {t["topic"]: sorted(p["partition"] for p in t["partitions"])
            for t in described if t.get("error_code", 0) == 0 and t["partitions"]}


async def broker_problem(bootstrap: str, timeout_s: float) -> str | None:
    """None if the cluster answers a metadata request within ``timeout_s``, else what went wrong."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)
    except Exception as exc:  # any failure is the answer, not a crash of the probe
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        await client.close()
    return None
