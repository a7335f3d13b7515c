"""The rollups table: every bucket of every grain and metric, per device and of the fleet, equals an independent
recomputation from the readings, after micro-batches that add, correct and re-send readings across minutes, hours and
days, each followed by the rollups query catching up with silver. Device `a` sends the tutorial's `value`; the others
send `value` and more metrics in the `metrics` form, and metrics of one instant never mix."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lake.settings import Settings
from lake.tables import LakePaths, Table
from tests.reference import KPI_FIELDS, Reference, RollupKey, assert_rollups_equal, expected_rollups
from tests.test_exactly_once import records

pytestmark = pytest.mark.spark

START = datetime(2024, 7, 30, 23, 58, 30, tzinfo=UTC)  # two minutes before a new hour and a new day
DEVICES = ("a", "b", "c")


def metrics_of(device: str, value: float) -> dict[str, float]:
    """The metrics a device sends with `value` at one instant: `a` only `value`, the others more."""
    named = {"value": value}
    if device != "a":
        named["flow_m3h"] = round(value * 2 + 0.5, 3)
    if device in ("c", "d"):
        named["temperature_c"] = round(-value / 3, 4)
    return named


def message(device: str, moment: datetime, value: float) -> bytes:
    stamp = moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if device == "a":
        return json.dumps({"device_id": device, "timestamp": stamp, "value": value}).encode()
    return json.dumps({"device_id": device, "timestamp": stamp, "metrics": metrics_of(device, value)}).encode()


METRICS = ("value", "flow_m3h", "temperature_c")


def batches(seed: int = 5) -> list[list[tuple[str, datetime, float]]]:
    """Four micro-batches: readings around midnight, corrections and re-sent duplicates of earlier ones, a late
    reading hours back, and values with a large mean and a small spread: a sum of squares would lose six digits of
    their standard deviation, count/mean/M2 keeps it within 1e-9."""
    rng = random.Random(seed)
    first = [
        (d, START + timedelta(seconds=s, microseconds=rng.randrange(1_000_000)), round(rng.uniform(-5, 120), 3))
        for s in range(0, 150, 2)
        for d in DEVICES
        if rng.random() < 0.8
    ]
    second = [(d, t, v + 1.5) for d, t, v in first[::7]] + first[1::9]  # corrections, and duplicates of the same value
    second += [("a", START - timedelta(hours=3), 4.0), ("d", START + timedelta(days=1), 9.0)]
    third = [("b", START + timedelta(seconds=200 + i), 1e4 + i * 0.01) for i in range(30)]
    fourth = [(d, START + timedelta(seconds=170, milliseconds=i), float(i)) for i, d in enumerate(DEVICES * 3)]
    return [first, second, third, fourth]


def stored(spark, paths: LakePaths, metric: str = "value") -> dict[RollupKey, dict[str, object]]:  # type: ignore[no-untyped-def]
    rows = spark.read.format("delta").load(paths.table(Table.ROLLUPS)).where(f"metric = '{metric}'").collect()
    return {(r.grain, r.device_id, r.timestamp.astimezone(UTC)): {f: r[f] for f in KPI_FIELDS} for r in rows}


def assert_every_metric(got, reference: Reference) -> None:  # type: ignore[no-untyped-def]
    """`got(metric)`: rollup rows of one metric; each metric's equal the reference's of that metric alone."""
    assert reference.metrics() == sorted(METRICS)
    for metric in METRICS:
        assert_rollups_equal(got(metric), expected_rollups(reference, metric))


def test_rollups_match_the_readings_batch_after_batch(spark, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pipeline.stream import rollups
    from pipeline.stream.job import IngestJob, RollupsJob, start_rollups
    from pipeline.stream.tables import create_tables

    # Batches of a short time range read the stored buckets once, the second (hours back, a day ahead) step by
    # step: both ways are checked against the reference below.
    read_once: list[bool] = []
    for_batch = rollups.for_batch

    def recorded(silver, stored, readings, lo, hi, read_stored_once=False):  # type: ignore[no-untyped-def]
        read_once.append(read_stored_once)
        return for_batch(silver, stored, readings, lo, hi, read_stored_once)

    monkeypatch.setattr(rollups, "for_batch", recorded)

    settings = Settings(lake_root=str(tmp_path / "lake"))
    paths = LakePaths.from_settings(settings)
    create_tables(spark, paths)
    job = IngestJob(spark, settings, paths, app_id="rollup-test")
    reference = Reference()
    offset = 0
    for batch_id, readings in enumerate(batches()):
        payloads = [message(*r) for r in readings]
        job.process_batch(records(spark, payloads, offset), batch_id)
        offset += len(payloads)
        for device, moment, value in readings:
            for metric, number in metrics_of(device, value).items():
                reference.add(device, moment, number, metric)
        # The rollups query catches up with silver's new commits (corrections rewrite files: read again).
        start_rollups(spark, settings, paths, available_now=True).awaitTermination()
        assert_every_metric(lambda metric: stored(spark, paths, metric), reference)
    assert read_once == [True, False, True, True]
    assert ("day", "d", (START + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)) in stored(
        spark, paths
    )

    # The same rows come out of a rebuild from all of silver.
    silver = spark.read.format("delta").load(paths.table(Table.SILVER))
    all_rebuilt = rollups.from_readings(silver).collect()

    def rebuilt(metric: str) -> dict[RollupKey, dict[str, object]]:
        return {
            (r.grain, r.device_id, r.timestamp.astimezone(UTC)): {f: r[f] for f in KPI_FIELDS}
            for r in all_rebuilt
            if r.metric == metric
        }

    assert_every_metric(rebuilt, reference)

    # A rollups batch run again (as after a crash between its commit and the checkpoint's) changes no row.
    rerun = RollupsJob(spark, paths)
    before = stored(spark, paths)
    rerun.process_batch(silver, 0)
    last = spark.sql(f"DESCRIBE HISTORY delta.`{paths.table(Table.ROLLUPS)}` LIMIT 1").first()
    assert last is not None
    metrics = last["operationMetrics"]
    assert (metrics.get("numTargetRowsUpdated"), metrics.get("numTargetRowsInserted")) in (("0", "0"), (None, None))
    assert stored(spark, paths) == before
    assert_every_metric(lambda metric: stored(spark, paths, metric), reference)
