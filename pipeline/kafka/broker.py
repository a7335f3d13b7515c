"""Local Apache Kafka (KRaft) from Maven's jars: one node, or a cluster of several on one host; topic creation."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lake.kafka import admin_config
from lake.settings import Settings
from pipeline.errors import BrokerError
from pipeline.jvm import daemon, jars

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient


@dataclass(frozen=True)
class BrokerSecurity:
    """A client listener with SASL_SSL (SCRAM-SHA-512 over TLS) and ACLs enforced by KRaft's StandardAuthorizer.

    The admin user is the broker's own (inter-broker and controller traffic) and a super user; `users` are other
    SCRAM principals, added when the storage is formatted, with no rights until ACLs grant them some.
    """

    keystore: Path  # PKCS12 holding the broker's key and its certificate (for the host clients connect to)
    keystore_password: str
    ca_file: Path  # PEM of the CA that signed the certificate: the broker's own truststore, and its clients'
    admin_user: str
    admin_password: str
    users: tuple[tuple[str, str], ...] = ()  # (name, password)

    def properties(self, listener: str) -> dict[str, str]:
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
        plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
        name = listener.lower()
        return {
            "inter.broker.listener.name": listener,
            "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
            f"listener.name.{name}.sasl.enabled.mechanisms": "SCRAM-SHA-512",
            f"listener.name.{name}.scram-sha-512.sasl.jaas.config": (
                f'{scram} required username="{self.admin_user}" password="{self.admin_password}";'
            ),
            # SCRAM credentials live in the metadata log, which a controller cannot read before it is up: the
            # controller listener authenticates the admin with PLAIN, from this configuration alone.
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": (
                f'{plain} required username="{self.admin_user}" password="{self.admin_password}" '
                f'user_{self.admin_user}="{self.admin_password}";'
            ),
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self.keystore),
            "ssl.keystore.password": self.keystore_password,
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{self.admin_user}",
            "allow.everyone.if.no.acl.found": "false",
        }

    def format_arguments(self) -> list[str]:
        """StorageTool's --add-scram for the admin and every user: KRaft keeps SCRAM credentials in its metadata."""
        users = [(self.admin_user, self.admin_password), *self.users]
        return [
            arg
            for name, password in users
            for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]")
        ]

    def admin_client_config(self) -> dict[str, str]:
        """librdkafka settings of the admin user, for the broker's own readiness check and for granting ACLs."""
        return {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": self.admin_user,
            "sasl.password": self.admin_password,
            "ssl.ca.location": str(self.ca_file),
        }


@dataclass(frozen=True)
class LocalBroker:
    """A broker whose files live under <home>/kafka: data, logs, server.properties and a pid file.

    Alone it is its own controller quorum; as a node of a `LocalCluster` it is one voter of the cluster's quorum.
    """

    home: Path
    host: str
    port: int
    max_bytes: int
    heap: str = "1g"
    node_id: int = 1
    cluster: LocalCluster | None = None
    security: BrokerSecurity | None = None  # None: a PLAINTEXT listener that everyone may use

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalBroker:
        first = settings.kafka_bootstrap.split(",")[0]
        host, _, port = first.rpartition(":")
        if not port.isdigit():
            raise BrokerError(f"LAKEHOUSE_KAFKA_BOOTSTRAP={settings.kafka_bootstrap!r} needs host:port")
        return cls(
            home=settings.home.resolve(), host=host or "localhost", port=int(port), max_bytes=settings.kafka_limit_bytes
        )

    @property
    def folder(self) -> Path:
        if self.cluster is not None:
            return self.cluster.folder / f"node-{self.node_id}"
        return self.home / "kafka" / str(self.port)

    @property
    def controller_port(self) -> int:
        return self.port + 1

    @property
    def pid_file(self) -> Path:
        return self.folder / "broker.pid"

    def properties(self) -> str:
        data = self.folder / "data"
        replicas = self.cluster.default_replication if self.cluster else 1
        min_insync = self.cluster.default_min_insync if self.cluster else 1
        quorum = (
            {"controller.quorum.voters": self.cluster.voters}
            if self.cluster
            else {"controller.quorum.bootstrap.servers": f"{self.host}:{self.controller_port}"}
        )
        client = "PLAINTEXT" if self.security is None else "SASL_SSL"
        controller = "PLAINTEXT" if self.security is None else "SASL_PLAINTEXT"
        addresses = f"{client}://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}"
        lines = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            **quorum,
            "listeners": addresses,
            "advertised.listeners": addresses,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": client,
            "listener.security.protocol.map": f"CONTROLLER:{controller},{client}:{client}",
            "log.dirs": str(data),
            "num.partitions": "4",
            "offsets.topic.replication.factor": str(replicas),
            "transaction.state.log.replication.factor": str(replicas),
            "share.coordinator.state.topic.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min_insync),
            "share.coordinator.state.topic.min.isr": str(min_insync),
            # Topics created without explicit settings (LAKEHOUSE_TOPIC_REPLICATION unset) get these.
            "default.replication.factor": str(replicas),
            "min.insync.replicas": str(min_insync),
            "group.initial.rebalance.delay.ms": "0",
            # Large messages: every limit at or above the project's message limit plus framing.
            "message.max.bytes": str(self.max_bytes),
            "replica.fetch.max.bytes": str(self.max_bytes),
            "socket.request.max.bytes": str(max(104857600, 2 * self.max_bytes)),
            "auto.create.topics.enable": "false",
            **(self.security.properties(client) if self.security else {}),
        }
        return "".join(f"{key}={value}\n" for key, value in lines.items())

    def pid(self) -> int | None:
        return daemon.running_pid(self.pid_file)

    def reachable(self) -> bool:
        return daemon.listening(self.host, self.port)

    def _java(self, *args: str, heap: str | None = None) -> list[str]:
        classpath = str(jars.kafka_jar_dir(self.home) / "*")
        heap_args = [f"-Xmx{heap}", f"-Xms{heap}"] if heap else []
        return ["java", *heap_args, "-cp", classpath, *args]

    def start(self, timeout_s: float = 90.0) -> int:
        """Start the broker unless it runs; format its storage on first start. Returns its pid."""
        running = self.pid()
        if running:
            return running
        process = self.launch()
        self.wait_ready(process, timeout_s)
        return process.pid

    def _cluster_id(self) -> str:
        if self.cluster is not None:
            return self.cluster.cluster_id()
        return new_cluster_id(self.home)

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the broker's JVM (formatting its storage on first start) without waiting for it to answer."""
        if self.reachable():
            raise BrokerError(f"port {self.port} is taken by another process; stop it or set LAKEHOUSE_KAFKA_BOOTSTRAP")
        if not any(jars.kafka_jar_dir(self.home).glob("kafka_2.13-*.jar")):
            jars.resolve(self.home)
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "server.properties"
        config.write_text(self.properties())
        if not (self.folder / "data" / "meta.properties").exists():
            # A single node formats itself as a one-voter quorum; a cluster's nodes share an id and a static voter set.
            standalone = [] if self.cluster else ["--standalone"]
            users = self.security.format_arguments() if self.security else []
            format_command = self._java(
                "kafka.tools.StorageTool", "format", *standalone, *users, "-t", self._cluster_id()
            )
            formatted = subprocess.run(
                [*format_command, "-c", str(config)], check=False, capture_output=True, text=True
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
            heap=self.heap,
        )
        with open(logs / "console.log", "ab") as console:
            process = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(str(process.pid))
        return process

    def wait_ready(self, process: subprocess.Popen[bytes], timeout_s: float = 90.0) -> None:
        """Wait until the broker answers metadata requests; stop it and raise if it exits or stays silent."""
        logs = self.folder / "logs"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BrokerError(f"the Kafka broker exited with {process.returncode}; see {logs / 'server.log'}")
            if self.reachable() and self._metadata_ready():
                return
            time.sleep(0.5)
        self.stop()
        raise BrokerError(f"the Kafka broker did not answer on {self.host}:{self.port} within {timeout_s:.0f} s")

    def _metadata_ready(self) -> bool:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        security = self.security.admin_client_config() if self.security else {}
        try:
            metadata = AdminClient(
                {**security, "bootstrap.servers": f"{self.host}:{self.port}", "log_level": 3}
            ).list_topics(timeout=2)
        except KafkaException:
            return False
        return bool(metadata.brokers)

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Stop the broker with SIGTERM (a clean shutdown); SIGKILL after the timeout. False if it was not running."""
        return daemon.stop(self.pid_file, timeout_s)


def new_cluster_id(home: Path) -> str:
    """A fresh KRaft cluster id from Kafka's own StorageTool."""
    command = ["java", "-cp", str(jars.kafka_jar_dir(home) / "*"), "kafka.tools.StorageTool", "random-uuid"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]


@dataclass(frozen=True)
class LocalCluster:
    """Several brokers on one host, each also a controller: node i listens on base_port + 2(i-1), its controller
    on the next port. Files live under <home>/kafka/cluster-<base_port>/node-<i>."""

    home: Path
    host: str
    base_port: int
    size: int
    max_bytes: int
    heap: str = "512m"

    @classmethod
    def from_settings(cls, settings: Settings, size: int, heap: str = "512m") -> LocalCluster:
        first = LocalBroker.from_settings(settings)
        if size < 2:
            raise BrokerError(f"a local cluster needs at least 2 brokers, not {size}; a single broker is LocalBroker")
        return cls(first.home, first.host, base_port=first.port, size=size, max_bytes=first.max_bytes, heap=heap)

    @classmethod
    def existing(cls, settings: Settings) -> LocalCluster | None:
        """The cluster started earlier for this bootstrap address, if its folder is there."""
        first = LocalBroker.from_settings(settings)
        folder = first.home / "kafka" / f"cluster-{first.port}"
        size = len(list(folder.glob("node-*")))
        if size < 2:
            return None
        return cls(home=first.home, host=first.host, base_port=first.port, size=size, max_bytes=first.max_bytes)

    @property
    def folder(self) -> Path:
        return self.home / "kafka" / f"cluster-{self.base_port}"

    @property
    def nodes(self) -> list[LocalBroker]:
        ports = [self.base_port + 2 * index for index in range(self.size)]
        return [
            LocalBroker(self.home, self.host, port, self.max_bytes, heap=self.heap, node_id=index + 1, cluster=self)
            for index, port in enumerate(ports)
        ]

    @property
    def bootstrap(self) -> str:
        """Every broker's address: clients keep finding the cluster when one broker is down."""
        return ",".join(f"{node.host}:{node.port}" for node in self.nodes)

    @property
    def voters(self) -> str:
        return ",".join(f"{node.node_id}@{node.host}:{node.controller_port}" for node in self.nodes)

    @property
    def default_replication(self) -> int:
        return min(3, self.size)

    @property
    def default_min_insync(self) -> int:
        # With 3 replicas, 2 in sync: acks=all writes go on while one broker is down, and never rest on one copy.
        return max(1, self.default_replication - 1)

    def cluster_id(self) -> str:
        """The id all nodes are formatted with, made once and kept beside the nodes' folders."""
        id_file = self.folder / "cluster.id"
        if not id_file.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            id_file.write_text(new_cluster_id(self.home))
        return id_file.read_text().strip()

    def start(self, timeout_s: float = 120.0) -> list[int]:
        """Start every node that is not running and wait until the cluster reports all of them; returns the pids."""
        # All nodes start before any is awaited: a node answers only once a majority of the voters is up.
        launched = {node.node_id: node.launch() for node in self.nodes if node.pid() is None}
        try:
            for node in self.nodes:
                if node.node_id in launched:
                    node.wait_ready(launched[node.node_id], timeout_s)
            self._wait_for_brokers(timeout_s)
        except BrokerError:
            self.stop()
            raise
        return [node.pid() or 0 for node in self.nodes]

    def _wait_for_brokers(self, timeout_s: float) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 3})
        deadline = time.monotonic() + timeout_s
        registered = 0
        while time.monotonic() < deadline:
            try:
                registered = len(admin.list_topics(timeout=2).brokers)
            except KafkaException:
                registered = 0
            if registered == self.size:
                return
            time.sleep(0.5)
        raise BrokerError(
            f"only {registered} of {self.size} local brokers registered within {timeout_s:.0f} s; "
            f"see the logs under {self.folder}"
        )

    def stop(self, timeout_s: float = 30.0) -> int:
        """Stop every node; returns how many were running."""
        running = [node for node in self.nodes if node.pid() is not None]
        # Signal all at once: a node stopped last on its own would wait for a controller quorum that is gone.
        for node in running:
            pid = node.pid()
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
        for node in running:
            node.stop(timeout_s)
        return len(running)


def ensure_topic(settings: Settings, timeout_s: float = 30.0) -> bool:
    """Create the topic with the project's limits; True if created, False if it already existed."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(admin_config(settings))
    config = {
        "max.message.bytes": str(settings.kafka_limit_bytes),
        # The broker's append time orders corrections across partitions (see README, "Duplicates").
        "message.timestamp.type": "LogAppendTime",
    }
    if settings.topic_min_insync_replicas is not None:
        config["min.insync.replicas"] = str(settings.topic_min_insync_replicas)
    topic = NewTopic(
        settings.topic,
        num_partitions=settings.topic_partitions,
        replication_factor=settings.topic_replication or -1,  # -1: the cluster's default.replication.factor
        config=config,
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


def raise_topic_limit(admin: AdminClient, settings: Settings, timeout_s: float = 30.0) -> bool:
    """Raise an existing topic's max.message.bytes to the project's limit (never lower it); True if changed."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    resource = ConfigResource(ResourceType.TOPIC, settings.topic)
    current = admin.describe_configs([resource])[resource].result(timeout=timeout_s)
    if int(current["max.message.bytes"].value) >= settings.kafka_limit_bytes:
        return False
    entry = ConfigEntry(
        "max.message.bytes", str(settings.kafka_limit_bytes), incremental_operation=AlterConfigOpType.SET
    )
    change = ConfigResource(ResourceType.TOPIC, settings.topic, incremental_configs=[entry])
    admin.incremental_alter_configs([change])[change].result(timeout=timeout_s)
    return True


def describe(settings: Settings, timeout_s: float = 5.0) -> dict[str, object]:
    """Brokers and the topic's partitions as the cluster reports them."""
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient(admin_config(settings)).list_topics(timeout=timeout_s)
    topic = metadata.topics.get(settings.topic)
    partitions = [] if topic is None or topic.error else list(topic.partitions.values())
    return {
        "brokers": sorted(f"{b.host}:{b.port}" for b in metadata.brokers.values()),
        "topic": settings.topic,
        "partitions": len(partitions) if partitions else None,
        "replicas": max((len(p.replicas) for p in partitions), default=None),
        # Partitions with a replica out of sync: a broker is down or behind (alert on this, see DEPLOY.md).
        "under_replicated": sum(1 for p in partitions if len(p.isrs) < len(p.replicas)),
    }
