"""Bad input sent raw by another Kafka client (confluent-kafka without the project's checks): where each lands,
the accounting of `lakehouse audit`, and `lakehouse replay` after a rule change, also when it crashes midway."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from bench.processes import lakehouse
from lake import duck
from lake.settings import Settings
from lake.tables import LakePaths
from tests.reference import (
    Reference,
    assert_kpis_equal,
    assert_rollups_equal,
    expected_rollups,
    gold_kpis,
    rollup_kpis,
)
from tests.stream import dumps, stamp

pytestmark = [pytest.mark.kafka, pytest.mark.spark]

T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)
DAY_FIRST = "%d/%m/%Y %H:%M:%S"  # the format a rule change accepts later


def at(seconds: float) -> str:
    return stamp(T0 + timedelta(seconds=seconds))


@dataclass
class Case:
    name: str
    payload: bytes | None
    # (reading index, reason code[, metric]); without a metric, `bad_value` names `value` and the others none
    quarantined: list[tuple[int | None, str] | tuple[int | None, str, str | None]] = field(default_factory=list)
    # valid readings it carries: (device, time, value[, metric])
    readings: list[tuple[str, datetime, float] | tuple[str, datetime, float, str]] = field(default_factory=list)
    after_replay: list[tuple[int | None, str]] | None = None  # quarantine once DAY_FIRST is accepted

    def quarantine_rows(self, replayed: bool = False) -> list[tuple[int | None, str, str | None]]:
        listed = self.after_replay if replayed and self.after_replay is not None else self.quarantined
        return [_with_metric(entry) for entry in listed]


def _with_metric(
    entry: tuple[int | None, str] | tuple[int | None, str, str | None],
) -> tuple[int | None, str, str | None]:
    if len(entry) == 3:
        return entry  # type: ignore[return-value]
    index, reason = entry[0], entry[1]
    return (index, reason, "value" if reason == "bad_value" else None)


def reading(device: str, seconds: float, value: float) -> dict[str, object]:
    return {"device_id": device, "timestamp": at(seconds), "value": value}


def one(device: str, seconds: float, value: float) -> tuple[str, datetime, float]:
    return (device, T0 + timedelta(seconds=seconds), value)


def named(device: str, seconds: float, value: float, metric: str) -> tuple[str, datetime, float, str]:
    return (device, T0 + timedelta(seconds=seconds), value, metric)


# The names the valid cases use: the test lake keeps exactly as many (LAKEHOUSE_MAX_METRICS), so a new name sent
# after them (`zone.humidity_pct`, last in name order too) is refused.
KNOWN_NAMES = ("value", "pressure_bar", "flow_m3h", "motor.rpm", "temperature_c", "battery_pct")


def metric_cases(per_reading_limit: int) -> list[Case]:
    """Contract sections 1-3 on metrics: each form, and each way a metric is bad."""
    return [
        Case(
            "metric + value",
            dumps({"device_id": "m-1", "timestamp": at(30), "metric": "pressure_bar", "value": 2.5}),
            readings=[named("m-1", 30, 2.5, "pressure_bar")],
        ),
        # The same instant's pressure again with another value: a correction of that metric alone.
        Case(
            "metrics, one a correction",
            dumps({"device_id": "m-1", "timestamp": at(30), "metrics": {"pressure_bar": 2.75, "flow_m3h": 12}}),
            readings=[named("m-1", 30, 2.75, "pressure_bar"), named("m-1", 30, 12.0, "flow_m3h")],
        ),
        Case(
            "bad names beside a good one",
            dumps({"device_id": "m-2", "timestamp": at(31), "metrics": {"temperature_c": 41.2, "9lives": 1, "a b": 2}}),
            [(0, "bad_metric", "9lives"), (0, "bad_metric", "a b")],
            [named("m-2", 31, 41.2, "temperature_c")],
        ),
        Case(
            "non-finite metric beside good ones",
            f'{{"device_id": "m-2", "timestamp": "{at(32)}", "metrics": {{"motor.rpm": 1450, "flow_m3h": 1e999, '
            f'"battery_pct": "full", "temperature_c": 40.5}}}}'.encode(),
            [(0, "bad_value", "flow_m3h"), (0, "bad_value", "battery_pct")],
            [named("m-2", 32, 1450.0, "motor.rpm"), named("m-2", 32, 40.5, "temperature_c")],
        ),
        Case(
            "value and metrics both",
            dumps({"device_id": "m-3", "timestamp": at(33), "value": 1, "metrics": {"flow_m3h": 2}}),
            [(0, "bad_shape", None)],
        ),
        Case(
            "metric without value",
            dumps({"device_id": "m-3", "timestamp": at(33), "metric": "flow_m3h"}),
            [(0, "missing_value", "flow_m3h")],
        ),
        Case("empty metrics", dumps({"device_id": "m-3", "timestamp": at(33), "metrics": {}}), [(0, "missing_value")]),
        Case(
            "too many metrics",
            dumps(
                {
                    "device_id": "m-3",
                    "timestamp": at(34),
                    "metrics": {f"m{i}": i for i in range(per_reading_limit + 1)},
                }
            ),
            [(0, "too_many_metrics", None)],
        ),
        Case(
            "a batch of metric readings",
            dumps(
                {
                    "device_id": "m-4",
                    "readings": [
                        {"timestamp": at(35), "metrics": {"battery_pct": 80, "temperature_c": 39}},
                        {"timestamp": at(36), "value": 7},
                        {"timestamp": at(36), "metric": "bad name", "value": 1},
                    ],
                }
            ),
            [(2, "bad_metric", "bad name")],
            [
                named("m-4", 35, 80.0, "battery_pct"),
                named("m-4", 35, 39.0, "temperature_c"),
                one("m-4", 36, 7.0),
            ],
        ),
        Case(
            "day-first timestamp, two metrics",
            dumps({"device_id": "eu-2", "timestamp": "30/07/2024 12:00:38", "metrics": {"flow_m3h": 3, "value": 4}}),
            [(0, "bad_timestamp", None)],
            after_replay=[],
        ),
        Case(
            "a name past the lake's limit",
            dumps({"device_id": "m-5", "timestamp": at(37), "metrics": {"zone.humidity_pct": 55, "battery_pct": 70}}),
            [(0, "metric_limit", "zone.humidity_pct")],
            [named("m-5", 37, 70.0, "battery_pct")],
        ),
    ]


def cases(limit: int, per_reading_limit: int = 100) -> list[Case]:
    ok = reading("ok-1", 1, 1.0)
    found = [
        Case("not JSON", b"temperature=21.5", [(None, "not_json")]),
        Case("truncated JSON", dumps(ok)[:-9], [(None, "not_json")]),
        Case(
            "not UTF-8",
            b'{"device_id": "caf\xe9", "timestamp": "' + at(2).encode() + b'", "value": 1}',
            [(None, "not_utf8")],
        ),
        Case("empty message", b"", [(None, "not_json")]),
        Case("null value (tombstone)", None, [(None, "not_json")]),
        Case("JSON null", b"null", [(None, "bad_shape")]),
        Case("top-level number", b"42.5", [(None, "bad_shape")]),
        Case("top-level string", b'"pump-7 42.5"', [(None, "bad_shape")]),
        Case("no device_id", dumps({"timestamp": at(3), "value": 3}), [(0, "missing_device_id")]),
        Case("empty device_id", dumps({"device_id": "", "timestamp": at(3), "value": 3}), [(0, "bad_device_id")]),
        Case("numeric device_id", dumps({"device_id": 17, "timestamp": at(3), "value": 3}), [(0, "bad_device_id")]),
        Case("no timestamp", dumps({"device_id": "d", "value": 3}), [(0, "missing_timestamp")]),
        Case(
            "timestamp not a date", dumps({"device_id": "d", "timestamp": "soon", "value": 3}), [(0, "bad_timestamp")]
        ),
        Case(
            "year 0", dumps({"device_id": "d", "timestamp": "0000-07-30T12:00:00Z", "value": 3}), [(0, "bad_timestamp")]
        ),
        Case(
            "year 10000",
            dumps({"device_id": "d", "timestamp": "10000-07-30T12:00:00Z", "value": 3}),
            [(0, "bad_timestamp")],
        ),
        Case("no value", dumps({"device_id": "d", "timestamp": at(4)}), [(0, "missing_value")]),
        Case("value a string", dumps({"device_id": "d", "timestamp": at(4), "value": "42"}), [(0, "bad_value")]),
        Case("value null", dumps({"device_id": "d", "timestamp": at(4), "value": None}), [(0, "bad_value")]),
        Case("value a boolean", dumps({"device_id": "d", "timestamp": at(4), "value": True}), [(0, "bad_value")]),
        Case(
            "value 1e999", f'{{"device_id": "d", "timestamp": "{at(4)}", "value": 1e999}}'.encode(), [(0, "bad_value")]
        ),
        Case(
            "readings not an array",
            dumps({"device_id": "d", "readings": {"timestamp": at(5), "value": 1}}),
            [(None, "bad_shape")],
        ),
        Case("empty batch", dumps({"device_id": "d", "readings": []}), [(None, "no_readings")]),
        Case("empty array", b"[]", [(None, "no_readings")]),
        Case(
            "nested 10,000 levels",
            b'{"device_id": "d", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
            [(None, "too_deep")],
        ),
        # Duplicate keys: the last one wins, as in JavaScript's JSON.parse (README, "Input rules").
        Case(
            "duplicate keys",
            b'{"device_id": "dup", "timestamp": "' + at(6).encode() + b'", "value": 1, "value": 2}',
            readings=[one("dup", 6, 2.0)],
        ),
        Case(
            "day-first timestamp",
            dumps({"device_id": "eu-1", "timestamp": "30/07/2024 12:00:07", "value": 7.5}),
            [(0, "bad_timestamp")],
            after_replay=[],
        ),
    ]
    # A batch of 10 valid and 3 invalid readings, one of them accepted after the rule change.
    items: list[object] = [{"timestamp": at(8 + i / 10), "value": float(i)} for i in range(10)]
    items[3:3] = [{"timestamp": at(8), "value": "n/a"}]
    items[7:7] = [{"timestamp": "30/07/2024 12:00:09", "value": 90.0}]
    items.append(["not", "a", "reading"])
    batch = Case(
        "10 valid, 3 invalid",
        dumps({"device_id": "batch-1", "readings": items}),
        [(3, "bad_value"), (7, "bad_timestamp"), (12, "bad_reading_shape")],
        [one("batch-1", 8 + i / 10, float(i)) for i in range(10)],
        after_replay=[(3, "bad_value"), (12, "bad_reading_shape")],
    )
    found.append(batch)
    found.append(big_batch(limit))
    found += metric_cases(per_reading_limit)
    found.append(Case("valid reading after all of them", dumps(ok), readings=[one("ok-1", 1, 1.0)]))
    return found


def big_batch(limit: int) -> Case:
    """A batch of exactly `limit` bytes (5 MiB) with one invalid reading in the middle."""
    readings, valid, size = [], [], 64
    i = 0
    while size < limit - 200:
        item = {"timestamp": at(20 + i / 2000), "value": round(i * 0.37 % 101, 3)}
        readings.append(item)
        size += len(dumps(item)) + 1
        i += 1
    readings[len(readings) // 2] = {"timestamp": at(20), "value": None}
    bad_index = len(readings) // 2
    for index, item in enumerate(readings):
        if index != bad_index:
            valid.append(one("big-1", 20 + index / 2000, item["value"]))
    payload = dumps({"device_id": "big-1", "readings": readings, "pad": ""})
    payload = payload[:-2] + b" " * (limit - len(payload)) + b'"}'
    assert len(payload) == limit
    return Case("5 MiB batch, one invalid reading", payload, [(bad_index, "bad_value")], valid)


def send_raw(settings: Settings, payloads: list[bytes | None]) -> list[tuple[int, int]]:
    """Sends with a plain confluent-kafka producer, no key; returns each message's (partition, offset)."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "message.max.bytes": 16 * 1024 * 1024,
            "acks": "all",
            "linger.ms": 0,
        }
    )
    where: dict[int, tuple[int, int]] = {}
    for number, payload in enumerate(payloads):

        def delivered(error: object, message: object, number: int = number) -> None:
            assert error is None, error
            where[number] = (message.partition(), message.offset())  # type: ignore[attr-defined]

        producer.produce(settings.topic, payload, on_delivery=delivered)
        producer.flush(30)  # one at a time: the order of the cases is the order in Kafka
    return [where[n] for n in range(len(payloads))]


def quarantine_by_record(settings: Settings) -> dict[tuple[int, int], list[tuple[int | None, str, str | None]]]:
    lake = duck.connect(LakePaths.from_settings(settings))
    rows = lake.sql('SELECT "partition", "offset", reading_index, reason_code, metric FROM quarantine').fetchall()
    found: dict[tuple[int, int], list[tuple[int | None, str, str | None]]] = {}
    for partition, offset, index, reason, metric in rows:
        found.setdefault((partition, offset), []).append((index, reason, metric))
    return {
        key: sorted(value, key=lambda entry: (entry[0] is not None, entry[0] or 0, entry[2] or ""))
        for key, value in found.items()
    }


def assert_kpi_tables(settings: Settings, reference: Reference) -> None:
    """Gold and the rollups equal the reference's buckets, metric by metric; they hold no other metric."""
    lake = duck.connect(LakePaths.from_settings(settings))
    assert sorted(row[0] for row in lake.sql("SELECT DISTINCT metric FROM gold").fetchall()) == reference.metrics()
    for metric in reference.metrics():
        assert_rollups_equal(rollup_kpis(lake, metric), expected_rollups(reference, metric))
        gold = gold_kpis(lake, metric)
        expected = reference.buckets(metric=metric)
        assert set(gold) == set(expected), metric
        for second, want in expected.items():
            assert_kpis_equal(gold[second], want, f"gold {metric} {second}")


def audit(settings: Settings) -> dict[str, object]:
    result = lakehouse(settings, "audit", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == (0 if report["ok"] else 1), result.stderr
    return report


def test_bad_input_lands_in_quarantine_and_replay_moves_what_becomes_valid(lake_settings: Settings, topic: str) -> None:
    lake_settings = lake_settings.model_copy(update={"max_metrics": len(KNOWN_NAMES)})
    found = cases(lake_settings.max_message_bytes, lake_settings.max_metrics_per_reading)
    where = send_raw(lake_settings, [case.payload for case in found])
    run = lakehouse(lake_settings, "pipeline", "--available-now")
    assert run.returncode == 0, run.stderr[-5000:]

    # Each case's record: its quarantine rows, exactly.
    quarantined = quarantine_by_record(lake_settings)
    table = []
    for case, record in zip(found, where, strict=True):
        got = quarantined.get(record, [])
        table.append(f"{case.name:34} -> {got if got else 'silver'}")
        assert got == sorted(case.quarantine_rows(), key=lambda e: (e[0] is not None, e[0] or 0, e[2] or "")), case.name
    print("\n".join(table))
    reference = Reference.of(reading for case in found for reading in case.readings)
    assert_kpi_tables(lake_settings, reference)

    # The accounting adds up, per partition and in total.
    report = audit(lake_settings)
    assert report["ok"], report["checks"]
    totals = report["totals"]
    assert totals["bronze_records"] == len(found)
    assert totals["readings_accepted"] == sum(len(case.readings) for case in found)
    assert totals["readings_quarantined"] == sum(
        1 for case in found for index, *_ in case.quarantined if index is not None
    )
    assert totals["messages_quarantined"] == sum(1 for case in found for index, *_ in case.quarantined if index is None)
    assert sum(p["kafka_end_offset"] - p["kafka_first_offset"] for p in report["partitions"]) == len(found)
    assert all(p["not_yet_ingested"] == 0 for p in report["partitions"])

    # The rules change: day-first timestamps are accepted. Under the new rules the audit sees quarantine rows
    # that are now valid, until replay moves them.
    new_rules = lake_settings.model_copy(update={"extra_timestamp_formats": [DAY_FIRST]})
    stale = audit(new_rules)
    assert not stale["ok"]
    failed = {c["name"]: c["detail"] for c in stale["checks"] if not c["ok"]}
    assert failed == {
        "every valid reading is in silver": "4 valid readings whose identity is missing from silver",
        "quarantine holds only what the current rules reject": "3 quarantine rows the current rules accept "
        "(`lakehouse replay` moves them) or that match no bronze record",
        "accepted + quarantined = readings in the message": "3 bronze records whose accepted and quarantined "
        "readings do not add up to the readings in the message",
    }
    reference.add("eu-1", T0 + timedelta(seconds=7), 7.5)
    reference.add("batch-1", T0 + timedelta(seconds=9), 90.0)
    reference.add("eu-2", T0 + timedelta(seconds=38), 3.0, "flow_m3h")
    reference.add("eu-2", T0 + timedelta(seconds=38), 4.0)

    # A replay killed after its silver commit (gold's came before it, quarantine's after), then run to the end, then again.
    crashed = lakehouse(
        new_rules.model_copy(),
        "replay",
        "--reason",
        "bad_timestamp",
        env_extra={"LAKEHOUSE_TEST_CRASH_AFTER": "replay_silver:0"},
    )
    assert crashed.returncode != 0
    done = lakehouse(new_rules, "replay", "--reason", "bad_timestamp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 readings now valid" in done.stderr
    assert_kpi_tables(lake_settings, reference)
    quarantined = quarantine_by_record(lake_settings)
    for case, record in zip(found, where, strict=True):
        expected = sorted(case.quarantine_rows(True), key=lambda e: (e[0] is not None, e[0] or 0, e[2] or ""))
        assert quarantined.get(record, []) == expected, case.name
    reasons = (
        duck.connect(LakePaths.from_settings(lake_settings))
        .sql("SELECT reason FROM quarantine WHERE reason_code = 'bad_timestamp'")
        .fetchall()
    )
    assert reasons and all("LAKEHOUSE_EXTRA_TIMESTAMP_FORMATS" in reason for (reason,) in reasons)  # brought up to date

    again = lakehouse(new_rules, "replay")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 readings now valid" in again.stderr and "(0 with a new reason)" in again.stderr
    assert_kpi_tables(lake_settings, reference)
    after = audit(new_rules)
    assert after["ok"], after["checks"]
    assert after["totals"]["readings_accepted"] == report["totals"]["readings_accepted"] + 4


def test_a_message_over_the_broker_limit_is_refused_by_the_broker(lake_settings: Settings, topic: str) -> None:
    from confluent_kafka import KafkaError, Producer

    refused: list[KafkaError] = []
    producer = Producer(
        {
            "bootstrap.servers": lake_settings.kafka_bootstrap,
            "message.max.bytes": 32 * 1024 * 1024,
            "compression.type": "none",
        }
    )
    payload = b'{"device_id": "x", "pad": "' + b"x" * (lake_settings.kafka_limit_bytes + 1024) + b'"}'
    producer.produce(lake_settings.topic, payload, on_delivery=lambda error, _message: refused.append(error))
    producer.flush(30)
    assert refused and refused[0] is not None and refused[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
