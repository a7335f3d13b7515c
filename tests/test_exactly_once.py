"""A micro-batch that Spark runs again (same batch id, as after a crash) changes nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lake.settings import Settings
from lake.tables import LakePaths, Table
from pipeline.stream.source import RECORD_DDL

pytestmark = pytest.mark.spark


def records(spark, payloads: list[bytes], first_offset: int):  # type: ignore[no-untyped-def]
    now = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [("t", 0, first_offset + i, now, None, bytearray(p)) for i, p in enumerate(payloads)]
    return spark.createDataFrame(rows, RECORD_DDL)


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


def _silver_rewrites(paths: LakePaths) -> int:
    """Files silver's log has removed so far (a MERGE that rewrites a file removes it)."""
    log = Path(paths.table(Table.SILVER)) / "_delta_log"
    return sum(
        1 for commit in log.glob("*.json") for line in commit.read_text().splitlines() if '"remove"' in line[:12]
    )


def test_new_seconds_are_inserted_and_held_seconds_corrected(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Silver and gold against the reference after each batch: one of new seconds only (no file rewritten), then
    one that also re-sends, corrects and adds readings in seconds silver held; each batch run again changes
    nothing."""
    from lake import duck
    from pipeline.stream.job import IngestJob
    from pipeline.stream.tables import create_tables
    from tests.reference import Reference, assert_kpis_equal, gold_kpis

    settings = Settings(lake_root=str(tmp_path / "lake"))
    paths = LakePaths.from_settings(settings)
    create_tables(spark, paths)
    job = IngestJob(spark, settings, paths, app_id="test-app")
    reference = Reference()
    t0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)

    def message(device: str, readings: list[tuple[float, float]]) -> bytes:
        stamps = [(t0 + timedelta(seconds=s), v) for s, v in readings]
        for moment, value in stamps:
            reference.add(device, moment, value)
        items = [{"timestamp": m.isoformat().replace("+00:00", "Z"), "value": v} for m, v in stamps]
        return json.dumps({"device_id": device, "readings": items}).encode()

    def check(where: str) -> None:
        silver = spark.read.format("delta").load(paths.table(Table.SILVER)).collect()
        assert {(r.device_id, r.timestamp.replace(tzinfo=UTC), r.metric): r.value for r in silver} == reference.readings
        assert len(silver) == len(reference.readings), f"{where}: an identity is in silver twice"
        lake = duck.connect(paths)
        got = gold_kpis(lake)
        lake.close()
        want = reference.buckets("second")
        assert set(got) == set(want), where
        for second, kpis in want.items():
            assert_kpis_equal(got[second], kpis, f"{where}, second {second}")

    first = [message("a", [(0.1, 1.0), (0.7, 2.0), (1.2, 3.0)]), message("b", [(0.5, 10.0), (1.5, 20.0)])]
    job.process_batch(records(spark, first, 0), 0)
    check("batch 0")
    assert _silver_rewrites(paths) == 0
    new_only = [message("a", [(2.0, 4.0)]), message("b", [(3.25, 5.0)])]
    job.process_batch(records(spark, new_only, 2), 1)
    check("batch 1, new seconds only")
    assert _silver_rewrites(paths) == 0, "a batch of new seconds only rewrote silver's files"

    mixed = [
        message("a", [(0.1, 1.0), (1.2, 3.5)]),  # a re-sent reading, and a correction of a held second
        message("c", [(0.9, 7.0), (4.0, 8.0)]),  # a new identity in a held second, and a new second
        message("b", [(3.25, 5.0)]),  # re-sent unchanged: no row changes
    ]
    job.process_batch(records(spark, mixed, 4), 2)
    check("batch 2, held seconds")
    assert _silver_rewrites(paths) >= 1  # the correction rewrote the file that held its row
    before = snapshot(spark, paths)
    for batch_id, (payloads, offset) in enumerate([(first, 0), (new_only, 2), (mixed, 4)]):
        job.process_batch(records(spark, payloads, offset), batch_id)  # as Spark re-runs a batch after a crash
    assert snapshot(spark, paths) == before


def test_a_write_between_silvers_read_and_its_merge_is_counted(  # type: ignore[no-untyped-def]
    spark, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer (as `lakehouse replay` is) commits to silver after a batch read silver, found its second new
    and put its KPIs into gold, before the batch's silver MERGE: Delta sees no conflict, yet gold must count both
    writers' readings and silver keep the later record's value."""
    from lake import duck
    from pipeline.stream import job as job_module
    from pipeline.stream.job import IngestJob
    from pipeline.stream.tables import create_tables
    from tests.reference import Reference, assert_kpis_equal, gold_kpis

    settings = Settings(lake_root=str(tmp_path / "lake"))
    paths = LakePaths.from_settings(settings)
    create_tables(spark, paths)
    pipeline = IngestJob(spark, settings, paths, app_id="pipeline")
    other_session = spark.newSession()  # its own session confs, as another process would have
    other = IngestJob(other_session, settings, paths, app_id="replay")

    def reading(device: str, at: str, value: float) -> bytes:
        return json.dumps({"device_id": device, "timestamp": f"2024-07-30T12:00:{at}Z", "value": value}).encode()

    # The other writer's records are later: its value for ("a", 00.1) is a correction of the batch's.
    others = records(other_session, [reading("a", "00.1", 5.0), reading("b", "00.3", 10.0)], 10)
    interleaved: list[str] = []
    crash_point = job_module.crash_point

    def commit_in_between(stage: str, batch_id: int) -> None:
        if stage == "gold" and not interleaved:
            interleaved.append(stage)
            other.process_batch(others, 0)
        crash_point(stage, batch_id)

    monkeypatch.setattr(job_module, "crash_point", commit_in_between)
    pipeline.process_batch(records(spark, [reading("a", "00.1", 1.0), reading("c", "01.5", 3.0)], 0), 0)
    assert interleaved == ["gold"], "the batch took no second as new"

    reference = Reference()
    t0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)
    for device, offset, value in [("a", 0.1, 5.0), ("b", 0.3, 10.0), ("c", 1.5, 3.0)]:
        reference.add(device, t0 + timedelta(seconds=offset), value)
    silver = spark.read.format("delta").load(paths.table(Table.SILVER)).collect()
    assert {(r.device_id, r.timestamp.replace(tzinfo=UTC), r.metric): r.value for r in silver} == reference.readings
    lake = duck.connect(paths)
    got = gold_kpis(lake)
    lake.close()
    want = reference.buckets("second")
    assert set(got) == set(want)
    for second, kpis in want.items():
        assert_kpis_equal(got[second], kpis, f"second {second}")


def test_a_small_batch_plans_on_one_partition_and_a_large_one_on_the_launched_ones(spark) -> None:  # type: ignore[no-untyped-def]
    from pipeline.stream.spark import SMALL_BATCH_ROWS, BatchFit

    session = spark.newSession()  # the fit changes a session's confs; the shared one is left alone
    fit = BatchFit.of(session)
    assert (fit.shuffle_partitions, fit.snapshot_partitions) == ("2", "2")  # what the test session was started with
    keys = (
        "spark.sql.shuffle.partitions",
        "spark.databricks.delta.snapshotPartitions",
        "spark.sql.codegen.wholeStage",
        "spark.sql.codegen.factoryMode",
        "spark.sql.adaptive.enabled",
    )
    fit.apply([session], SMALL_BATCH_ROWS - 1)
    assert [session.conf.get(k) for k in keys] == ["1", "1", "false", "NO_CODEGEN", "false"]
    fit.apply([session], SMALL_BATCH_ROWS)
    assert [session.conf.get(k) for k in keys] == ["2", "2", "true", "FALLBACK", "true"]
    assert BatchFit.of(session) == fit  # read from the launch conf, which the changes do not touch
