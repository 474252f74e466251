"""How requests reach the ledger: bounded retries over HTTP, and a Kafka producer for high volumes.

A retry resends the same request: the same event ids, the same bytes. That is what makes a
retry safe for usage (the ledger counts an event id once) and for a reserving check (it carries
its reservation id, and the ledger confirms a reservation it already holds instead of holding the
estimate twice).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from ledger_sdk._errors import TransportError, error_for
from ledger_sdk._types import Outcome, UsageEvent
from ledger_sdk.envelopes import enveloped

RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_AFTER_S_MAX = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter; ``Retry-After`` wins when the server sends it."""

    attempts_max: int = 4
    backoff_s_initial: float = 0.2
    backoff_s_max: float = 5.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.attempts_max <= 20:
            raise ValueError(f"attempts_max must be between 1 and 20, got {self.attempts_max}")
        if self.backoff_s_initial < 0 or self.backoff_s_max < self.backoff_s_initial:
            raise ValueError("backoff_s_initial must be >= 0 and <= backoff_s_max")

    def delay_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, RETRY_AFTER_S_MAX)
        ceiling = min(self.backoff_s_max, self.backoff_s_initial * 2 ** (attempt - 1))
        return self.rng.uniform(0, ceiling)


def retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: use our own backoff
        return None


def retry_delay_s(policy: RetryPolicy, attempt: int, outcome: httpx.Response | httpx.TransportError) -> float | None:
    """Seconds to wait before the next attempt, or None to stop here (success, or not retryable)."""
    if attempt >= policy.attempts_max:
        return None
    if isinstance(outcome, httpx.TransportError):
        return policy.delay_s(attempt)
    if outcome.status_code in RETRY_STATUSES:
        return policy.delay_s(attempt, retry_after_s(outcome))
    return None


def transport_error(exc: httpx.TransportError, attempts: int) -> TransportError:
    return TransportError(f"{type(exc).__name__} after {attempts} attempt(s): {exc}")


def raise_for_status(response: httpx.Response) -> None:
    """Raise the SDK's exception for an error status (402 is handled by the caller)."""
    if response.is_success:
        return
    try:
        detail = str(response.json().get("detail", response.text))
    except ValueError:
        detail = response.text or response.reason_phrase
    raise error_for(response.status_code, detail, retry_after_s(response))


# -- Kafka ------------------------------------------------------------------------------------------------------------


class KafkaUsageTransport:
    """Publishes usage straight onto the ledger's usage topic with aiokafka, in each user's partition (the key
    ``tenant/user``'s), a partition's events in envelopes.

    For high-volume producers inside the deployment: no API round trip, so the only outcome is
    ``accepted`` (durably in the log; the processor dedups by event id and dead-letters invalid
    events with their reason). ``tenant_id`` is the tenant's id from the control plane.
    """

    def __init__(self, bootstrap_servers: str, tenant_id: str, *, namespace: str = "ledger",
                 producer_options: dict[str, Any] | None = None) -> None:
        self.topic = f"{namespace}.usage"
        self.tenant_id = tenant_id
        self._options: dict[str, Any] = {"bootstrap_servers": bootstrap_servers, "acks": "all",
                                         "enable_idempotence": True, "linger_ms": 5, **(producer_options or {})}
        self._producer: Any = None

    async def __aenter__(self) -> KafkaUsageTransport:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]  # only Kafka producers need it

        self._producer = AIOKafkaProducer(**self._options)
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    def encode(self, event: UsageEvent) -> tuple[bytes, bytes]:
        """(key, value) as the usage log holds them (README, "Topics and their schemas")."""
        value = {"type": "usage", "tenant": self.tenant_id, "schema_version": 1, **msgspec.to_builtins(event)}
        return f"{self.tenant_id}/{event.user}".encode(), msgspec.json.encode(value)

    def records(self, events: Sequence[UsageEvent], partitions: list[int]) -> list[tuple[int, bytes, bytes]]:
        """(partition, key, value) of the records that carry ``events``: each user's in the partition the
        default partitioner gives its key, a partition's consecutive events in envelopes (ledger_sdk.envelopes)."""
        from aiokafka.partitioner import DefaultPartitioner  # type: ignore[import-untyped]

        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, value in map(self.encode, events):
            by_partition.setdefault(DefaultPartitioner()(key, partitions, partitions), []).append((key, value))
        return [(p, key, value) for p, items in by_partition.items() for key, value in enveloped(items)]

    async def send(self, events: Sequence[UsageEvent]) -> list[Outcome]:
        if self._producer is None:
            raise RuntimeError("start the KafkaUsageTransport (async with) before sending")
        from aiokafka.errors import KafkaError  # type: ignore[import-untyped]

        try:
            partitions = sorted(await self._producer.partitions_for(self.topic))
            futures = [await self._producer.send(self.topic, value, key=key, partition=p)
                       for p, key, value in self.records(events, partitions)]
            for future in futures:  # the broker has each event once this returns
                await future
        except KafkaError as exc:
            raise TransportError(f"the usage topic did not take the events: {exc!r}") from exc
        return [Outcome(event_id=e.event_id, status="accepted") for e in events]
