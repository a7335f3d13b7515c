"""A micro-batch that Spark runs again (same batch id, as after a crash) changes nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lake.settings import Settings
from lake.tables import LakePaths, Table

pytestmark = pytest.mark.spark

KAFKA_DDL = "topic STRING, `partition` INT, `offset` BIGINT, kafka_timestamp TIMESTAMP, key BINARY, value BINARY"


def records(spark, payloads: list[bytes], first_offset: int):  # type: ignore[no-untyped-def]
    now = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [("t", 0, first_offset + i, now, None, bytearray(p)) for i, p in enumerate(payloads)]
    return spark.createDataFrame(rows, KAFKA_DDL)


def snapshot(spark, paths: LakePaths) -> dict[str, list[tuple[object, ...]]]:  # type: ignore[no-untyped-def]
    result = {}
    for table, drop in [
        (Table.BRONZE, "ingested_at"),
        (Table.SILVER, "updated_at"),
        (Table.GOLD, "updated_at"),
        (Table.QUARANTINE, "quarantined_at"),
    ]:
        frame = spark.read.format("delta").load(paths.table(table)).drop(drop)
        result[table.value] = sorted((tuple(row) for row in frame.collect()), key=repr)
    return result


def test_replayed_batch_changes_nothing(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.stream.job import IngestJob
    from pipeline.stream.tables import create_tables

    settings = Settings(lake_root=str(tmp_path / "lake"))
    paths = LakePaths.from_settings(settings)
    create_tables(spark, paths)
    job = IngestJob(spark, settings, paths, app_id="test-app")

    first = [json.dumps({"device_id": "a", "timestamp": "2024-07-30T12:00:00Z", "value": v}).encode() for v in (1, 2)]
    first.append(b"not json")
    job.process_batch(records(spark, first, 0), 0)
    second = [json.dumps({"device_id": "a", "timestamp": "2024-07-30T12:00:00.5Z", "value": 7}).encode()]
    job.process_batch(records(spark, second, 3), 1)
    before = snapshot(spark, paths)

    # Spark re-runs batch 1 (crash after the Delta commits, before the checkpoint's commit), then batch 0.
    job.process_batch(records(spark, second, 3), 1)
    job.process_batch(records(spark, first, 0), 0)
    assert snapshot(spark, paths) == before

    assert len(before["bronze"]) == 4
    assert [row[2] for row in before["silver"]] == [2.0, 7.0]  # the later record of the first batch won
    assert [row[1:3] for row in before["gold"]] == [(2, 1)]
    assert len(before["quarantine"]) == 1

    # A new app id (a new checkpoint) is a new stream: its batch 1 is applied.
    other = IngestJob(spark, settings, paths, app_id="other-app")
    other.process_batch(records(spark, [b"[]"], 4), 1)
    assert len(snapshot(spark, paths)["quarantine"]) == 2
