"""Dedupe and KPI math on plain Spark DataFrames, checked against the independent reference."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from tests.reference import Reference, assert_kpis_equal

pytestmark = pytest.mark.spark

T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)
READINGS_DDL = "device_id STRING, `timestamp` TIMESTAMP, value DOUBLE, topic STRING, `partition` INT, `offset` BIGINT, reading_index INT, kafka_timestamp TIMESTAMP, arrival_watermark TIMESTAMP, metric STRING"


def test_later_record_wins(spark) -> None:  # type: ignore[no-untyped-def]
    from pipeline.stream.dedupe import latest_per_identity

    k = T0 + timedelta(days=1)
    rows = [
        # same identity: offset 9 wins over offset 3 in partition 0
        ("a", T0, 1.0, "t", 0, 3, 0, k, None),
        ("a", T0, 2.0, "t", 0, 9, 0, k + timedelta(seconds=1), None),
        # inside one message (same offset) the later index wins
        ("b", T0, 5.0, "t", 1, 4, 0, k, None),
        ("b", T0, 6.0, "t", 1, 4, 7, k, None),
        # across partitions, the later broker append time wins
        ("c", T0, 7.0, "t", 3, 100, 0, k + timedelta(seconds=5), None),
        ("c", T0, 8.0, "t", 2, 1, 0, k + timedelta(seconds=6), None),
        # another microsecond is another reading
        ("a", T0 + timedelta(microseconds=1), 3.0, "t", 0, 2, 0, k, None),
    ]
    rows = [(*row, "value") for row in rows]
    # Another metric of the same device and instant is another reading, whatever the record order says.
    rows += [("a", T0, 11.0, "t", 0, 1, 0, k, None, "flow"), ("a", T0, 12.0, "t", 0, 1, 0, k, None, "temp")]
    frame = spark.createDataFrame(rows, READINGS_DDL)
    result = {
        (r.device_id, r.metric, r.timestamp.replace(tzinfo=UTC) if r.timestamp.tzinfo is None else r.timestamp): r.value
        for r in latest_per_identity(frame).collect()
    }
    assert sorted(result.values()) == [2.0, 3.0, 6.0, 8.0, 11.0, 12.0]
    assert result[("a", "flow", T0)] == 11.0 and result[("a", "value", T0)] == 2.0


def _resent_readings(seed: int, count: int) -> list[tuple[object, ...]]:
    """Readings of a few devices over a few seconds, many of them sent again in later records (another partition,
    offset, index or broker time, sometimes another value); each (partition, offset, index) is used once."""
    rng = random.Random(seed)
    k = T0 + timedelta(days=1)
    rows: list[tuple[object, ...]] = []
    for i in range(count):
        if rows and rng.random() < 0.3:  # a reading sent again
            device, moment, value = rows[rng.randrange(len(rows))][:3]
            value = value if rng.random() < 0.5 else rng.uniform(-1e3, 1e3)
        else:
            device, moment, value = (
                f"d{rng.randrange(20)}",
                T0 + timedelta(microseconds=rng.randrange(50)),
                rng.random(),
            )
        arrived = k + timedelta(milliseconds=rng.randrange(3))
        rows.append((device, moment, value, "t", rng.randrange(4), i // 3, i % 3, arrived, None, "value"))
    return rows


@pytest.mark.parametrize("repeats_bound", [None, 0])
def test_large_batch_dedupe_matches_python(spark, monkeypatch, repeats_bound) -> None:  # type: ignore[no-untyped-def]
    """The large batches' deduplication (repeated identity hashes found, only their readings deduplicated) keeps exactly
    the winner per identity that the contract names, as the whole shuffle does; and so does its fallback when too
    many hashes repeat."""
    from pipeline.stream import dedupe

    if repeats_bound is not None:
        monkeypatch.setattr(dedupe, "SPLIT_MAX_REPEATS", repeats_bound)
    monkeypatch.setattr(dedupe, "_HASHES_PER_TASK", 500)  # the search for repeated hashes in several tasks
    rows = _resent_readings(seed=11, count=4000)
    # The later record wins: within a partition by offset, then index, whatever its time says; between partitions
    # by Kafka time, then topic, partition, offset, index.
    in_partition: dict[tuple[object, ...], tuple[object, ...]] = {}
    for row in rows:
        key = (*row[:2], row[3], row[4])
        if key not in in_partition or (row[5], row[6]) > (in_partition[key][5], in_partition[key][6]):
            in_partition[key] = row
    winners: dict[tuple[object, ...], tuple[object, ...]] = {}
    for row in in_partition.values():
        key, order = row[:2], (row[7], row[3], row[4], row[5], row[6])
        if key not in winners or order > tuple(winners[key][i] for i in (7, 3, 4, 5, 6)):
            winners[key] = row
    assert len(winners) < len(rows) * 0.8  # the case holds duplicates
    frame = spark.createDataFrame(rows, READINGS_DDL).repartition(3)
    columns = [c for c in dedupe.SILVER_COLUMNS if c != "updated_at"]

    def kept(result) -> list[tuple[object, ...]]:  # type: ignore[no-untyped-def]
        assert sorted(result.columns) == sorted(dedupe.SILVER_COLUMNS)  # silver's MERGE takes them by name
        return sorted(tuple(r[c] for c in columns) for r in result.collect())

    local = spark.createDataFrame(list(winners.values()), READINGS_DDL).select(*columns)
    expected = sorted(tuple(r) for r in local.collect())
    assert kept(dedupe.latest_of_large_batch(frame, len(rows))) == expected
    assert kept(dedupe.latest_per_identity(frame)) == expected
    # Without any duplicate, every reading passes as it is.
    unique = spark.createDataFrame(list(winners.values()), READINGS_DDL)
    assert kept(dedupe.latest_of_large_batch(unique, len(winners))) == expected


def test_kpis_per_second_match_python(spark) -> None:  # type: ignore[no-untyped-def]
    from pipeline.stream.kpi import kpis_per_second

    rng = random.Random(3)
    readings = []
    for i in range(3000):
        moment = T0 + timedelta(microseconds=rng.randrange(20_000_000))
        readings.append((f"d{rng.randrange(7)}", moment, rng.uniform(-1e6, 1e6)))
    readings.append(("solo", T0 + timedelta(seconds=30, microseconds=5), 4.25))  # a second with one reading
    # Half the readings arrived when the watermark stood at T0 + 10 s: late for the seconds before it.
    marks = [T0 + timedelta(seconds=10) if i % 2 else None for i in range(len(readings))]
    ddl = "device_id STRING, `timestamp` TIMESTAMP, value DOUBLE, arrival_watermark TIMESTAMP, metric STRING"
    # A second metric in the same seconds: a meter near 1e8, whose standard deviation needs the centre.
    meter = [
        (f"d{rng.randrange(7)}", T0 + timedelta(microseconds=rng.randrange(20_000_000)), 1e8 + rng.uniform(-1, 1))
        for _ in range(2000)
    ]
    rows = [(*r, m, "value") for r, m in zip(readings, marks, strict=True)] + [(*r, None, "meter") for r in meter]
    frame = spark.createDataFrame(rows, ddl)
    both = kpis_per_second(frame).collect()
    got = {row.timestamp.replace(tzinfo=UTC): row for row in both if row.metric == "value"}
    got_meter = {row.timestamp.replace(tzinfo=UTC): row for row in both if row.metric == "meter"}
    for second, want in Reference.of(meter).buckets("second").items():
        assert_kpis_equal(got_meter[second].asDict(), want, f"meter, second {second}")
    assert len(got_meter) == 20

    expected = Reference.of(readings).buckets("second")
    assert set(got) == set(expected)
    for second, want in expected.items():
        assert_kpis_equal(got[second].asDict(), want, f"second {second}")
        late = sum(
            1
            for (_, moment, _), mark in zip(readings, marks, strict=True)
            if mark is not None and moment.replace(microsecond=0) == second and second + timedelta(seconds=1) <= mark
        )
        assert (got[second].late_readings, got[second].revision) == (late, 0), second
    assert sum(row.late_readings for row in got.values()) > 0

    # The fingerprint is the same for the same readings in any order and any partitioning, and another for another
    # value: a recompute is not taken for a change, a correction is.
    shuffled = readings[::-1]
    again = spark.createDataFrame([(*r, None, "value") for r in shuffled], ddl).repartition(5)
    refingered = {row.timestamp.replace(tzinfo=UTC): row.fingerprint for row in kpis_per_second(again).collect()}
    assert refingered == {second: row.fingerprint for second, row in got.items()}
    corrected = [(d, t, v + 1.0 if i == 0 else v) for i, (d, t, v) in enumerate(readings)]
    changed = spark.createDataFrame([(*r, None, "value") for r in corrected], ddl)
    second = readings[0][1].replace(microsecond=0)
    moved = {row.timestamp.replace(tzinfo=UTC): row.fingerprint for row in kpis_per_second(changed).collect()}
    assert moved[second] != got[second].fingerprint
    assert all(moved[s] == got[s].fingerprint for s in got if s != second)
