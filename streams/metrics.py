"""Prometheus metrics of the worker, the projector and the webhook delivery process, and the small HTTP
server that serves them.

Each process builds its metrics on its own registry (no global state at import
time, so tests can build several). The server runs in a thread: a worker whose
event loop is stuck stops renewing its heartbeat, and ``/healthz`` says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

# A heartbeat older than this means the event loop is stuck: /healthz answers 503.
HEARTBEAT_STALE_S_MAX = 15.0
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_EVENTS_BUCKETS = (1, 10, 100, 500, 1000, 2500, 5000, 10_000, 50_000)


class Health:
    """A heartbeat and a readiness verdict, renewed by the event loop and read by the HTTP thread.

    Readiness is computed on the loop (where the consumer and tables live) and only
    read here, so the HTTP thread never touches asyncio objects.
    """

    def __init__(self) -> None:
        self._at = time.monotonic()
        self._readiness = (False, "starting")

    def beat(self, ready: bool, why: str) -> None:
        self._readiness = (ready, why)
        self._at = time.monotonic()

    def age_s(self) -> float:
        return time.monotonic() - self._at

    def readiness(self) -> tuple[bool, str]:
        return self._readiness


class LagGauge:
    """Records behind the end of each assigned partition; partitions no longer assigned are dropped."""

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self._shown: set[tuple[str, str]] = set()

    def set(self, lags: Mapping[tuple[str, int], int]) -> None:
        labels = {(topic, str(partition)): lag for (topic, partition), lag in lags.items()}
        for gone in self._shown - labels.keys():
            self._gauge.remove(*gone)
        for label, lag in labels.items():
            self._gauge.labels(*label).set(max(0, lag))
        self._shown = set(labels)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.health = Health()
        self.processed = Counter("ledger_events_processed", "Usage-log records processed, by result "
                                 "(ok, duplicate, conflict, rejected; a clock tick counts as ok; already_applied: read "
                                 "again after a restart, found by its offset)",
                                 ["result"], registry=registry)
        self.dead_lettered = Counter("ledger_dead_lettered", "Records sent to the dead-letter topic, by code",
                                     ["code"], registry=registry)
        self.gates = Counter("ledger_gate_events", "Gate events emitted, by kind (a crash may repeat one under its id)",
                             ["kind"], registry=registry)
        self.batch_seconds = Histogram("ledger_batch_seconds", "Time from a batch's arrival until its outputs are "
                                       "acknowledged and its state is sent", registry=registry,
                                       buckets=BATCH_SECONDS_BUCKETS)
        self.batch_events = Histogram("ledger_batch_events", "Commands per batch (an envelope's count one by one)",
                                      registry=registry, buckets=BATCH_EVENTS_BUCKETS)
        self.lag = LagGauge(Gauge("ledger_consumer_lag", "Usage-log records past the durable position (stored with "
                                  "the state, after the outputs): what a restart would read again, per assigned "
                                  "partition", ["topic", "partition"], registry=registry))
        self.holes = Counter("ledger_offset_holes", "Times the records delivered skipped offsets past the position; "
                             "the missing offsets were fetched again and applied in order", registry=registry)
        self.refetched = Counter("ledger_offsets_refetched", "Records fetched again to fill a hole", registry=registry)
        self.fence_refused = Counter("ledger_fence_refused", "Batches whose state was dropped because another "
                                     "worker owns one of their partitions now (and fenced this one's producer)",
                                     registry=registry)
        # Pre-create the result labels so a scrape shows zeros rather than nothing.
        for result in ("ok", "duplicate", "conflict", "rejected", "already_applied"):
            self.processed.labels(result)

    def count(self, results: Mapping[str, int], dead_letters: Mapping[str, int], gates: Mapping[str, int]) -> None:
        for labels, counter in ((results, self.processed), (dead_letters, self.dead_lettered), (gates, self.gates)):
            for label, n in labels.items():
                counter.labels(label).inc(n)


class ProjectorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.health = Health()
        self.rows = Counter("ledger_projector_rows_written", "Rows written into the history, by table "
                            "(a replayed record is counted again; INSERT OR IGNORE stores it once)",
                            ["table"], registry=registry)
        self.batch_seconds = Histogram("ledger_projector_batch_seconds", "Time to decode and store one batch",
                                       registry=registry, buckets=BATCH_SECONDS_BUCKETS)
        self.lag = LagGauge(Gauge("ledger_projector_lag", "Records not yet stored in the history, per source partition",
                                  ["topic", "partition"], registry=registry))

    def count_rows(self, rows: Iterable[tuple[str, int]]) -> None:
        for table, n in rows:
            self.rows.labels(table).inc(n)


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.health = Health()
        self.gates_read = Counter("ledger_webhook_gate_events_read", "Gate events read from the gates topic",
                                  registry=registry)
        self.deliveries_recorded = Counter("ledger_webhook_deliveries_recorded",
                                           "Deliveries added to the delivery log (one per gate event and endpoint)",
                                           registry=registry)
        self.attempts = Counter("ledger_webhook_attempts", "Delivery attempts, by what became of the delivery "
                                "(delivered, pending: to be retried, failed: given up)", ["state"], registry=registry)
        for state in ("delivered", "pending", "failed"):
            self.attempts.labels(state)


class _Handler(BaseHTTPRequestHandler):
    server: HealthServer

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._answer(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            age = self.server.health.age_s()
            ok = age <= HEARTBEAT_STALE_S_MAX
            self._answer(200 if ok else 503, f"{'ok' if ok else 'stuck'}: event loop beat {age:.1f}s ago\n".encode())
        elif path == "/readyz":
            ready, why = self.server.health.readiness()
            self._answer(200 if ready else 503, f"{'ready' if ready else 'not ready'}: {why}\n".encode())
        else:
            self._answer(404, b"not found: /metrics, /healthz or /readyz\n")

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds would flood the log
        pass


class HealthServer(ThreadingHTTPServer):
    """``/metrics``, ``/healthz`` (the event loop beats) and ``/readyz`` (the process can do its work)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        super().__init__((host, port), _Handler)
        self.registry = registry
        self.health = health

    @classmethod
    def for_metrics(cls, host: str, port: int, metrics: WorkerMetrics | ProjectorMetrics | WebhookMetrics
                    ) -> HealthServer:
        return cls(host, port, metrics.registry, metrics.health)

    def start(self) -> HealthServer:
        threading.Thread(target=self.serve_forever, name="health-server", daemon=True).start()
        log.info("metrics and health on http://%s:%d/metrics, /healthz, /readyz", *self.server_address[:2])
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
