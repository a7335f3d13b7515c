"""One Kafka client properties file (LAKEHOUSE_KAFKA_PROPERTIES) configures the producer, the admin client and
Spark's Kafka source alike; what cannot be given to both is refused with a message that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from lake.errors import KafkaConfigError
from lake.kafka import admin_config
from lake.settings import Settings
from pipeline.kafka.produce import producer_config
from pipeline.stream.source import kafka_options

SASL_SSL = r"""# as Kafka's own tools take it (--command-config); \\ is a backslash, which JAAS then reads as an escape
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required \
    username="lakehouse" password="s3cr\\"et";
ssl.truststore.type=PEM
ssl.truststore.location={ca_file}
ssl.endpoint.identification.algorithm=https
client.id=kpi-lakehouse
librdkafka.socket.keepalive.enable=true
java.metadata.max.age.ms=60000
"""


def settings_with(tmp_path: Path, text: str) -> Settings:
    properties = tmp_path / "client.properties"
    properties.write_text(text)
    return Settings(kafka_bootstrap="broker-1:9093,broker-2:9093", kafka_properties=properties)


def test_one_file_configures_producer_admin_and_spark(tmp_path: Path) -> None:
    import certifi  # a real PEM bundle: librdkafka reads the CA file when the producer is made
    from confluent_kafka import Producer

    settings = settings_with(tmp_path, SASL_SSL.replace("{ca_file}", certifi.where()))
    producer = producer_config(settings)
    assert producer["security.protocol"] == "SASL_SSL" and producer["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (producer["sasl.username"], producer["sasl.password"]) == ("lakehouse", 's3cr"et')
    assert producer["ssl.ca.location"] == certifi.where()
    assert producer["socket.keepalive.enable"] == "true"
    assert not any(
        key.startswith(("java.", "librdkafka.", "ssl.truststore")) or key == "sasl.jaas.config" for key in producer
    )
    # The project's own keys win over the file: delivery guarantees and size limits stay as the README says.
    assert producer["acks"] == "all" and producer["enable.idempotence"] is True
    assert producer["bootstrap.servers"] == "broker-1:9093,broker-2:9093"
    Producer(producer)  # librdkafka accepts every key (it refuses unknown ones when the client is made)
    assert admin_config(settings)["sasl.username"] == "lakehouse"

    spark = kafka_options(settings)
    assert spark["kafka.security.protocol"] == "SASL_SSL"
    assert spark["kafka.sasl.jaas.config"].startswith("org.apache.kafka.common.security.scram.ScramLoginModule")
    assert spark["kafka.ssl.truststore.type"] == "PEM"
    assert spark["kafka.metadata.max.age.ms"] == "60000"
    assert "kafka.socket.keepalive.enable" not in spark
    assert spark["kafka.bootstrap.servers"] == "broker-1:9093,broker-2:9093"


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("security.protocol=SSL\nssl.truststore.location=/etc/kafka/truststore.jks\n", "PEM"),
        ("security.protocol=SASL_SSL\nsasl.mechanism=OAUTHBEARER\nsasl.jaas.config=x required;\n", "librdkafka.sasl"),
    ],
)
def test_settings_only_one_client_can_read_are_refused(tmp_path: Path, text: str, hint: str) -> None:
    with pytest.raises(KafkaConfigError, match=hint):
        producer_config(settings_with(tmp_path, text))


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    settings = Settings(kafka_properties=tmp_path / "nowhere.properties")
    with pytest.raises(KafkaConfigError, match="nowhere.properties"):
        kafka_options(settings)


def test_trusted_certificates_inline_reach_both_clients(tmp_path: Path) -> None:
    import certifi
    import javaproperties
    from confluent_kafka import Producer

    bundle = Path(certifi.where()).read_text()
    first_certificate = bundle[bundle.index("-----BEGIN") : bundle.index("-----END CERTIFICATE-----") + 25]
    text = javaproperties.dumps(
        {"security.protocol": "SSL", "ssl.truststore.type": "PEM", "ssl.truststore.certificates": first_certificate},
        timestamp=False,
    )
    settings = settings_with(tmp_path, text)
    producer = producer_config(settings)
    assert producer["ssl.ca.pem"] == first_certificate
    Producer(producer)  # librdkafka parses the certificate when the producer is made
    assert kafka_options(settings)["kafka.ssl.truststore.certificates"] == first_certificate
