"""Fixtures for tests against the real broker: a namespace per test, worker processes, helpers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ledger.settings import Settings
from tests.factories import T0
from tests.wall_clock import TICKS_OFF, tick_seconds, ticking_problem

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Every process a test starts (worker, `ledger api`, `ledger up`, webhooks) ticks only if the test says so.

    The workloads are dated (tests/factories.py T0); a wall-clock tick would end their period on some days and
    not on others. Tests that need time to pass publish their own ClockTicked dated in the workload.
    """
    os.environ.update(TICKS_OFF)


@pytest.fixture(scope="session")
def bootstrap() -> str:
    """The broker under test: KAFKA_BOOTSTRAP_SERVERS, else the project's local broker (started if needed)."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        return external
    from streams.kafka_local import LocalBroker

    broker = LocalBroker(Path(os.environ.get("LEDGER_HOME", ROOT / ".ledger")) / "kafka")
    broker.start()
    return broker.bootstrap


_namespaces: set[str] = set()


def new_settings(bootstrap: str, home: Path, partitions: int = 8) -> Settings:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    _namespaces.add(namespace)
    return Settings(home=home, external_bootstrap=bootstrap, namespace=namespace, partitions=partitions)


def delete_namespaces(bootstrap: str, namespaces: set[str]) -> None:
    """Delete every topic of these namespaces (and only theirs: the broker is shared)."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def delete() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            ours = [t for t in await admin.list_topics()
                    if any(t.startswith((f"{ns}.", f"{ns}-")) for ns in namespaces)]
            for start in range(0, len(ours), 100):
                await admin.delete_topics(ours[start:start + 100])
        finally:
            await admin.close()

    asyncio.run(delete())


@pytest.fixture(scope="session", autouse=True)
def _delete_test_topics() -> Iterator[None]:
    """Each test's namespace adds ~56 partitions; a broker that keeps them all runs out of file handles."""
    yield
    if _namespaces and not os.environ.get("LEDGER_TEST_KEEP_TOPICS"):  # kept: to look into a failure afterwards
        delete_namespaces(os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"), _namespaces)


def free_port() -> int:
    """A TCP port nothing listens on now (for a process's metrics server)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def settings(bootstrap: str, tmp_path: Path) -> Settings:
    from streams.topics import ensure_topics

    s = new_settings(bootstrap, tmp_path)
    asyncio.run(ensure_topics(s))
    return s


class WorkerProcess:
    """A `ledger worker` in its own process, so tests can kill -9 it.

    It never ticks unless ``env`` sets LEDGER_TICK_SECONDS, and then only over a workload (dated from
    ``workload_start``) that the wall clock has not left: it refuses to start otherwise.
    """

    def __init__(self, settings: Settings, worker_id: str = "0", env: dict[str, str] | None = None,
                 workload_start: datetime = T0) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.env = env or {}
        self.workload_start = workload_start
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = settings.home / f"worker-{worker_id}.log"
        self.starts = 0

    def environment(self) -> dict[str, str]:
        return {**os.environ, "LEDGER_HOME": str(self.settings.home), "LEDGER_NAMESPACE": self.settings.namespace,
                "KAFKA_BOOTSTRAP_SERVERS": self.settings.bootstrap,
                "LEDGER_PARTITIONS": str(self.settings.partitions), **TICKS_OFF, **self.env}

    def start(self) -> WorkerProcess:
        env = self.environment()
        if tick_seconds(env) > 0 and (problem := ticking_problem(self.workload_start, datetime.now(UTC))):
            pytest.fail(problem, pytrace=False)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ledger.cli.main", "worker", "--worker-id", self.worker_id, "--loglevel", "info"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
        )
        self.starts += 1
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets and state but runs nothing (a long GC pause, a frozen VM)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def wait_exit(self, timeout_s: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class ProjectorProcess:
    """`ledger projector` in its own process."""

    def __init__(self, settings: Settings, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.env = env or {}
        self.log = open(settings.home / "projector.log", "ab")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ProjectorProcess:
        env = {**os.environ, "LEDGER_HOME": str(self.settings.home),
               "LEDGER_NAMESPACE": self.settings.namespace, "KAFKA_BOOTSTRAP_SERVERS": self.settings.bootstrap,
               **self.env}
        self.proc = subprocess.Popen([sys.executable, "-m", "ledger.cli.main", "projector"], env=env, cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def wait_caught_up(self, timeout_s: float = 120) -> None:
        from streams.progress import projector_lag

        deadline = time.monotonic() + timeout_s
        while asyncio.run(projector_lag(self.settings, self.settings.history_path)) > 0:
            assert self.proc is not None and self.proc.poll() is None, "the projector died"
            assert time.monotonic() < deadline, f"the projector is behind after {timeout_s}s"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def worker_factory(settings: Settings) -> Iterator:  # type: ignore[type-arg]
    workers: list[WorkerProcess] = []

    def make(s: Settings = settings, worker_id: str = "0", env: dict[str, str] | None = None,
             workload_start: datetime = T0) -> WorkerProcess:
        w = WorkerProcess(s, worker_id, env, workload_start)
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.stop()


@pytest.fixture
def worker(worker_factory) -> WorkerProcess:  # type: ignore[no-untyped-def]
    return worker_factory().start()


def wait_processed(settings: Settings, worker: WorkerProcess | None = None, timeout_s: float = 120) -> None:
    """Wait until the processor group has committed everything in the usage log."""
    from streams.progress import processor_lag

    deadline = time.monotonic() + timeout_s
    while (lag := asyncio.run(processor_lag(settings))) > 0:
        if worker is not None and not worker.alive():
            raise AssertionError(f"worker died:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            tail = worker.log_tail() if worker else ""
            raise AssertionError(f"processor still {lag} behind after {timeout_s}s\n{tail}")
        time.sleep(0.5)


# -- the control-plane store's databases ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database: LEDGER_TEST_DATABASE_URL, else one on a throwaway server started for this session."""
    external = os.environ.get("LEDGER_TEST_DATABASE_URL")
    if external:
        yield external
        return
    from tests.pg import PostgresUnavailable, TempPostgres

    try:
        server = TempPostgres()
        url = server.start()
    except PostgresUnavailable as e:
        unavailable = str(e)
    else:
        unavailable = ""
    if unavailable:  # a failure, not a skip: CI installs the server, so its absence is a broken machine
        pytest.fail(unavailable, pytrace=False)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database per test: a SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'control.db'}"
        return
    import psycopg
    from sqlalchemy.engine import make_url

    from tests.pg import connect_kwargs

    maintenance = request.getfixturevalue("postgres_url")
    name = f"ledger_t{uuid.uuid4().hex[:16]}"
    with psycopg.connect(**connect_kwargs(maintenance), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(maintenance).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(**connect_kwargs(maintenance), autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def replay_from_offset_0(source: Settings, home: Path, worker_factory) -> Settings:  # type: ignore[no-untyped-def]
    """Copy the usage log into a fresh namespace and let a fresh worker process it from offset 0."""
    from streams.topics import ensure_topics
    from tests.kafka_io import copy_usage_log

    replay = new_settings(source.bootstrap, home)
    asyncio.run(ensure_topics(replay))
    copy_usage_log(source, replay)
    worker = worker_factory(replay).start()
    wait_processed(replay, worker)
    return replay


def outputs(settings: Settings, name: str, *, as_namespace: str | None = None) -> dict[int, list[tuple[bytes | None, bytes]]]:
    """Every record of one output topic, per partition; ``as_namespace`` spells the namespace as another's."""
    from streams.topics import Topics
    from tests.kafka_io import read_partitions

    records = read_partitions(settings, getattr(Topics.for_namespace(settings.namespace), name))
    if as_namespace is None:
        return records
    old, new = settings.namespace.encode(), as_namespace.encode()
    return {p: [(k, v.replace(old, new)) for k, v in rows] for p, rows in records.items()}
