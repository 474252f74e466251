"""The log topics keep every record: a topic created or altered to delete records stops the ledger loudly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams.topics import (
    KEPT_FOREVER,
    MESSAGE_BYTES,
    MESSAGE_BYTES_MIN,
    TopicConfigError,
    Topics,
    changelog_topic,
    ensure_topics,
)
from tests.conftest import new_settings

pytestmark = pytest.mark.integration

WEEK_MS = str(7 * 24 * 3600 * 1000)


async def _admin(bootstrap: str, action) -> None:  # type: ignore[no-untyped-def]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await action(admin)
    finally:
        await admin.close()


@pytest.mark.parametrize(("topic", "configs", "named"), [
    ("usage", {"retention.ms": WEEK_MS}, f"retention.ms={WEEK_MS}"),
    ("usage", {"cleanup.policy": "compact"}, "cleanup.policy=compact"),
    ("entries", {"retention.bytes": str(1024**3)}, f"retention.bytes={1024**3}"),
])
def test_a_log_topic_that_deletes_records_is_refused(bootstrap: str, tmp_path: Path, topic: str,
                                                    configs: dict[str, str], named: str) -> None:
    # Given a namespace whose topic an operator created with the broker's habits,
    settings = new_settings(bootstrap, tmp_path)
    name = getattr(Topics.for_namespace(settings.namespace), topic)
    asyncio.run(_admin(bootstrap, lambda a: a.create_topics([NewTopic(name, settings.partitions, 1, topic_configs=configs)])))
    _wait_listed(bootstrap, name)

    # when the ledger starts on it, it refuses and says what to change;
    with pytest.raises(TopicConfigError) as refused:
        asyncio.run(ensure_topics(settings))
    assert name in str(refused.value) and named in str(refused.value)
    assert "retention.ms=-1" in str(refused.value)

    # once the topic keeps everything, it starts.
    asyncio.run(_admin(bootstrap, lambda a: a.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, KEPT_FOREVER)])))
    assert _ensure_once_the_change_is_visible(settings).usage.endswith(".usage")


def _wait_listed(bootstrap: str, name: str, timeout_s: float = 30.0) -> None:
    """Until the broker lists a topic just created. ``ensure_topics`` checks only the log topics it finds listed:
    one created a moment before may not be listed yet, and then its create is refused as existing and its
    config goes unchecked, so the test would not see the refusal it is about."""
    async def listed() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return name in await admin.list_topics()
        finally:
            await admin.close()

    deadline = time.monotonic() + timeout_s
    while not asyncio.run(listed()):
        assert time.monotonic() < deadline, f"{name} not listed after {timeout_s}s"
        time.sleep(0.2)


def _ensure_once_the_change_is_visible(settings, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    """The broker applies an altered config through its metadata log: a describe right after may still show
    the old value. Retry until it does not, within a bound."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return asyncio.run(ensure_topics(settings))
        except TopicConfigError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.parametrize("topic", ["entries", "changelog"])
def test_a_topic_that_would_refuse_a_record_the_processor_may_write_is_refused(bootstrap: str, tmp_path: Path,
                                                                              topic: str) -> None:
    # Given an output topic (or the account changelog) created with a lower record limit than the processor's,
    settings = new_settings(bootstrap, tmp_path)
    name = (changelog_topic(settings.namespace) if topic == "changelog"
            else getattr(Topics.for_namespace(settings.namespace), topic))
    configs = {**KEPT_FOREVER, "max.message.bytes": "100000"}
    asyncio.run(_admin(bootstrap, lambda a: a.create_topics([NewTopic(name, settings.partitions, 1, topic_configs=configs)])))
    _wait_listed(bootstrap, name)

    # when the ledger starts on it, it refuses and names the setting and the fix;
    with pytest.raises(TopicConfigError) as refused:
        asyncio.run(ensure_topics(settings))
    assert name in str(refused.value) and "max.message.bytes=100000" in str(refused.value)
    assert f"--add-config max.message.bytes={MESSAGE_BYTES_MIN}" in str(refused.value)

    # once the topic takes them, it starts; and the topics it creates say so themselves.
    # (AlterConfigs replaces all of a topic's overrides: the retention ones are given again.)
    asyncio.run(_admin(bootstrap, lambda a: a.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name,
                                                                             {**KEPT_FOREVER, **MESSAGE_BYTES})])))
    _ensure_once_the_change_is_visible(settings)
    created = Topics.for_namespace(settings.namespace).gates
    assert asyncio.run(_override(bootstrap, created, "max.message.bytes")) == str(MESSAGE_BYTES_MIN)


DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs v1+: the value is the topic's own, not the broker's default


async def _override(bootstrap: str, topic: str, key: str) -> str | None:
    """The topic's own value of ``key``, or None where it has none (the broker's default applies)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {key: None})])
        [(_error, _message, _type, _name, entries)] = response.resources
        return next((entry[1] for entry in entries if entry[0] == key and entry[3] == DYNAMIC_TOPIC_CONFIG), None)
    finally:
        await admin.close()
