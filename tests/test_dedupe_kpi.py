"""Dedupe and KPI math on plain Spark DataFrames, checked against the independent reference."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from tests.reference import Reference, assert_kpis_equal

pytestmark = pytest.mark.spark

T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)
READINGS_DDL = "device_id STRING, `timestamp` TIMESTAMP, value DOUBLE, topic STRING, `partition` INT, `offset` BIGINT, reading_index INT, kafka_timestamp TIMESTAMP"


def test_later_record_wins(spark) -> None:  # type: ignore[no-untyped-def]
    from pipeline.stream.dedupe import latest_per_identity

    k = T0 + timedelta(days=1)
    rows = [
        # same identity: offset 9 wins over offset 3 in partition 0
        ("a", T0, 1.0, "t", 0, 3, 0, k),
        ("a", T0, 2.0, "t", 0, 9, 0, k + timedelta(seconds=1)),
        # inside one message (same offset) the later index wins
        ("b", T0, 5.0, "t", 1, 4, 0, k),
        ("b", T0, 6.0, "t", 1, 4, 7, k),
        # across partitions, the later broker append time wins
        ("c", T0, 7.0, "t", 3, 100, 0, k + timedelta(seconds=5)),
        ("c", T0, 8.0, "t", 2, 1, 0, k + timedelta(seconds=6)),
        # another microsecond is another reading
        ("a", T0 + timedelta(microseconds=1), 3.0, "t", 0, 2, 0, k),
    ]
    frame = spark.createDataFrame(rows, READINGS_DDL)
    result = {
        (r.device_id, r.timestamp.replace(tzinfo=UTC) if r.timestamp.tzinfo is None else r.timestamp): r.value
        for r in latest_per_identity(frame).collect()
    }
    assert sorted(result.values()) == [2.0, 3.0, 6.0, 8.0]
    assert len(result) == 4


def test_kpis_per_second_match_python(spark) -> None:  # type: ignore[no-untyped-def]
    from pipeline.stream.kpi import kpis_per_second

    rng = random.Random(3)
    readings = []
    for i in range(3000):
        moment = T0 + timedelta(microseconds=rng.randrange(20_000_000))
        readings.append((f"d{rng.randrange(7)}", moment, rng.uniform(-1e6, 1e6)))
    readings.append(("solo", T0 + timedelta(seconds=30, microseconds=5), 4.25))  # a second with one reading
    frame = spark.createDataFrame(readings, "device_id STRING, `timestamp` TIMESTAMP, value DOUBLE")
    got = {row.timestamp.replace(tzinfo=UTC): row for row in kpis_per_second(frame).collect()}

    expected = Reference.of(readings).buckets("second")
    assert set(got) == set(expected)
    for second, want in expected.items():
        assert_kpis_equal(got[second].asDict(), want, f"second {second}")
