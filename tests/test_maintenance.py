"""`lakehouse maintain` (delta-rs) compacts and checkpoints tables that Spark wrote, and Spark and DuckDB then read the
same rows from its checkpoint; a micro-batch re-run after maintenance still changes nothing."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lake.maintenance import TableReport, UnsafeRetention, maintain
from lake.settings import Settings
from lake.tables import LakePaths, Table
from tests.test_exactly_once import records, snapshot

BATCHES = 8
# Columns that say which rows a table holds, for comparing what Spark and DuckDB read.
ROW_KEYS = {
    Table.BRONZE: "topic, `partition`, `offset`, value",
    Table.SILVER: "device_id, `timestamp`, value, `offset`",
    Table.GOLD: "`timestamp`, reading_count, device_count, sum_value",
    Table.QUARANTINE: "`offset`, reason_code, raw",
    Table.ROLLUPS: "grain, device_id, `timestamp`, reading_count, device_count, sum_value",
}


def batch(first_second: int) -> list[bytes]:
    """Readings of two devices, one bad message."""
    readings = [
        {"device_id": device, "timestamp": f"2024-07-30T12:00:{first_second + i:02d}Z", "value": first_second + i}
        for device in ("a", "b")
        for i in range(3)
    ]
    return [*(json.dumps(r).encode() for r in readings), b"not json"]


def read_from_checkpoint_only(paths: LakePaths, versions: dict[Table, int]) -> None:
    """Remove the commits that each table's newest checkpoint covers, as log cleanup does after 30 days: readers
    must then build the table from the checkpoint maintenance wrote."""
    for table, version in versions.items():
        log = Path(paths.table(table)) / "_delta_log"
        for commit in [*log.glob("0*.json"), *log.glob("0*.crc")]:  # not Hadoop's .*.crc files
            if int(commit.name.split(".")[0]) < version:
                commit.unlink()
        assert (log / f"{version:020d}.checkpoint.parquet").is_file()


@pytest.mark.spark
def test_maintain_keeps_rows_and_exactly_once(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from lake.duck import connect
    from pipeline.stream.job import IngestJob, RollupsJob
    from pipeline.stream.tables import create_tables

    settings = Settings(lake_root=str(tmp_path / "lake"))
    paths = LakePaths.from_settings(settings)
    create_tables(spark, paths)
    batches = [records(spark, batch(7 * n), 10 * n) for n in range(BATCHES)]
    job = IngestJob(spark, settings, paths, app_id="test-app")
    rollups_job = RollupsJob(spark, paths)

    def write(batch_id: int, ingest: IngestJob, rollups: RollupsJob) -> None:
        """A micro-batch of the ingest query, then one of the rollups query (over all of silver's rows)."""
        ingest.process_batch(batches[batch_id], batch_id)
        rollups.process_batch(spark.read.format("delta").load(paths.table(Table.SILVER)), batch_id)

    def rollup_rows() -> list[tuple[object, ...]]:
        return sorted(
            (tuple(r) for r in spark.read.format("delta").load(paths.table(Table.ROLLUPS)).collect()), key=repr
        )

    for batch_id in range(2):  # each write carries txnAppId test-app and txnVersion batch_id
        write(batch_id, job, rollups_job)
    # Maintenance over and over while the rest of the batches are written (appends and MERGEs, as the stream does).
    writing = threading.Event()
    writing.set()
    runs: list[list[TableReport]] = []
    failures: list[BaseException] = []

    def maintain_while_writing() -> None:
        try:
            while writing.is_set():
                runs.append(maintain(paths))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    upkeep = threading.Thread(target=maintain_while_writing)
    upkeep.start()
    try:
        for batch_id in range(2, BATCHES):
            write(batch_id, job, rollups_job)
    finally:
        writing.clear()
        upkeep.join()
    assert not failures, failures
    assert len(runs) > 1 and any(r.files_compacted for run in runs for r in run), "no compaction while writing"
    before, rollups_before = snapshot(spark, paths), rollup_rows()
    readings = BATCHES * 6
    assert (len(before["bronze"]), len(before["silver"]), len(before["quarantine"])) == (7 * BATCHES, readings, BATCHES)
    assert sum(row[1] for row in before["gold"]) == readings

    final = maintain(paths)
    reports = {Table(r.table): r for r in final}
    # One file per table, and per partition of the rollups (grains minute, hour and day).
    assert all(r.live_files_after == (3 if r.table == Table.ROLLUPS.value else 1) for r in final), final
    compacted = {r.table for run in [*runs, final] for r in run if r.files_compacted}
    # Bronze is append-only: compaction is allowed all the same. The rollups' MERGEs rewrite the files of the
    # buckets they recompute, which here are all of them, so each partition holds one file already.
    # The metrics table holds the one file of its one append (the batches' one name, `value`).
    assert compacted == {t.value for t in Table if t not in (Table.ROLLUPS, Table.METRICS)}
    assert all(r.files_compacted == 0 for r in maintain(paths)), "a second run found more to compact"

    read_from_checkpoint_only(paths, {table: r.version for table, r in reports.items()})
    jvm = spark.sparkContext._jvm
    jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()  # Spark would otherwise go on from the log it holds
    assert snapshot(spark, paths) == before
    assert rollup_rows() == rollups_before

    lake = connect(paths)
    for table, columns in ROW_KEYS.items():
        frame = spark.read.format("delta").load(paths.table(table)).selectExpr(*columns.split(", "))
        by_spark = sorted((_utc(tuple(row)) for row in frame.collect()), key=repr)
        by_duckdb = sorted(
            map(_utc, lake.sql(f"SELECT {columns} FROM {table.value}".replace("`", '"')).fetchall()), key=repr
        )
        assert len(by_duckdb) == len(by_spark) > 0, table
        assert by_duckdb == by_spark, table

    # A restarted stream re-runs committed batches: their txn actions, now in delta-rs's checkpoint, skip them.
    restarted = IngestJob(spark, settings, paths, app_id="test-app")
    restarted_rollups = RollupsJob(spark, paths)
    for batch_id in range(BATCHES):
        write(batch_id, restarted, restarted_rollups)
    assert snapshot(spark, paths) == before
    assert rollup_rows() == rollups_before


def _utc(row: tuple[object, ...]) -> tuple[object, ...]:
    """DuckDB gives timestamps with a time zone, Spark (session in UTC) without; compare the instants."""
    return tuple(
        value.astimezone(UTC).replace(tzinfo=None) if isinstance(value, datetime) and value.tzinfo else value
        for value in row
    )


def test_zero_retention_needs_consent(tmp_path: Path) -> None:
    with pytest.raises(UnsafeRetention, match="corrupting the table"):
        maintain(LakePaths.from_settings(Settings(lake_root=str(tmp_path))), retain_hours=0)


def test_a_conflicting_commit_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from deltalake.exceptions import CommitFailedError

    from lake import conflicts

    monkeypatch.setattr(conflicts.time, "sleep", lambda seconds: None)
    outcomes: list[object] = [CommitFailedError("concurrent delete"), CommitFailedError("again"), 5]

    def commit() -> object:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert conflicts.retry_on_conflict(commit, "a commit", (CommitFailedError,)) == 5
    assert outcomes == []
