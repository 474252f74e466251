"""Typed settings, read once from the environment at the composition root."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_BROKER_PORT = 19092
STANDBY_REPLICAS_MAX = 8
PORT_MAX = 65535
NAMESPACE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
WEBHOOK_RETRY_FIRST_S_MAX = 3600
RATE_SETTING_MAX = 1_000_000
GATE_STREAMS_PER_TENANT_MAX = 32  # the API's bound on all its streams (ledger.api.gates.STREAMS_MAX)
CURSOR_SECRET_PATTERN = re.compile(r"^[0-9a-fA-F]{64}$")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    home: Path = Path(".ledger")
    # None: use the project's own local broker (started by `ledger up`).
    external_bootstrap: str | None = None
    namespace: str = "ledger"
    partitions: int = 8
    store: str = "memory://"
    duckdb_path: Path | None = None
    # None: a SQLite file in the home folder.
    database_url: str | None = None
    # A JSON file of provider prices that win over the shipped catalog.
    price_overrides: Path | None = None
    api_port: int = 18000
    # How often the leader worker writes a clock tick to every partition (0: never).
    tick_seconds: int = 60
    # Webhook URLs may name loopback or private addresses. False by default, so a tenant cannot make the
    # delivery process call internal services (SSRF); `ledger up` and the tests that deliver to loopback opt in.
    webhook_allow_private: bool = False
    # The first retry of a failed webhook delivery waits this long; each later one waits longer (see streams/webhooks.py).
    webhook_retry_first_s: int = 5
    # Workers that keep a warm copy of each table partition besides its owner (Faust's table_standby_replicas).
    standby_replicas: int = 1
    # The worker's or projector's /metrics, /healthz and /readyz (0: no server). The API serves them on its own port.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # Requests per API key: this many per second on average, bursts of this many (docs/limits.md). A tenant's
    # own values (`ledger tenants rate`) win. Generous by default: the benchmarks drive one key at 200/s.
    rate_per_key_per_s: int = 250
    rate_burst: int = 500
    # Open gate streams (SSE) one tenant may hold on one API process; more answer 429.
    gate_streams_per_tenant: int = 4
    # 32 bytes as hex that seal the gate stream's cursors; None: a key kept in <home>/gate-cursor.key.
    cursor_secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not NAMESPACE_PATTERN.match(self.namespace):
            raise SettingsError(f"LEDGER_NAMESPACE {self.namespace!r} must match {NAMESPACE_PATTERN.pattern}")
        if not 1 <= self.partitions <= 1024:
            raise SettingsError(f"LEDGER_PARTITIONS must be between 1 and 1024, got {self.partitions}")
        if self.store not in ("memory://", "rocksdb://"):
            raise SettingsError(f"LEDGER_STORE must be memory:// or rocksdb://, got {self.store!r}")
        if not 1 <= self.webhook_retry_first_s <= WEBHOOK_RETRY_FIRST_S_MAX:
            raise SettingsError(f"LEDGER_WEBHOOK_RETRY_FIRST_S must be between 1 and {WEBHOOK_RETRY_FIRST_S_MAX}, "
                                f"got {self.webhook_retry_first_s}")
        for name, port in (("LEDGER_API_PORT", self.api_port), ("LEDGER_METRICS_PORT", self.metrics_port)):
            if not 0 <= port <= PORT_MAX:
                raise SettingsError(f"{name} must be between 0 and {PORT_MAX}, got {port}")
        for name, value in (("LEDGER_RATE_PER_KEY_PER_S", self.rate_per_key_per_s),
                            ("LEDGER_RATE_BURST", self.rate_burst)):
            if not 1 <= value <= RATE_SETTING_MAX:
                raise SettingsError(f"{name} must be between 1 and {RATE_SETTING_MAX}, got {value}")
        if not 0 <= self.standby_replicas <= STANDBY_REPLICAS_MAX:
            raise SettingsError(f"LEDGER_STANDBY_REPLICAS must be between 0 and {STANDBY_REPLICAS_MAX}, "
                                f"got {self.standby_replicas}")

        if not 1 <= self.gate_streams_per_tenant <= GATE_STREAMS_PER_TENANT_MAX:
            raise SettingsError(f"LEDGER_GATE_STREAMS_PER_TENANT must be between 1 and {GATE_STREAMS_PER_TENANT_MAX}, "
                                f"got {self.gate_streams_per_tenant}")
        if self.cursor_secret is not None and not CURSOR_SECRET_PATTERN.match(self.cursor_secret):
            raise SettingsError("LEDGER_CURSOR_SECRET must be 64 hex digits (32 bytes)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        partitions = _int(env, "LEDGER_PARTITIONS", 8)
        duckdb = env.get("LEDGER_DUCKDB")
        return cls(
            home=Path(env.get("LEDGER_HOME", ".ledger")),
            external_bootstrap=env.get("KAFKA_BOOTSTRAP_SERVERS") or None,
            namespace=env.get("LEDGER_NAMESPACE", "ledger"),
            partitions=partitions,
            store=env.get("LEDGER_STORE", "memory://"),
            duckdb_path=Path(duckdb) if duckdb else None,
            database_url=env.get("LEDGER_DATABASE_URL") or None,
            price_overrides=Path(env["LEDGER_PRICE_OVERRIDES"]) if env.get("LEDGER_PRICE_OVERRIDES") else None,
            api_port=_int(env, "LEDGER_API_PORT", 18000),
            tick_seconds=_int(env, "LEDGER_TICK_SECONDS", 60),
            webhook_allow_private=_bool(env, "LEDGER_WEBHOOK_ALLOW_PRIVATE", False),
            webhook_retry_first_s=_int(env, "LEDGER_WEBHOOK_RETRY_FIRST_S", 5),
            standby_replicas=_int(env, "LEDGER_STANDBY_REPLICAS", 1),
            metrics_port=_int(env, "LEDGER_METRICS_PORT", 0),
            metrics_host=env.get("LEDGER_METRICS_HOST", "127.0.0.1"),
            rate_per_key_per_s=_int(env, "LEDGER_RATE_PER_KEY_PER_S", 250),
            rate_burst=_int(env, "LEDGER_RATE_BURST", 500),
            gate_streams_per_tenant=_int(env, "LEDGER_GATE_STREAMS_PER_TENANT", 4),
            cursor_secret=env.get("LEDGER_CURSOR_SECRET") or None,
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def bootstrap(self) -> str:
        return self.external_bootstrap or f"127.0.0.1:{LOCAL_BROKER_PORT}"

    @property
    def history_path(self) -> Path:
        return self.duckdb_path or self.home / f"{self.namespace}.duckdb"

    @property
    def control_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home.resolve() / 'control.db'}"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, str(default)))
    except ValueError:
        raise SettingsError(f"{name} must be an integer") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {value!r}")
