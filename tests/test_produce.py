"""`lakehouse produce`: the synthetic fleet's messages (forms, metrics, ranges, time order, broken input, size
limit) without a broker, and against the real broker: keys, limits, clear errors."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bench.processes import lakehouse
from lake.settings import Settings
from lake.tables import METRIC_NAME
from lake.timestamps import from_us, parse_timestamp_us
from pipeline.kafka.synthetic import (
    BAD_MESSAGES,
    BAD_READINGS,
    CATALOGUE,
    Fleet,
    generate,
    metric_names,
    metric_range,
)

ALLOWED_LATENESS = timedelta(minutes=5)  # LAKEHOUSE_ALLOWED_LATENESS's default


def readings(fleet: Fleet) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(device, reading, in a batch) of every message of the fleet, in the order sent."""
    for message in generate(fleet):
        document = json.loads(message)
        if "readings" in document:
            for reading in document["readings"]:
                yield document["device_id"], reading, True
        else:
            yield document.pop("device_id"), document, False


def moment(reading: dict[str, Any]) -> datetime:
    return from_us(parse_timestamp_us(reading["timestamp"]))


def test_the_default_fleet_sends_value_alone_exactly_as_before() -> None:
    """The default fleet (the benchmark's backlog, the README's demo of old) does not change with the new options."""
    digest = hashlib.sha256()
    for message in generate(Fleet(messages=300, full_batches=2, max_message_bytes=65536)):
        digest.update(message + b"\n")
    assert digest.hexdigest() == "78cf51a7bc219f651e03978e2ef8a7b49c037c20290671e885ee6a9a2f01331d"
    for _, reading, _ in readings(Fleet(messages=200)):
        assert set(reading) == {"timestamp", "value"} and isinstance(reading["value"], float)


def test_metrics_have_plausible_names_and_stay_in_their_ranges() -> None:
    assert len(CATALOGUE) >= 16 and len({metric.name for metric in CATALOGUE}) == len(CATALOGUE)
    assert metric_names(4) == ["pressure_bar", "flow_m3h", "temperature_c", "battery_pct"]
    names = metric_names(len(CATALOGUE) + 3)
    assert names[-3:] == [f"metric_{n}" for n in range(len(CATALOGUE) + 1, len(CATALOGUE) + 4)]
    seen: set[str] = set()
    for _, reading, _ in readings(Fleet(metrics=len(names), messages=300, full_batches=0, batch_share=0.3)):
        assert set(reading) == {"timestamp", "metrics"}  # the metrics form, never with `value`
        for name, value in reading["metrics"].items():
            assert METRIC_NAME.fullmatch(name), name
            assert isinstance(value, float) and metric_range(name).low <= value <= metric_range(name).high, (
                name,
                value,
            )
            seen.add(name)
    assert seen == set(names)
    for name in ("pressure_bar", "temperature_c", "battery_pct", "motor.temperature_c", "metric_40"):
        assert METRIC_NAME.fullmatch(name)


@pytest.mark.parametrize(
    ("devices", "metrics", "per_reading"),
    [(20, 4, 100), (3, 12, 100), (1, 5, 100), (2, 150, 100), (7, 30, 8)],
    ids=["demo", "few-devices", "one-device", "over-the-reading-limit", "low-limit"],
)
def test_each_device_sends_a_stable_subset_and_every_metric_is_sent(
    devices: int, metrics: int, per_reading: int
) -> None:
    fleet = Fleet(
        devices=devices, metrics=metrics, max_metrics_per_reading=per_reading, messages=400, full_batches=0, seed=3
    )
    sends = fleet.device_metrics()
    sent: dict[str, set[frozenset[str]]] = defaultdict(set)
    for device, reading, _ in readings(fleet):
        sent[device].add(frozenset(reading["metrics"]))
        assert len(reading["metrics"]) <= per_reading  # else quarantined whole (too_many_metrics)
    for device, subsets in sent.items():
        assert subsets == {frozenset(sends[device])}, f"{device} changed the metrics it sends"
    assert set().union(*sends.values()) == set(metric_names(metrics))
    if devices > 1:
        assert any(len(names) < metrics for names in sends.values()), "no device sends only some of the metrics"
        assert any(len(names) == min(metrics, per_reading) for names in sends.values())


def test_too_many_metrics_for_the_fleet_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="LAKEHOUSE_MAX_METRICS_PER_READING=100 each leave some metrics unsent"):
        Fleet(devices=2, metrics=201)


@pytest.mark.parametrize("in_order", [False, True], ids=["at-random", "in-order"])
def test_batches_carry_metrics_and_full_batches_fill_up_to_the_limit(in_order: bool) -> None:
    limit = 200_000
    fleet = Fleet(metrics=6, max_message_bytes=limit, messages=300, full_batches=3, batch_share=0.3, in_order=in_order)
    messages = list(generate(fleet))
    assert max(len(message) for message in messages) <= limit
    full = [message for message in messages if len(message) > limit // 2]
    assert len(full) == 3
    for message in full:
        document = json.loads(message)
        one_more = len(json.dumps(document["readings"][-1], separators=(",", ":")))
        assert len(message) + one_more + 1 > limit, "a full batch leaves room for another reading"
        assert all(set(reading) == {"timestamp", "metrics"} for reading in document["readings"])
    batches = [json.loads(message) for message in messages if message not in full and b'"readings"' in message]
    assert batches and all("metrics" in reading for batch in batches for reading in batch["readings"])


@pytest.mark.parametrize("metrics", [0, 4], ids=["value", "metrics"])
def test_in_order_each_devices_readings_rise_and_none_arrives_late(metrics: int) -> None:
    """As real devices send: each device's readings in time order across its messages, each dated shortly before
    its message is sent, so that no reading is older than the newest one sent before it minus the lateness."""
    fleet = Fleet(metrics=metrics, in_order=True, messages=1500, full_batches=2, max_message_bytes=500_000)
    last: dict[str, datetime] = {}
    newest = fleet.start
    count = 0
    for device, reading, _ in readings(fleet):
        at = moment(reading)
        assert fleet.start <= at <= fleet.start + timedelta(seconds=fleet.span_seconds)
        assert at > last.get(device, fleet.start - timedelta(seconds=1)), f"{device}: {at} after {last[device]}"
        assert at >= newest - ALLOWED_LATENESS, f"{device}: {at} would arrive late (newest sent: {newest})"
        last[device], newest, count = at, max(newest, at), count + 1
    assert count > 1500 and len(last) == fleet.devices
    assert max(last.values()) - fleet.start > timedelta(seconds=fleet.span_seconds * 0.9)  # the whole span


def test_at_random_many_readings_would_arrive_late() -> None:
    """Why the demo sends in order: at random times over ten minutes, a large share is older than the lateness."""
    newest, late, count = Fleet().start, 0, 0
    for _, reading, _ in readings(Fleet(messages=1500, full_batches=0)):
        at = moment(reading)
        late, count, newest = late + (at < newest - ALLOWED_LATENESS), count + 1, max(newest, at)
    assert late > 0.2 * count


@pytest.mark.parametrize("metrics", [0, 4], ids=["value", "metrics"])
def test_a_bad_share_breaks_readings_of_every_kind_and_the_parser_quarantines_them(metrics: int) -> None:
    from pipeline.stream.parse import parse_messages

    fleet = Fleet(metrics=metrics, in_order=True, bad_share=0.05, messages=2000, full_batches=0, batch_share=0.2)
    messages = list(generate(fleet))
    parsed = parse_messages(list(messages))
    quarantined = [(code, name) for code, name in zip(parsed.reason_code, parsed.metric, strict=True) if code]
    expected = {"bad_metric", "bad_value", "bad_shape", "missing_timestamp", "not_json"}
    assert {code for code, _ in quarantined} == expected == {*BAD_READINGS.values(), *BAD_MESSAGES.values()}
    for code, name in quarantined:
        if code in ("bad_metric", "bad_value"):
            assert name, f"{code} without its metric"
            assert bool(METRIC_NAME.fullmatch(name)) == (code == "bad_value")
        else:
            assert name is None, f"{code} names a metric: {name}"
    broken_readings = len({(s, i) for s, i, c in zip(parsed.source, parsed.reading_index, parsed.reason_code) if c})
    all_readings = sum(1 for _ in readings(replace(fleet, bad_share=0.0)))
    assert 0.02 < broken_readings / all_readings < 0.08
    clean = parse_messages(list(generate(Fleet(metrics=metrics, in_order=True, messages=500, full_batches=1))))
    assert not any(clean.reason_code), "a fleet without --bad-share sends nothing for the quarantine"


def test_the_synthetic_options_reach_the_fleet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import lakehouse as cli
    from pipeline.kafka.produce import ProduceReport

    sent: list[bytes] = []

    def send(_settings: Settings, source: Any, **_: Any) -> ProduceReport:
        sent.extend(source)
        return ProduceReport(sent=len(sent), bytes=sum(len(m) for m in sent))

    monkeypatch.setattr("pipeline.kafka.produce.produce", send)
    saved = tmp_path / "fleet.ndjson"
    flags = "produce --synthetic --kinds pump --devices 5 --messages 300 --full-batches 0 --metrics 4 --in-order"
    result = CliRunner().invoke(cli.app, [*flags.split(), "--bad-share", "0.02", "--save", str(saved)])
    assert result.exit_code == 0, result.output
    fleet = Fleet(kinds=("pump",), devices=5, messages=300, full_batches=0, metrics=4, in_order=True, bad_share=0.02)
    assert sent == list(generate(fleet)) == saved.read_bytes().splitlines()
    assert "sent 300 messages" in result.output

    refused = CliRunner().invoke(cli.app, ["produce", "--synthetic", "--devices", "2", "--metrics", "500"])
    assert refused.exit_code == 1 and "use more devices" in refused.output


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
            got.append((message.key(), message.value() or b""))
    consumer.close()
    return got


@pytest.mark.kafka
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
