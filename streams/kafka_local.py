"""A single-node Apache Kafka (KRaft) broker that the project runs itself.

The broker jars come from Maven Central (``streams/kafka/pom.xml``) into a
git-ignored cache; storage is formatted on first start. Nothing here is used
when ``KAFKA_BOOTSTRAP_SERVERS`` points at an existing cluster.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

POM = Path(__file__).parent / "kafka" / "pom.xml"
BROKER_START_TIMEOUT_S = 90.0
BROKER_STOP_TIMEOUT_S = 30.0

LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.server.name = org.apache.kafka.server
logger.server.level = INFO
"""


@dataclass(frozen=True)
class LocalBroker:
    """Where the local broker keeps its jars, data, logs and pid, and its ports."""

    home: Path
    port: int = 19092
    controller_port: int = 19093
    heap: str = "768m"

    def __post_init__(self) -> None:
        # Absolute: Maven resolves a relative output directory against the POM's folder.
        object.__setattr__(self, "home", Path(self.home).resolve())

    @property
    def lib_dir(self) -> Path:
        return self.home / "lib"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def config_file(self) -> Path:
        return self.home / "server.properties"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / "broker.log"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- jars ---------------------------------------------------------------

    def fetch(self) -> None:
        """Copy the broker jars from Maven Central into the cache (once)."""
        if any(self.lib_dir.glob("kafka_2.13-*.jar")):
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError("Maven (mvn) is needed to fetch the Kafka broker jars")
        self.lib_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
             f"-DoutputDirectory={self.lib_dir}", "-DincludeScope=runtime"],
            check=True,
        )

    # -- configuration --------------------------------------------------------

    def _write_config(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "8",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Usage must outlive the longest late-event window: never delete it by age.
            "log.retention.hours": "-1",
            "auto.create.topics.enable": "false",
        }
        self.config_file.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.home / "log4j2.properties").write_text(LOG4J2.format(log_file=self.log_file))

    def _java(self, main: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise BrokerError("Java 17+ is needed to run the Kafka broker")
        return [
            java, f"-Xms{self.heap}", f"-Xmx{self.heap}", "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp", f"{self.lib_dir}/*", main, *args,
        ]

    def _format(self) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = uuid.uuid4().hex[:22]
        subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster_id,
                       "-c", str(self.config_file), "--ignore-formatted"),
            check=True, stdout=subprocess.DEVNULL,
        )

    # -- lifecycle ------------------------------------------------------------

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def is_ready(self) -> bool:
        return _port_open("127.0.0.1", self.port)

    def start(self) -> None:
        if self.is_ready():
            # Ours from an earlier start, or one another checkout of the project started.
            wait_until_ready(self.bootstrap, BROKER_START_TIMEOUT_S)
            return
        self.fetch()
        self._write_config()
        self._format()
        stdout = open(self.home / "logs" / "broker.out", "ab")
        proc = subprocess.Popen(
            self._java("kafka.Kafka", str(self.config_file)),
            stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid_file.write_text(str(proc.pid))
        wait_until_ready(self.bootstrap, BROKER_START_TIMEOUT_S, alive=lambda: proc.poll() is None)

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + BROKER_STOP_TIMEOUT_S
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.2)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)

    def reset(self) -> None:
        """Stop the broker and delete its data (the jars stay cached)."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class BrokerError(RuntimeError):
    """The local broker could not be fetched, started or reached."""


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until_ready(
    bootstrap: str, timeout_s: float, alive: Callable[[], bool] = lambda: True
) -> None:
    """Block until the broker answers a metadata request, or raise BrokerError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise BrokerError("the broker exited while starting: see its log")
        if asyncio.run(_answers_metadata(bootstrap)):
            return
        time.sleep(0.5)
    raise BrokerError(f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f}s")


async def _answers_metadata(bootstrap: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if not _port_open(host, int(port)):
        return False
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await admin.start()
        await admin.describe_cluster()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        await admin.close()
