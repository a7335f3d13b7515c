"""Dedupe and KPI math on plain Spark DataFrames, checked against independent Python computations."""

from __future__ import annotations

import math
import random
import statistics
from datetime import UTC, datetime, timedelta

import pytest

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
    result = {(r.device_id, r.timestamp.replace(tzinfo=UTC) if r.timestamp.tzinfo is None else r.timestamp): r.value
              for r in latest_per_identity(frame).collect()}  # fmt: skip
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

    by_second: dict[datetime, list[tuple[str, float]]] = {}
    for device, moment, value in readings:
        by_second.setdefault(moment.replace(microsecond=0), []).append((device, value))
    assert set(got) == set(by_second)
    for second, items in by_second.items():
        values = [v for _, v in items]
        row = got[second]
        assert row.reading_count == len(values)
        assert row.device_count == len({d for d, _ in items})
        assert math.isclose(row.average_value, statistics.fmean(values), rel_tol=1e-9)
        assert row.min_value == min(values) and row.max_value == max(values)
        assert math.isclose(row.sum_value, math.fsum(values), rel_tol=1e-9)
        if len(values) == 1:
            assert row.stddev_value is None
        else:
            assert math.isclose(row.stddev_value, statistics.stdev(values), rel_tol=1e-9)
