"""`lakehouse doctor` against the real broker: a healthy set-up passes, a limit too low on one layer is named with
the setting to change, and `lakehouse kafka start` raises the topic's limit (README, 'Message size')."""

from __future__ import annotations

import json

import pytest

from bench.processes import lakehouse
from lake.settings import MIB, Settings

pytestmark = pytest.mark.kafka


def doctor(settings: Settings) -> tuple[int, dict[str, dict[str, str]]]:
    result = lakehouse(settings, "doctor", "--json", timeout=120)
    findings = json.loads(result.stdout)
    return result.returncode, {f["check"]: f for f in findings}


def set_topic_limit(settings: Settings, limit: int) -> None:
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    entry = ConfigEntry("max.message.bytes", str(limit), incremental_operation=AlterConfigOpType.SET)
    change = ConfigResource(ResourceType.TOPIC, settings.topic, incremental_configs=[entry])
    admin.incremental_alter_configs([change])[change].result(timeout=30)


def test_doctor_names_the_layer_whose_limit_is_too_low(lake_settings: Settings, topic: str) -> None:
    code, found = doctor(lake_settings)
    assert code == 0, found
    assert {"Java", "JVM jars", "DuckDB delta extension", "Kafka", "topic", "size limits"} <= found.keys()
    assert all(f["status"] != "fail" for f in found.values())

    # Someone lowered the topic's limit: a 5 MiB message would be refused by the broker.
    set_topic_limit(lake_settings, 1 * MIB)
    code, found = doctor(lake_settings)
    assert code == 1
    assert found["topic limit"]["status"] == "fail"
    assert "max.message.bytes is 1,048,576" in found["topic limit"]["detail"]
    assert "lakehouse kafka start" in found["topic limit"]["fix"]

    # `lakehouse kafka start` on the running local broker raises the topic's limit back.
    started = lakehouse(lake_settings, "kafka", "start", timeout=120)
    assert started.returncode == 0, started.stderr
    code, found = doctor(lake_settings)
    assert code == 0, found

    # A limit raised in the settings but not on the broker: the broker and topic are named.
    bigger = lake_settings.model_copy(update={"max_message_bytes": 8 * MIB})
    code, found = doctor(bigger)
    assert code == 1
    assert found["topic limit"]["status"] == "fail" and found["broker limit"]["status"] == "fail"
    assert "LAKEHOUSE_MAX_MESSAGE_BYTES=8,388,608" in found["topic limit"]["detail"]
    assert "lakehouse kafka stop && lakehouse kafka start" in found["broker limit"]["fix"]


def test_doctor_fails_clearly_without_kafka(lake_settings: Settings) -> None:
    nowhere = lake_settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"})
    code, found = doctor(nowhere)
    assert code == 1
    assert found["Kafka"]["status"] == "fail" and "lakehouse kafka start" in found["Kafka"]["fix"]
