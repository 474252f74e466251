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

Tenants are isolated: each has at most TENANT_IN_FLIGHT_MAX attempts in flight, claims go round
the tenants, and every attempt ends within ATTEMPT_TIMEOUT_S, so one tenant's slow or hanging
endpoints only ever hold its own slots. A control-database error stops nothing: the step is
retried with a bounded backoff (docs/webhooks.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import TypeVar

import httpx
import msgspec
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import CommitFailedError
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ledger.control.store import ControlStore, DeliveryState, DueDelivery, Outbound
from ledger.control.webhook_urls import UnsafeURL, check_form
from ledger.events import GateEvent
from ledger.settings import Settings
from ledger_sdk.webhooks import sign
from streams.metrics import HealthServer, WebhookMetrics
from streams.topics import Topics, ensure_topics
from streams.webhook_transport import delivery_client, error_class

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTEMPTS_MAX = 10
RETRY_FACTOR = 4              # 5 s, 20 s, 80 s, 5 min, 21 min, 85 min, 5.7 h, then every 6 h: about 19 h in all
RETRY_DELAY_S_MAX = 6 * 3600
RETRY_JITTER = 0.1            # +-10 %, so endpoints that failed together are not retried together
# A whole attempt (resolve, connect, send, the answer's status line and headers) ends within this; connecting
# and each read are bounded tighter (streams/webhook_transport.py). The spec recommends 15 to 30 s.
ATTEMPT_TIMEOUT_S = 15.0
ATTEMPT_LEASE_S = 60.0        # longer than any attempt: a claim outlives its attempt unless the process died
IN_FLIGHT_MAX = 64
# One tenant's attempts in flight: its hanging endpoints hold at most these slots, never another tenant's.
TENANT_IN_FLIGHT_MAX = 8
# Lookups run on a pool of their own (a slow name server holds a thread past its timeout), never the database's.
RESOLVER_THREADS_MAX = 2 * IN_FLIGHT_MAX
GATE_BATCH_MAX = 500
POLL_TIMEOUT_MS = 500
DISPATCH_IDLE_S = 1.0
RECORD_TRIES_MAX = 3
# A control-database error (locked, unreachable) is retried after 0.5 s, 1 s, 2 s, ... at most DB_RETRY_S_MAX.
DB_RETRY_FIRST_S = 0.5
DB_RETRY_S_MAX = 10.0
GONE_REASON = "the endpoint answered 410 Gone and was disabled; register it again to resume deliveries"
# The delivery log keeps finished deliveries this long; pruned at most PRUNE_BATCH_MAX rows every PRUNE_EVERY_S.
DELIVERY_LOG_RETENTION = timedelta(days=30)
PRUNE_EVERY_S = 3600.0
PRUNE_BATCH_MAX = 10_000

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
        self._database_failing = False  # the last control-database step failed: not ready until one succeeds

    async def run(self, stop: asyncio.Event) -> None:
        """Read gate events and deliver them until ``stop`` is set; attempts under way are finished."""
        await ensure_topics(self.settings)
        async with contextlib.AsyncExitStack() as stack:
            if self._http is None:
                resolver = stack.enter_context(ThreadPoolExecutor(RESOLVER_THREADS_MAX, "webhook-dns"))
                self._http = await stack.enter_async_context(delivery_client(
                    allow_private=self.settings.webhook_allow_private, connections_max=IN_FLIGHT_MAX,
                    executor=resolver))
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
                self.metrics.health.beat(not self._database_failing, "the control database is failing"
                                         if self._database_failing else f"reading {topic} and delivering")
                batch = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=GATE_BATCH_MAX)
                if not batch:
                    continue
                events = [e for records in batch.values() for r in records if r.value is not None
                          and (e := outbound(r.value, r.timestamp)) is not None]
                # Until the batch is in the log its offsets stay uncommitted, however long the database is away.
                added = await self._with_database("record a batch of gate events", self._record, events, stop=stop)
                if added is None:
                    break  # stopping: the batch is read again by whoever reads next
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

    async def _with_database(self, what: str, step: Callable[..., T], *args: object,
                             stop: asyncio.Event | None = None) -> T | None:
        """``step(*args)`` in a thread, retried with a bounded backoff while the control database fails.

        With ``stop``, retried until it succeeds or ``stop`` is set (then None); without, tried once (None on
        failure), for steps the caller retries on its own schedule.
        """
        delay = DB_RETRY_FIRST_S
        while True:
            try:
                result = await asyncio.to_thread(step, *args)
            except SQLAlchemyError as exc:
                self._database_failing = True
                self.metrics.health.beat(False, f"the control database failed ({type(exc).__name__}); retrying")
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if stop is None:
                    log.warning("could not %s, the control database failed: %s; trying again later", what, first_line)
                    return None
                log.warning("could not %s, the control database failed: %s; retrying in %.1f s", what, first_line,
                            delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return None
                delay = min(delay * 2, DB_RETRY_S_MAX)
            else:
                self._database_failing = False
                return result

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

    def _settle_and_claim(self, outcomes: list[Outcome], limit: int, busy: dict[str, int]) -> list[DueDelivery]:
        """Log finished attempts and claim the next due deliveries (fair between tenants), in one unit of work."""
        now = self.clock()
        with self.store.session() as session:
            for o in outcomes:
                session.record_attempt(o.due.webhook_id, o.due.event_id, state=o.state, at=o.at, status=o.status,
                                       error=o.error, next_attempt_at=o.next_attempt_at)
                if o.gone:
                    session.disable_webhook(o.due.webhook_id, GONE_REASON)
                    log.warning("webhook endpoint %s (%s) answered 410 Gone: disabled", o.due.webhook_id, o.due.url)
            claimed = session.claim_due(now, now + timedelta(seconds=ATTEMPT_LEASE_S), limit,
                                        tenant_limit=TENANT_IN_FLIGHT_MAX, busy=busy) if limit > 0 else []
        for o in outcomes:  # once the unit of work that logs them has committed
            self.metrics.attempts.labels(o.state.value).inc()
        return claimed

    async def _dispatch(self, stop: asyncio.Event, ingest: asyncio.Task[None]) -> None:
        # An attempt's outcome is logged with the next claim: until then a crash leaves its row leased,
        # so it is attempted again when the lease ends, as after a crash mid-attempt.
        in_flight: dict[asyncio.Task[Outcome], str] = {}  # each attempt and its tenant
        outcomes: list[Outcome] = []

        def finished() -> list[Outcome]:
            done = [t for t in in_flight if t.done()]
            for t in done:
                del in_flight[t]
            return [t.result() for t in done]

        pruned_at = -PRUNE_EVERY_S
        claimed_at = -DISPATCH_IDLE_S
        database_retry_at = 0.0
        database_delay_s = DB_RETRY_FIRST_S
        try:
            while not stop.is_set():
                if ingest.done():
                    ingest.result()  # the consumer failed: stop the process, so it is restarted
                if time.monotonic() - pruned_at >= PRUNE_EVERY_S:
                    pruned_at = time.monotonic()
                    await self._with_database("prune the delivery log", self._prune)
                woken = self._wake.is_set()
                self._wake.clear()
                outcomes += finished()
                free = IN_FLIGHT_MAX - len(in_flight)
                # Log and refill when half the slots are free, so the unit of work (a commit) serves a batch; and
                # whenever new deliveries came in or a second went by, so no tenant waits on another's slots.
                idle = time.monotonic() - claimed_at >= DISPATCH_IDLE_S
                if free > 0 and (free * 2 >= IN_FLIGHT_MAX or woken or idle) \
                        and time.monotonic() >= database_retry_at:
                    busy = collections.Counter(in_flight.values())
                    claimed = await self._with_database("log attempts and claim due deliveries",
                                                        self._settle_and_claim, outcomes, free, dict(busy))
                    claimed_at = time.monotonic()
                    if claimed is None:  # the outcomes stay here, to be logged with the next claim
                        database_retry_at = time.monotonic() + database_delay_s
                        database_delay_s = min(database_delay_s * 2, DB_RETRY_S_MAX)
                    else:
                        database_delay_s = DB_RETRY_FIRST_S
                        outcomes = []
                        for due in claimed:
                            in_flight[asyncio.create_task(self._attempt(due))] = due.tenant_id
                waiters = {asyncio.create_task(self._wake.wait()), asyncio.create_task(stop.wait())}
                await asyncio.wait({*waiters, ingest, *in_flight}, timeout=DISPATCH_IDLE_S,
                                   return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
        finally:
            if in_flight:
                await asyncio.wait(in_flight)
            outcomes += finished()
            for _ in range(RECORD_TRIES_MAX):  # a last try or three; unlogged attempts are made again later
                if await self._with_database("log the last attempts", self._settle_and_claim, outcomes, 0, {}) \
                        is not None:
                    break
                await asyncio.sleep(DB_RETRY_FIRST_S)

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
            check_form(due.url)
            # The addresses are resolved and checked where the connection is made (webhook_transport), so what is
            # checked is what is called. The answer's body is never read: the log keeps its status only.
            async with asyncio.timeout(ATTEMPT_TIMEOUT_S), \
                    self._http.stream("POST", due.url, content=body, headers=headers) as response:
                status = response.status_code
                retry_after_s = retry_after(response.headers.get("retry-after"), at)
                if not 200 <= status < 300:
                    error = f"http_{status}"
        except UnsafeURL as exc:
            error = error_class(exc)
            detail = str(exc)
        except Exception as exc:  # whatever breaks one attempt (e.g. httpx.InvalidURL) fails that attempt only
            error = error_class(exc)
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            detail = error or ""
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
        # The operator's log has the detail; the tenant's delivery log only the class (see ERROR_CLASSES).
        log.info("webhook %s to %s: attempt %d, %s%s", due.event_id, due.url, attempt, state.value,
                 f" ({detail})" if error else "")
        return Outcome(due, state, at, status, error, next_at, gone=status == HTTPStatus.GONE)


def run_webhooks(settings: Settings) -> None:
    """Run the delivery process in the foreground until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    store = ControlStore(settings.control_url)
    delay = DB_RETRY_FIRST_S
    while True:
        try:
            store.create_schema()
            break
        except SQLAlchemyError as exc:
            log.warning("could not create the control schema (%s); retrying in %.1f s", type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, DB_RETRY_S_MAX)

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
