"""A secured Kafka: a KRaft broker that speaks SASL_SSL only (SCRAM-SHA-512 over TLS, a CA made here) and enforces
ACLs. With one LAKEHOUSE_KAFKA_PROPERTIES file per principal, `produce`, the pipeline, `audit`, `doctor` and the API's
lag work; a wrong password or a missing ACL stops each client at once with a message that names the cause."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from bench.processes import free_port, lakehouse, running_api
from lake.settings import Settings
from lake.tables import LakePaths
from tests.conftest import HOME
from tests.reference import assert_kpis_equal, gold_kpis
from tests.stream import Stream, few_devices

pytestmark = [pytest.mark.kafka, pytest.mark.spark]

TOPIC = "secured-telemetry"
T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)
# The principals: the broker's own (a super user), the pipeline's (reads), and the producers' (writes).
ADMIN, PIPELINE, PRODUCER = (
    ("admin", "admin-secret"),
    ("lakehouse", "pipeline-secret"),
    ("device-gw", "producer-secret"),
)
# Every client of the pipeline's principal: Spark's Kafka source names its groups spark-kafka-source-*, the
# project's own offset readers kpi-lakehouse-*.
PIPELINE_GROUP_PREFIXES = ("spark-kafka-source-", "kpi-lakehouse")
# A failing client must give up within this, not retry forever.
FAIL_WITHIN_S = 120


def make_tls_files(folder: Path, keystore_password: str) -> tuple[Path, Path]:
    """A CA and a broker certificate it signs for localhost and 127.0.0.1; returns (CA PEM, broker PKCS12)."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=kpi-lakehouse test CA",
    )  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=localhost"
    )
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "broker.pem", "-days", "2", "-extfile", "san.ext",
    )  # fmt: skip
    openssl(
        "pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key", "-certfile", "ca.pem",
        "-out", "broker.p12", "-passout", f"pass:{keystore_password}", "-name", "broker",
    )  # fmt: skip
    return folder / "ca.pem", folder / "broker.p12"


def client_properties(path: Path, user: tuple[str, str], ca_file: Path) -> Path:
    """The file DEPLOY.md shows, for one principal."""
    name, password = user
    path.write_text(
        "security.protocol=SASL_SSL\n"
        "sasl.mechanism=SCRAM-SHA-512\n"
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required \\\n"
        f'    username="{name}" password="{password}";\n'
        "ssl.truststore.type=PEM\n"
        f"ssl.truststore.location={ca_file}\n"
    )
    path.chmod(0o600)
    return path


def grant_acls(bootstrap: str, admin: dict[str, str], topic: str) -> None:
    """The ACLs of DEPLOY.md: the pipeline reads the topic (and its configs, for doctor) in its own groups, the
    producers write to it."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    def allow(
        user: str, kind: ResourceType, name: str, operation: AclOperation, pattern: ResourcePatternType
    ) -> AclBinding:
        return AclBinding(kind, name, pattern, f"User:{user}", "*", operation, AclPermissionType.ALLOW)

    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    bindings = [
        *(
            allow(PIPELINE[0], ResourceType.TOPIC, topic, operation, literal)
            for operation in (AclOperation.READ, AclOperation.DESCRIBE, AclOperation.DESCRIBE_CONFIGS)
        ),
        *(
            allow(PIPELINE[0], ResourceType.GROUP, prefix, AclOperation.READ, prefixed)
            for prefix in PIPELINE_GROUP_PREFIXES
        ),
        allow(PIPELINE[0], ResourceType.BROKER, "kafka-cluster", AclOperation.DESCRIBE_CONFIGS, literal),
        allow(PRODUCER[0], ResourceType.TOPIC, topic, AclOperation.WRITE, literal),
        allow(PRODUCER[0], ResourceType.TOPIC, topic, AclOperation.DESCRIBE, literal),
    ]
    client = AdminClient({**admin, "bootstrap.servers": bootstrap, "log_level": 3})
    for future in client.create_acls(bindings).values():
        future.result(timeout=30)


@dataclass(frozen=True)
class SecuredKafka:
    bootstrap: str
    pipeline: Path  # client properties of the pipeline's principal
    producer: Path  # of the producers' principal
    wrong_password: Path  # the pipeline's principal with a wrong password
    home: Path


@pytest.fixture(scope="module")
def secured_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredKafka]:
    from pipeline.kafka.broker import BrokerSecurity, LocalBroker, ensure_topic

    folder = tmp_path_factory.mktemp("secured-kafka")
    ca_file, keystore = make_tls_files(folder / "tls", "keystore-secret")
    home = folder / "home"  # the broker's files apart from the shared test broker's; the jars are the project's
    home.mkdir()
    (home / "jars").symlink_to((HOME / "jars").resolve())
    security = BrokerSecurity(keystore, "keystore-secret", ca_file, *ADMIN, users=(PIPELINE, PRODUCER))
    port = free_port()
    while not _port_free(port + 1):  # the controller listens on the next port
        port = free_port()
    broker = LocalBroker(home, "localhost", port, Settings().kafka_limit_bytes, heap="384m", security=security)
    broker.start()
    try:
        bootstrap = f"localhost:{port}"
        admin_file = client_properties(folder / "admin.properties", ADMIN, ca_file)
        admin = Settings(kafka_bootstrap=bootstrap, topic=TOPIC, kafka_properties=admin_file, home=HOME)
        assert ensure_topic(admin) is True
        grant_acls(bootstrap, security.admin_client_config(), TOPIC)
        yield SecuredKafka(
            bootstrap=bootstrap,
            pipeline=client_properties(folder / "pipeline.properties", PIPELINE, ca_file),
            producer=client_properties(folder / "producer.properties", PRODUCER, ca_file),
            wrong_password=client_properties(folder / "wrong.properties", (PIPELINE[0], "not-the-password"), ca_file),
            home=home,
        )
    finally:
        broker.stop()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def settings_for(kafka: SecuredKafka, properties: Path, lake: Path) -> Settings:
    return Settings(
        kafka_bootstrap=kafka.bootstrap,
        topic=TOPIC,
        kafka_properties=properties,
        lake_root=str(lake / "lake"),
        home=HOME,
        api_store_dir=lake / "api-store",
        spark_master="local[2]",
        shuffle_partitions=2,
        spark_driver_memory="1g",
    )


def build_stream(messages: int = 120) -> Stream:
    """Single readings, batches and corrections from a few devices, over two minutes."""
    return few_devices(T0, messages)


def timed(settings: Settings, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = lakehouse(settings, *args, timeout=FAIL_WITHIN_S + 60)
    return result, time.monotonic() - started


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command's own last word: one line that names the cause (above it, Spark's log may show the JVM's)."""
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr[-3000:]
    return line


def test_every_client_works_with_one_properties_file_per_principal(secured_kafka: SecuredKafka, tmp_path: Path) -> None:
    from lake.duck import connect

    stream = build_stream()
    producer = settings_for(secured_kafka, secured_kafka.producer, tmp_path)
    pipeline = settings_for(secured_kafka, secured_kafka.pipeline, tmp_path)

    sent = lakehouse(producer, "produce", str(stream.write(tmp_path / "messages.ndjson")))
    assert sent.returncode == 0, sent.stderr
    assert f"sent {len(stream.messages):,} messages" in sent.stderr

    ran = lakehouse(pipeline, "pipeline", "--available-now")
    assert ran.returncode == 0, ran.stderr[-3000:]
    gold = gold_kpis(connect(LakePaths.from_settings(pipeline)))
    expected = stream.reference().buckets()
    assert set(gold) == set(expected)
    for second, want in expected.items():
        assert_kpis_equal(gold[second], want, f"gold {second}")

    audited = lakehouse(pipeline, "audit", "--json")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    report = json.loads(audited.stdout)
    assert report["kafka_error"] is None
    assert sum(p["kafka_end_offset"] for p in report["partitions"]) == len(stream.messages)

    doctor = lakehouse(pipeline, "doctor", "--json")
    findings = {f["check"]: f for f in json.loads(doctor.stdout)}
    assert findings["Kafka"]["status"] == "ok" and findings["topic"]["status"] == "ok", findings
    assert findings["checkpoint"]["status"] == "ok", findings
    assert not [f for f in findings.values() if f["status"] == "fail"], findings

    with running_api(pipeline) as base:
        deadline = time.monotonic() + 30
        while (body := httpx.get(f"{base}/health", timeout=5).json())["pipeline"]["records_behind"] is None:
            assert time.monotonic() < deadline, body
            time.sleep(0.3)
    assert body["pipeline"]["kafka_error"] is None
    assert body["pipeline"]["records_behind"] == 0, body


def test_a_wrong_password_is_named_and_nothing_waits(secured_kafka: SecuredKafka, tmp_path: Path) -> None:
    settings = settings_for(secured_kafka, secured_kafka.wrong_password, tmp_path)
    message = tmp_path / "one.ndjson"
    message.write_text('{"device_id": "pump-1", "timestamp": "2024-07-30T12:00:00Z", "value": 1}\n')

    for args in (("produce", str(message)), ("pipeline", "--available-now")):
        result, seconds = timed(settings, *args)
        assert result.returncode == 1, (args, result.stderr[-3000:])
        assert "refused the credentials" in last_line(result), result.stderr[-3000:]
        assert seconds < FAIL_WITHIN_S, (args, seconds)

    audited = lakehouse(settings, "audit", "--json")
    assert "refused the credentials" in json.loads(audited.stdout)["kafka_error"]
    doctor = {f["check"]: f for f in json.loads(lakehouse(settings, "doctor", "--json").stdout)}
    assert doctor["Kafka"]["status"] == "fail" and "refused the credentials" in doctor["Kafka"]["detail"]


def test_a_missing_acl_is_named_and_nothing_waits(secured_kafka: SecuredKafka, tmp_path: Path) -> None:
    message = tmp_path / "one.ndjson"
    message.write_text('{"device_id": "pump-1", "timestamp": "2024-07-30T12:00:00Z", "value": 1}\n')
    # The pipeline's principal may not write; the producers' may not read.
    reader = settings_for(secured_kafka, secured_kafka.pipeline, tmp_path)
    result, seconds = timed(reader, "produce", str(message))
    assert result.returncode == 1 and seconds < FAIL_WITHIN_S, result.stderr[-3000:]
    assert "not allowed to write to topic" in last_line(result), result.stderr

    writer = settings_for(secured_kafka, secured_kafka.producer, tmp_path)
    sent = lakehouse(writer, "produce", str(message))  # a record the producers' principal cannot read back
    assert sent.returncode == 0, sent.stderr
    result, seconds = timed(writer, "pipeline", "--available-now")
    assert result.returncode == 1 and seconds < FAIL_WITHIN_S, result.stderr[-3000:]
    assert "not allowed to read topic" in last_line(result), result.stderr[-3000:]
