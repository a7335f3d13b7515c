"""What every Kafka client of the project shares: the client settings from one properties file
(LAKEHOUSE_KAFKA_PROPERTIES), for the producer and admin client (librdkafka) and Spark's Kafka source (the Java
client), so that security is configured once for both; and the one reader of Kafka's offsets, for the lag that
audit, doctor and the API report."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from lake.errors import KafkaConfigError
from lake.settings import Settings

if TYPE_CHECKING:
    from confluent_kafka import Consumer

# The file speaks the Java client's names (as Kafka's own tools and Spark do). These few are spelled differently in
# librdkafka, or mean nothing there, and are translated below; every other key means the same in both clients.
_JAVA_ONLY = {
    "sasl.jaas.config",
    "ssl.truststore.location",
    "ssl.truststore.type",
    "ssl.truststore.password",
    "ssl.truststore.certificates",
    "ssl.keystore.type",
}
# Keys for one client only, for what has no common spelling (say, an OAUTHBEARER callback class).
LIBRDKAFKA_PREFIX = "librdkafka."
JAVA_PREFIX = "java."
_JAAS_OPTION = re.compile(r'(\w+)\s*=\s*"((?:[^"\\]|\\.)*)"')


def load_properties(path: Path | None) -> dict[str, str]:
    """The file's key/value pairs in the Java client's spelling; empty without a file."""
    import javaproperties

    if path is None:
        return {}
    try:
        with path.open(encoding="utf-8") as handle:
            return dict(javaproperties.load(handle))
    except OSError as exc:
        raise KafkaConfigError(f"cannot read LAKEHOUSE_KAFKA_PROPERTIES={path}: {exc.strerror}; fix the path") from exc


def java_properties(settings: Settings) -> dict[str, str]:
    """Properties for the Java client (Spark's source takes each with a `kafka.` prefix)."""
    loaded = load_properties(settings.kafka_properties)
    shared = {k: v for k, v in loaded.items() if not k.startswith((LIBRDKAFKA_PREFIX, JAVA_PREFIX))}
    own = {k.removeprefix(JAVA_PREFIX): v for k, v in loaded.items() if k.startswith(JAVA_PREFIX)}
    return shared | own


def librdkafka_properties(settings: Settings) -> dict[str, str]:
    """The same properties in librdkafka's spelling, for confluent-kafka's producer and admin client."""
    loaded = load_properties(settings.kafka_properties)
    one_client = (LIBRDKAFKA_PREFIX, JAVA_PREFIX)
    translated = {k: v for k, v in loaded.items() if k not in _JAVA_ONLY and not k.startswith(one_client)}
    jaas = loaded.get("sasl.jaas.config")
    if jaas is not None:
        options = {name: re.sub(r"\\(.)", r"\1", value) for name, value in _JAAS_OPTION.findall(jaas)}
        if "username" in options and "password" in options:
            translated["sasl.username"] = options["username"]
            translated["sasl.password"] = options["password"]
        elif not any(k.startswith(LIBRDKAFKA_PREFIX + "sasl.") for k in loaded):
            raise KafkaConfigError(
                f"sasl.jaas.config in {settings.kafka_properties} has no username/password, which is all the "
                "producer can take from it; give the producer's own SASL settings as librdkafka.sasl.* keys"
            )
    truststore = loaded.get("ssl.truststore.location")
    if truststore is not None:
        if loaded.get("ssl.truststore.type", "JKS").upper() != "PEM":
            raise KafkaConfigError(
                f"ssl.truststore.location in {settings.kafka_properties} must be a PEM file with "
                "ssl.truststore.type=PEM, which both Spark and the producer read; convert a JKS truststore with "
                "keytool -exportcert -rfc, or give the producer librdkafka.ssl.ca.location"
            )
        translated["ssl.ca.location"] = truststore
    if "ssl.truststore.certificates" in loaded:  # PEM text in the file itself: nothing to copy to every executor
        translated["ssl.ca.pem"] = loaded["ssl.truststore.certificates"]
    if "ssl.keystore.location" in loaded and loaded.get("ssl.keystore.type", "").upper() not in {"PKCS12", ""}:
        raise KafkaConfigError(
            f"ssl.keystore.location in {settings.kafka_properties} must be PKCS12 (ssl.keystore.type=PKCS12) to be "
            "read by both clients; or give the producer librdkafka.ssl.certificate.location and ssl.key.location"
        )
    # Java's empty value turns host name checks off; librdkafka says so with "none".
    if translated.get("ssl.endpoint.identification.algorithm") == "":
        translated["ssl.endpoint.identification.algorithm"] = "none"
    own = {k.removeprefix(LIBRDKAFKA_PREFIX): v for k, v in loaded.items() if k.startswith(LIBRDKAFKA_PREFIX)}
    return translated | own


_REFUSED_LOGIN = ("SaslAuthenticationException", "SASL authentication error", "Authentication failed")
_REFUSED_TLS = ("SslAuthenticationException", "SSL handshake failed", "certificate verify failed")
_REFUSED_TOPIC = ("TopicAuthorizationException", "TOPIC_AUTHORIZATION_FAILED", "Not authorized to access topics")
_REFUSED_GROUP = ("GroupAuthorizationException", "GROUP_AUTHORIZATION_FAILED", "Not authorized to access group")


def security_problem(error: object, settings: Settings, action: str) -> str | None:
    """What a Kafka client's error (either client's, as text) means when Kafka refused the principal of the client
    properties: one sentence naming the cause and what to change; None for any other error. `action` is what the
    client was doing to the topic ("read", "write to")."""
    text = str(error)
    source = (
        f"LAKEHOUSE_KAFKA_PROPERTIES={settings.kafka_properties}"
        if settings.kafka_properties
        else "the client (no LAKEHOUSE_KAFKA_PROPERTIES)"
    )
    acls = "grant it the ACLs in DEPLOY.md, 'Kafka security'"
    if any(sign in text for sign in _REFUSED_LOGIN):
        return (
            f"Kafka at {settings.kafka_bootstrap} refused the credentials of {source}: check the username and password "
            "in sasl.jaas.config, and sasl.mechanism"
        )
    if any(sign in text for sign in _REFUSED_TLS):
        return (
            f"the TLS handshake with Kafka at {settings.kafka_bootstrap} failed with {source}: check that "
            "ssl.truststore.location holds the CA that signed the brokers' certificates, and the brokers' host names"
        )
    if any(sign in text for sign in _REFUSED_TOPIC):
        return f"the principal of {source} is not allowed to {action} topic {settings.topic!r}: {acls}"
    if any(sign in text for sign in _REFUSED_GROUP):
        return f"the principal of {source} is not allowed to {action} topic {settings.topic!r} in its consumer groups: {acls}"
    if "ClusterAuthorizationException" in text or "CLUSTER_AUTHORIZATION_FAILED" in text:
        # An idempotent producer is refused its producer id unless it may write to some topic.
        return f"the principal of {source} is not allowed to {action} topic {settings.topic!r} (the cluster refused it): {acls}"
    return None


# A confluent-kafka client's configuration: librdkafka property names and their scalar values.
ClientConfig: TypeAlias = dict[str, str | int | float | bool]


def admin_config(settings: Settings) -> ClientConfig:
    """An admin client's settings: the client properties, then the bootstrap servers."""
    return {**librdkafka_properties(settings), "bootstrap.servers": settings.kafka_bootstrap, "log_level": 3}


@dataclass(frozen=True)
class Watermarks:
    """The offsets Kafka holds for one partition: `low` is the oldest still kept, `high` the end as a read_committed
    reader (the pipeline) sees it: the next to be written, or an open transaction's first (the last stable offset)."""

    low: int
    high: int


def watermarks(
    settings: Settings, timeout_s: float = 10, group: str = "kpi-lakehouse"
) -> dict[tuple[str, int], Watermarks]:
    """Kafka's offsets per partition of the topic, asked with the client properties' security.

    Raises confluent_kafka.KafkaException when the broker does not answer within the timeout or the topic is missing.
    """
    from confluent_kafka import Consumer, KafkaException

    # Errors the client only logs (a refused login) explain the time-out that follows.
    logged: list[str] = []
    # No offsets are committed: watermarks only need a consumer, not a group's state.
    consumer = Consumer(
        admin_config(settings)
        | {
            "group.id": group,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",  # librdkafka's default, said here because `high` depends on it
            "socket.timeout.ms": max(100, int(timeout_s * 1000)),
            "log_level": 0,
            "error_cb": lambda error: logged.append(str(error)),
        }  # a broker that does not answer is reported by the caller, not logged on every poll
    )
    try:
        return _watermarks(consumer, settings, timeout_s)
    except KafkaException as exc:
        consumer.poll(0)  # serves the error callbacks
        problem = security_problem(" ".join([str(exc), *logged]), settings, "read")
        if problem is not None:
            raise KafkaException(problem) from exc
        raise
    finally:
        consumer.close()


def _watermarks(consumer: Consumer, settings: Settings, timeout_s: float) -> dict[tuple[str, int], Watermarks]:
    from confluent_kafka import KafkaException, TopicPartition

    metadata = consumer.list_topics(settings.topic, timeout=timeout_s)
    described = metadata.topics.get(settings.topic)
    if described is None or described.error is not None:
        why = described.error if described is not None else "no metadata"
        raise KafkaException(f"topic {settings.topic!r} not found on {settings.kafka_bootstrap}: {why}")
    found = {}
    for partition in sorted(described.partitions):
        low, high = consumer.get_watermark_offsets(TopicPartition(settings.topic, partition), timeout=timeout_s)
        found[(settings.topic, partition)] = Watermarks(low, high)
    return found


@dataclass(frozen=True)
class OffsetRange:
    """Offsets `first` to `last` of one partition, both included."""

    topic: str
    partition: int
    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1


def records_in(settings: Settings, ranges: list[OffsetRange], committed: bool, timeout_s: float = 30) -> list[int]:
    """How many records Kafka returns in each range: with `committed`, as `read_committed` readers (the pipeline)
    see them, else with the records of aborted transactions too. A transaction's markers take offsets no reader
    sees. Raises confluent_kafka.KafkaException when Kafka does not answer."""
    import time

    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    consumer = Consumer(
        admin_config(settings)
        | {
            "group.id": "kpi-lakehouse-audit",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed" if committed else "read_uncommitted",
            "auto.offset.reset": "error",  # an offset Kafka no longer holds is an error, not a jump to the end
            "max.partition.fetch.bytes": settings.kafka_limit_bytes,
            "fetch.max.bytes": max(50 * 1024 * 1024, settings.kafka_limit_bytes),
        }
    )
    counts = []
    try:
        for wanted in ranges:
            # A new assignment, not a seek within this one: the records fetched for the last range go with it.
            consumer.unassign()
            consumer.assign([TopicPartition(wanted.topic, wanted.partition, wanted.first)])
            deadline, count = time.monotonic() + timeout_s, 0
            while True:
                if time.monotonic() > deadline:
                    raise KafkaException(f"no answer from Kafka within {timeout_s:g} s reading {wanted}")
                message = consumer.poll(1.0)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        break
                    raise KafkaException(error)
                offset = message.offset()
                if message.partition() != wanted.partition or (offset is not None and offset < wanted.first):
                    continue  # fetched for an earlier range
                if offset is None or offset > wanted.last:
                    break
                count += 1
                if offset == wanted.last:
                    break
            counts.append(count)
    finally:
        consumer.close()
    return counts


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    newest_offset: int | None  # Kafka's high watermark: the offset the next record will get
    processed_offset: int | None  # the next offset the pipeline will read (0 when it has read nothing)

    @property
    def records_behind(self) -> int | None:
        if self.newest_offset is None:
            return None
        return max(0, self.newest_offset - (self.processed_offset or 0))


def lag(newest: dict[tuple[str, int], Watermarks] | None, processed: dict[tuple[str, int], int]) -> list[PartitionLag]:
    """One row per partition known to either side; Kafka's side is None when it could not be asked."""
    known = newest or {}
    keys = sorted(set(known) | set(processed))
    return [PartitionLag(t, p, known[(t, p)].high if (t, p) in known else None, processed.get((t, p))) for t, p in keys]
