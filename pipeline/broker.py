"""The local single-node Apache Kafka broker (KRaft) run from Maven's jars, and idempotent topic creation."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lake.settings import Settings
from pipeline import jars
from pipeline.errors import BrokerError


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child that exited, or it stays a zombie
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass(frozen=True)
class LocalBroker:
    """A broker whose files live under <home>/kafka: data, logs, server.properties and a pid file."""

    home: Path
    host: str
    port: int
    max_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalBroker:
        first = settings.kafka_bootstrap.split(",")[0]
        host, _, port = first.rpartition(":")
        if not port.isdigit():
            raise BrokerError(f"LAKEHOUSE_KAFKA_BOOTSTRAP={settings.kafka_bootstrap!r} needs host:port")
        return cls(home=settings.home.resolve(), host=host or "localhost", port=int(port), max_bytes=settings.kafka_limit_bytes)

    @property
    def folder(self) -> Path:
        return self.home / "kafka" / str(self.port)

    @property
    def controller_port(self) -> int:
        return self.port + 1

    @property
    def pid_file(self) -> Path:
        return self.folder / "broker.pid"

    def properties(self) -> str:
        data = self.folder / "data"
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "4",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Large messages: every limit at or above the project's message limit plus framing.
            "message.max.bytes": str(self.max_bytes),
            "replica.fetch.max.bytes": str(self.max_bytes),
            "socket.request.max.bytes": str(max(104857600, 2 * self.max_bytes)),
            "auto.create.topics.enable": "false",
        }
        return "".join(f"{key}={value}\n" for key, value in lines.items())

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def reachable(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def _java(self, *args: str, heap: str | None = None) -> list[str]:
        classpath = str(jars.kafka_jar_dir(self.home) / "*")
        heap_args = [f"-Xmx{heap}", f"-Xms{heap}"] if heap else []
        return ["java", *heap_args, "-cp", classpath, *args]

    def start(self, timeout_s: float = 90.0) -> int:
        """Start the broker unless it runs; format its storage on first start. Returns its pid."""
        running = self.pid()
        if running:
            return running
        if self.reachable():
            raise BrokerError(f"port {self.port} is taken by another process; stop it or set LAKEHOUSE_KAFKA_BOOTSTRAP")
        if not any(jars.kafka_jar_dir(self.home).glob("kafka_2.13-*.jar")):
            jars.resolve(self.home)
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "server.properties"
        config.write_text(self.properties())
        if not (self.folder / "data" / "meta.properties").exists():
            cluster_id = subprocess.run(
                self._java("kafka.tools.StorageTool", "random-uuid"), capture_output=True, text=True, check=True
            ).stdout.strip().splitlines()[-1]
            formatted = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id, "-c", str(config)),
                capture_output=True,
                text=True,
            )
            if formatted.returncode != 0:
                raise BrokerError(f"formatting Kafka storage failed: {formatted.stdout}{formatted.stderr}")
        logs = self.folder / "logs"
        logs.mkdir(exist_ok=True)
        command = self._java(
            f"-Dlog4j2.configurationFile={jars.log4j_config()}",
            f"-Dkafka.logs.dir={logs}",
            "-XX:+UseG1GC",
            "kafka.Kafka",
            str(config),
            heap="1g",
        )
        with open(logs / "console.log", "ab") as console:
            process = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BrokerError(f"the Kafka broker exited with {process.returncode}; see {logs / 'server.log'}")
            if self.reachable() and self._metadata_ready():
                return process.pid
            time.sleep(0.5)
        self.stop()
        raise BrokerError(f"the Kafka broker did not answer on {self.host}:{self.port} within {timeout_s:.0f} s")

    def _metadata_ready(self) -> bool:
        from confluent_kafka.admin import AdminClient

        try:
            metadata = AdminClient({"bootstrap.servers": f"{self.host}:{self.port}", "log_level": 3}).list_topics(timeout=2)
        except Exception:
            return False
        return bool(metadata.brokers)

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Stop the broker with SIGTERM (a clean shutdown); SIGKILL after the timeout. False if it was not running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.2)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True


def ensure_topic(settings: Settings, timeout_s: float = 30.0) -> bool:
    """Create the topic with the project's limits; True if created, False if it already existed."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "log_level": 3})
    topic = NewTopic(
        settings.topic,
        num_partitions=settings.topic_partitions,
        replication_factor=-1,
        config={
            "max.message.bytes": str(settings.kafka_limit_bytes),
            # The broker's append time orders corrections across partitions (see README, "Duplicates").
            "message.timestamp.type": "LogAppendTime",
        },
    )
    future = admin.create_topics([topic], operation_timeout=timeout_s)[settings.topic]
    try:
        future.result(timeout=timeout_s)
    except KafkaException as exc:
        if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            raise_topic_limit(admin, settings, timeout_s)
            return False
        raise
    return True


def raise_topic_limit(admin: object, settings: Settings, timeout_s: float = 30.0) -> bool:
    """Raise an existing topic's max.message.bytes to the project's limit (never lower it); True if changed."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    resource = ConfigResource(ResourceType.TOPIC, settings.topic)
    current = admin.describe_configs([resource])[resource].result(timeout=timeout_s)  # type: ignore[attr-defined]
    if int(current["max.message.bytes"].value) >= settings.kafka_limit_bytes:
        return False
    entry = ConfigEntry("max.message.bytes", str(settings.kafka_limit_bytes), incremental_operation=AlterConfigOpType.SET)
    change = ConfigResource(ResourceType.TOPIC, settings.topic, incremental_configs=[entry])
    admin.incremental_alter_configs([change])[change].result(timeout=timeout_s)  # type: ignore[attr-defined]
    return True


def describe(settings: Settings, timeout_s: float = 5.0) -> dict[str, object]:
    """Brokers and the topic's partitions as the cluster reports them."""
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "log_level": 3}).list_topics(timeout=timeout_s)
    topic = metadata.topics.get(settings.topic)
    return {
        "brokers": sorted(f"{b.host}:{b.port}" for b in metadata.brokers.values()),
        "topic": settings.topic,
        "partitions": None if topic is None or topic.error else len(topic.partitions),
    }
