"""`ledger webhooks`: the tenant's gate events, POSTed to each of its enabled endpoints, signed the
Standard Webhooks way, retried with exponential backoff, every attempt in the delivery log.

At least once. A consumer group reads the gates topic; each batch first becomes
pending rows of the delivery log (idempotent on endpoint + gate id) and only then
are its offsets committed, so a crash before the commit re-reads a batch that
adds nothing, and a crash after it leaves the rows for the dispatcher. The
dispatcher claims due rows with a lease, POSTs, and logs the outcome; a crash
mid-attempt leaves the row due again when the lease ends. A receiver can
therefore see an attempt twice: every attempt of a delivery carries the gate
event's id as ``webhook-id``, which is what receivers deduplicate on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from http import HTTPStatus

import httpx
import msgspec
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import CommitFailedError
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import IntegrityError

from ledger.control.store import ControlStore, DeliveryState, DueDelivery, Outbound
from ledger.control.webhook_urls import UnsafeURL, check_url
from ledger.events import GateEvent
from ledger.settings import Settings
from ledger_sdk.webhooks import sign
from streams.metrics import HealthServer, WebhookMetrics
from streams.topics import Topics, ensure_topics

log = logging.getLogger(__name__)

ATTEMPTS_MAX = 10
RETRY_FACTOR = 4              # 5 s, 20 s, 80 s, 5 min, 21 min, 85 min, 5.7 h, then every 6 h: about 19 h in all
RETRY_DELAY_S_MAX = 6 * 3600
RETRY_JITTER = 0.1            # +-10 %, so endpoints that failed together are not retried together
ATTEMPT_TIMEOUT_S = 15.0      # the spec recommends 15 to 30 s
ATTEMPT_LEASE_S = 60.0        # longer than any attempt: a claim outlives its attempt unless the process died
IN_FLIGHT_MAX = 16
GATE_BATCH_MAX = 500
POLL_TIMEOUT_MS = 500
DISPATCH_IDLE_S = 1.0
RESPONSE_EXCERPT_BYTES = 200
RECORD_TRIES_MAX = 3
GONE_REASON = "the endpoint answered 410 Gone and was disabled; register it again to resume deliveries"
# The delivery log keeps finished deliveries this long; pruned at most PRUNE_BATCH_MAX rows every PRUNE_EVERY_S.
DELIVERY_LOG_RETENTION = timedelta(days=30)
PRUNE_EVERY_S = 3600.0
PRUNE_BATCH_MAX = 10_000
USER_AGENT = "usage-ledger-webhooks/1"

# Money as exact JSON numbers, as the API writes it.
_encoder = msgspec.json.Encoder(decimal_format="number")
_gate_decoder = msgspec.json.Decoder(GateEvent)


def webhooks_group(settings: Settings) -> str:
    return f"{settings.namespace}-webhooks"


def retry_delay_s(failed_attempts: int, first_s: float, jitter: float = 0.0) -> float:
    """How long to wait after the ``failed_attempts``-th failure; ``jitter`` in [-1, 1] scales RETRY_JITTER."""
    base = min(first_s * RETRY_FACTOR ** (failed_attempts - 1), RETRY_DELAY_S_MAX)
    return float(base * (1 + RETRY_JITTER * jitter))


def retry_after(value: str | None, now: datetime) -> float:
    """Seconds a ``Retry-After`` header asks for (delay-seconds or an HTTP date), at most RETRY_DELAY_S_MAX; 0 if none."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return 0.0
        if when.tzinfo is None:
            return 0.0
        seconds = (when - now).total_seconds()
    return float(min(max(seconds, 0.0), RETRY_DELAY_S_MAX))


def outbound(record_value: bytes, timestamp_ms: int) -> Outbound | None:
    """The delivery of one gate-topic record, or None (logged) for a record that is not a gate event."""
    try:
        event = _gate_decoder.decode(record_value)
    except msgspec.DecodeError as exc:
        log.warning("skipping a gates record that is not a gate event: %s", exc)
        return None
    return Outbound(tenant_id=event.tenant, event_id=event.gate_id, payload=_encoder.encode(event).decode(),
                    written_at=datetime.fromtimestamp(timestamp_ms / 1000, UTC))


@dataclass(frozen=True)
class Outcome:
    """One attempt, as the delivery log records it."""

    due: DueDelivery
    state: DeliveryState
    at: datetime
    status: int | None
    error: str | None
    next_attempt_at: datetime | None
    # The endpoint answered 410 Gone: it is disabled, and its other pending deliveries fail.
    gone: bool = False


class WebhookDispatcher:
    def __init__(self, settings: Settings, store: ControlStore, *, http: httpx.AsyncClient | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), metrics: WebhookMetrics | None = None
                 ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics or WebhookMetrics(CollectorRegistry())
        self.clock = clock
        self._http = http
        self._wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Read gate events and deliver them until ``stop`` is set; attempts under way are finished."""
        await ensure_topics(self.settings)
        async with contextlib.AsyncExitStack() as stack:
            if self._http is None:
                # No redirects: a 3xx is a failure (the spec's advice), and a redirect could lead anywhere.
                self._http = await stack.enter_async_context(httpx.AsyncClient(
                    timeout=ATTEMPT_TIMEOUT_S, follow_redirects=False, headers={"user-agent": USER_AGENT}))
            ingest = asyncio.create_task(self._ingest(stop))
            try:
                await self._dispatch(stop, ingest)
            finally:
                ingest.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ingest

    async def _ingest(self, stop: asyncio.Event) -> None:
        topic = Topics.for_namespace(self.settings.namespace).gates
        # From the earliest offset a new group has not committed: endpoints get only the events written after
        # they were registered (Outbound.written_at), so history is never replayed to them.
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=self.settings.bootstrap,
                                    group_id=webhooks_group(self.settings), enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            while not stop.is_set():
                self.metrics.health.beat(True, f"reading {topic} and delivering")
                batch = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=GATE_BATCH_MAX)
                if not batch:
                    continue
                events = [e for records in batch.values() for r in records if r.value is not None
                          and (e := outbound(r.value, r.timestamp)) is not None]
                added = await asyncio.to_thread(self._record, events)
                # Only now: every delivery of the batch is in the log, pending until it is delivered or given up.
                try:
                    await consumer.commit()
                except CommitFailedError as exc:
                    # The partitions moved to another member during the batch: it reads the batch again, and
                    # recording it again adds nothing.
                    log.warning("offsets not committed (%s); the batch will be read again", exc)
                else:  # counted once: a batch read again after a failed commit is counted then
                    self.metrics.gates_read.inc(len(events))
                    self.metrics.deliveries_recorded.inc(added)
                if added:
                    log.info("%d gate events: %d deliveries to make", len(events), added)
                    self._wake.set()
        finally:
            await consumer.stop()

    def _record(self, events: list[Outbound]) -> int:
        for _ in range(RECORD_TRIES_MAX - 1):
            try:
                with self.store.session() as session:
                    return session.record_deliveries(events, self.clock())
            except IntegrityError:
                # Another process recorded some of these (a partition changing hands): the next pass skips them.
                log.info("deliveries recorded concurrently; recording the batch again")
        with self.store.session() as session:
            return session.record_deliveries(events, self.clock())

    def _prune(self) -> None:
        with self.store.session() as session:
            forgotten = session.prune_deliveries(self.clock() - DELIVERY_LOG_RETENTION, PRUNE_BATCH_MAX)
        if forgotten:
            log.info("forgot %d deliveries finished more than %s ago", forgotten, DELIVERY_LOG_RETENTION)

    def _settle_and_claim(self, outcomes: list[Outcome], limit: int) -> list[DueDelivery]:
        """Log finished attempts and claim the next due deliveries, in one unit of work."""
        now = self.clock()
        with self.store.session() as session:
            for o in outcomes:
                session.record_attempt(o.due.webhook_id, o.due.event_id, state=o.state, at=o.at, status=o.status,
                                       error=o.error, next_attempt_at=o.next_attempt_at)
                if o.gone:
                    session.disable_webhook(o.due.webhook_id, GONE_REASON)
                    log.warning("webhook endpoint %s (%s) answered 410 Gone: disabled", o.due.webhook_id, o.due.url)
            claimed = session.claim_due(now, now + timedelta(seconds=ATTEMPT_LEASE_S), limit) if limit > 0 else []
        for o in outcomes:  # once the unit of work that logs them has committed
            self.metrics.attempts.labels(o.state.value).inc()
        return claimed

    async def _dispatch(self, stop: asyncio.Event, ingest: asyncio.Task[None]) -> None:
        # An attempt's outcome is logged with the next claim: until then a crash leaves its row leased,
        # so it is attempted again when the lease ends, as after a crash mid-attempt.
        in_flight: set[asyncio.Task[Outcome]] = set()
        outcomes: list[Outcome] = []

        def finished() -> list[Outcome]:
            done = {t for t in in_flight if t.done()}
            in_flight.difference_update(done)
            return [t.result() for t in done]

        pruned_at = -PRUNE_EVERY_S
        try:
            while not stop.is_set():
                if ingest.done():
                    ingest.result()  # the consumer failed: stop the process, so it is restarted
                if time.monotonic() - pruned_at >= PRUNE_EVERY_S:
                    pruned_at = time.monotonic()
                    await asyncio.to_thread(self._prune)
                self._wake.clear()
                outcomes += finished()
                free = IN_FLIGHT_MAX - len(in_flight)
                # Log and refill when half the slots are free, so the unit of work (a commit) serves a batch.
                if free * 2 >= IN_FLIGHT_MAX:
                    claimed = await asyncio.to_thread(self._settle_and_claim, outcomes, free)
                    outcomes = []
                    in_flight.update(asyncio.create_task(self._attempt(due)) for due in claimed)
                waiters = {asyncio.create_task(self._wake.wait()), asyncio.create_task(stop.wait())}
                await asyncio.wait({*waiters, ingest, *in_flight}, timeout=DISPATCH_IDLE_S,
                                   return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
        finally:
            if in_flight:
                await asyncio.wait(in_flight)
            await asyncio.to_thread(self._settle_and_claim, outcomes + finished(), 0)

    async def _attempt(self, due: DueDelivery) -> Outcome:
        assert self._http is not None
        at = self.clock()
        timestamp = int(at.timestamp())
        body = due.payload.encode()
        headers = {"content-type": "application/json", "webhook-id": due.event_id,
                   "webhook-timestamp": str(timestamp), "webhook-signature": sign(due.secret, due.event_id, timestamp, body)}
        status: int | None = None
        error: str | None = None
        retry_after_s = 0.0
        try:
            # Checked before every attempt: what a name resolves to can change after registration.
            await check_url(due.url, allow_private=self.settings.webhook_allow_private)
            async with self._http.stream("POST", due.url, content=body, headers=headers) as response:
                status = response.status_code
                retry_after_s = retry_after(response.headers.get("retry-after"), at)
                if not 200 <= status < 300:
                    excerpt = b""
                    async for chunk in response.aiter_bytes():
                        excerpt += chunk
                        if len(excerpt) >= RESPONSE_EXCERPT_BYTES:
                            break
                    error = f"HTTP {status}: {excerpt[:RESPONSE_EXCERPT_BYTES].decode(errors='replace')}"
        except UnsafeURL as exc:
            error = str(exc)
        except Exception as exc:  # whatever breaks one attempt (e.g. httpx.InvalidURL) fails that attempt only
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        attempt = due.attempts + 1
        if error is None:
            state, next_at = DeliveryState.delivered, None
        elif attempt >= ATTEMPTS_MAX or status == HTTPStatus.GONE:
            state, next_at = DeliveryState.failed, None
        else:
            delay = retry_delay_s(attempt, self.settings.webhook_retry_first_s, random.uniform(-1, 1))
            # A receiver that asks for more time (429, 503) gets it, up to the longest delay of the schedule.
            delay = max(delay, retry_after_s)
            state, next_at = DeliveryState.pending, self.clock() + timedelta(seconds=delay)
        log.info("webhook %s to %s: attempt %d, %s%s", due.event_id, due.url, attempt, state.value,
                 f" ({error})" if error else "")
        return Outcome(due, state, at, status, error, next_at, gone=status == HTTPStatus.GONE)


def run_webhooks(settings: Settings) -> None:
    """Run the delivery process in the foreground until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    store = ControlStore(settings.control_url)
    store.create_schema()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("delivering the gate events of %s to webhooks (group %s)", settings.namespace,
                 webhooks_group(settings))
        metrics = WebhookMetrics(CollectorRegistry())
        server = (HealthServer.for_metrics(settings.metrics_host, settings.metrics_port, metrics).start()
                  if settings.metrics_port else None)
        try:
            await WebhookDispatcher(settings, store, metrics=metrics).run(stop)
        finally:
            if server is not None:
                server.stop()

    try:
        asyncio.run(main())
    finally:
        store.dispose()
