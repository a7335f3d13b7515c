"""`lakehouse produce` against the real broker: keys, limits, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.processes import lakehouse
from lake.settings import Settings

pytestmark = pytest.mark.kafka


def consume_all(settings: Settings, expected: int, timeout_s: float = 30) -> list[tuple[bytes | None, bytes]]:
    import time

    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": "test-reader",
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": settings.kafka_limit_bytes,
        }
    )
    consumer.subscribe([settings.topic])
    got: list[tuple[bytes | None, bytes]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < expected and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            got.append((message.key(), message.value()))
    consumer.close()
    return got


def test_over_limit_line_is_named_and_the_others_are_sent(lake_settings: Settings, topic: str, tmp_path: Path) -> None:
    limit = lake_settings.max_message_bytes
    at_limit = json.dumps({"device_id": "big", "readings": [], "pad": ""}).encode()
    at_limit = at_limit[:-2] + b"x" * (limit - len(at_limit)) + b'"}'
    assert len(at_limit) == limit
    lines = [
        json.dumps({"device_id": "pump-7", "timestamp": "2024-07-30T12:00:00Z", "value": 1}).encode(),
        b"x" * (limit + 1),
        at_limit,
        b"",
        json.dumps([{"device_id": "valve-2", "timestamp": "2024-07-30T12:00:00Z", "value": 1}]).encode(),
    ]
    path = tmp_path / "in.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = lakehouse(lake_settings, "produce", str(path), timeout=120)
    assert result.returncode == 1
    assert "line 2: message of 5,242,881 bytes exceeds LAKEHOUSE_MAX_MESSAGE_BYTES=5,242,880" in result.stderr
    assert "sent 3 messages" in result.stderr and "1 blank lines ignored" in result.stderr

    received = consume_all(lake_settings, 3)
    assert sorted(key or b"" for key, _ in received) == [b"big", b"pump-7", b"valve-2"]
    assert max(len(value) for _, value in received) == limit  # a message at the limit passes producer, topic, broker
