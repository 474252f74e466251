"""Typed settings, read once from the environment at the composition root."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_BROKER_PORT = 19092
NAMESPACE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


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
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not NAMESPACE_PATTERN.match(self.namespace):
            raise SettingsError(f"LEDGER_NAMESPACE {self.namespace!r} must match {NAMESPACE_PATTERN.pattern}")
        if not 1 <= self.partitions <= 1024:
            raise SettingsError(f"LEDGER_PARTITIONS must be between 1 and 1024, got {self.partitions}")
        if self.store not in ("memory://", "rocksdb://"):
            raise SettingsError(f"LEDGER_STORE must be memory:// or rocksdb://, got {self.store!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        try:
            partitions = int(env.get("LEDGER_PARTITIONS", "8"))
        except ValueError:
            raise SettingsError("LEDGER_PARTITIONS must be an integer") from None
        duckdb = env.get("LEDGER_DUCKDB")
        return cls(
            home=Path(env.get("LEDGER_HOME", ".ledger")),
            external_bootstrap=env.get("KAFKA_BOOTSTRAP_SERVERS") or None,
            namespace=env.get("LEDGER_NAMESPACE", "ledger"),
            partitions=partitions,
            store=env.get("LEDGER_STORE", "memory://"),
            duckdb_path=Path(duckdb) if duckdb else None,
            database_url=env.get("LEDGER_DATABASE_URL") or None,
        )

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
