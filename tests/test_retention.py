"""Retention of raw payloads: `lakehouse maintain` deletes bronze and quarantine rows past their retention by Kafka
time and leaves bronze append-only; audit counts what retention removed apart from what was lost; replay names the
records whose bytes are gone; a run cut between its commits is reported and finished by the next `maintain`."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lakehouse as cli
from lake.settings import Settings
from lake.tables import LakePaths, Table
from pipeline.stream.source import RECORD_DDL
from tests.conftest import HOME

NOW = datetime.now(UTC)
OLD, OLDER = NOW - timedelta(days=40), NOW - timedelta(days=90)  # past bronze's 30 days; and quarantine's 60
RETENTION = {"bronze_retention": "30d", "quarantine_retention": "60d"}
EXTRA_FORMAT = "%d/%m/%Y %H:%M:%S"


def reading(second: int, timestamp: str | None = None) -> bytes:
    return json.dumps(
        {"device_id": "pump-1", "timestamp": timestamp or f"2024-07-30T12:00:{second:02d}Z", "value": second}
    ).encode()


# (partition, offset, Kafka time, payload): per partition the oldest records first, as Kafka appends them.
RECORDS = [
    (0, 0, OLD, reading(0)),
    (0, 1, OLD, b"not json"),
    (0, 2, OLD, reading(2, "30/07/2024 12:00:02")),  # readable once EXTRA_FORMAT is accepted
    (0, 3, NOW, reading(3)),
    (0, 4, NOW, b"not json either"),
    (0, 5, NOW, reading(5, "soon")),  # invalid under either rule
    (1, 0, OLDER, b"{truncated"),
    (1, 1, OLDER, reading(11)),
    (1, 2, NOW, reading(12)),
]


def test_a_retention_that_cannot_be_read_names_the_setting_and_the_forms() -> None:
    result = CliRunner().invoke(cli.app, ["--bronze-retention", "a month", "maintain"])
    assert result.exit_code == 1
    assert "LAKEHOUSE_BRONZE_RETENTION='a month' is not a duration" in result.output
    assert "30s, 5m, 12h, 30d, 2w" in result.output and "Traceback" not in result.output
    lateness = CliRunner().invoke(cli.app, ["--allowed-lateness", "soon", "maintain"])
    assert lateness.exit_code == 1
    assert "LAKEHOUSE_ALLOWED_LATENESS='soon' is not a duration" in lateness.output


@pytest.fixture(scope="module")
def built_lake(spark, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """A lake the pipeline's micro-batch code wrote from records of 90 and 40 days ago and of now."""
    from pipeline.stream.job import IngestJob
    from pipeline.stream.tables import create_tables

    folder = tmp_path_factory.mktemp("retention") / "lake"
    settings = Settings(lake_root=str(folder))
    paths = LakePaths.from_settings(settings)
    create_tables(spark, paths)
    job = IngestJob(spark, settings, paths, app_id="retention-test")
    rows = [("device-data", p, o, at, None, bytearray(value)) for p, o, at, value in RECORDS]
    job.process_batch(spark.createDataFrame(rows, RECORD_DDL), 0)
    return folder


def copy_of(built_lake: Path, tmp_path: Path, **settings: str) -> Settings:
    shutil.copytree(built_lake, tmp_path / "lake")
    return Settings(lake_root=str(tmp_path / "lake"), home=HOME, **settings)  # type: ignore[arg-type]


def offsets(paths: LakePaths, table: Table) -> list[tuple[int, int]]:
    """The (partition, offset) pairs a table holds, read with delta-rs (a Spark job each would add seconds)."""
    from deltalake import DeltaTable

    rows = DeltaTable(paths.table(table)).to_pyarrow_table(columns=["partition", "offset"]).to_pylist()
    return sorted({(row["partition"], row["offset"]) for row in rows})


@pytest.mark.spark
def test_retention_removes_old_rows_and_audit_and_replay_account_for_them(
    spark,  # type: ignore[no-untyped-def]
    built_lake: Path,
    tmp_path: Path,
) -> None:
    from deltalake import DeltaTable
    from deltalake.exceptions import CommitFailedError

    from lake.maintenance import maintain
    from pipeline.ops.audit import audit
    from pipeline.ops.replay import replay

    settings = copy_of(built_lake, tmp_path, **RETENTION)
    paths = LakePaths.from_settings(settings)
    assert len(offsets(paths, Table.BRONZE)) == len(RECORDS)

    maintained = CliRunner().invoke(cli.app, ["maintain"], env=settings.as_env() | {"COLUMNS": "200"})
    assert maintained.exit_code == 0, maintained.output[-3000:]
    assert "bronze: deleting 5 rows older than" in maintained.output  # progress
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in maintained.output.splitlines() if "│" in line]
    removed = {row[0]: row[1] for row in cells}  # table -> rows removed by retention
    assert (removed["bronze"], removed["quarantine"], removed["silver"]) == ("5", "1", ""), maintained.output

    # Bronze keeps what is younger than 30 days, quarantine what is younger than 60 (rows of lost offsets always).
    assert offsets(paths, Table.BRONZE) == [(0, 3), (0, 4), (0, 5), (1, 2)]
    assert offsets(paths, Table.QUARANTINE) == [(0, 1), (0, 2), (0, 4), (0, 5)]
    assert len(offsets(paths, Table.SILVER)) == 4  # readings are not raw payloads: silver keeps them

    # Append-only again: a delete through delta-rs or Spark is refused.
    bronze = DeltaTable(paths.table(Table.BRONZE))
    assert bronze.metadata().configuration["delta.appendOnly"] == "true"
    with pytest.raises(CommitFailedError, match="append-only"):
        bronze.delete('"offset" = 3')
    with pytest.raises(Exception, match="(?i)append.?only"):
        spark.sql(f"DELETE FROM delta.`{paths.table(Table.BRONZE)}` WHERE `offset` = 3")

    report = audit(settings, kafka=False)
    assert report.ok, report.checks
    partitions = {p.partition: p for p in report.partitions}
    assert (partitions[0].removed_by_retention, partitions[0].retention_through_offset) == (3, 2)
    assert (partitions[1].removed_by_retention, partitions[1].retention_through_offset) == (2, 1)
    assert (partitions[1].quarantine_removed_by_retention, partitions[0].quarantine_removed_by_retention) == (1, 0)
    totals = report.totals()
    assert (totals["removed_by_retention"], totals["missing_from_bronze"], totals["bronze_records"]) == (5, 0, 4)
    assert report.as_dict()["totals"]["removed_by_retention"] == 5  # what --json prints

    # After a rule change, replay re-reads what bronze still holds and names what it no longer does. Offset 2 would
    # now read, but its bytes are gone: its row stays as it was (it used to be deleted as if now valid).
    ruled = settings.model_copy(update={"extra_timestamp_formats": [EXTRA_FORMAT]})
    replayed = replay(ruled, reason="bad_timestamp", spark=spark)
    assert (replayed.quarantined_rows, replayed.missing_rows, replayed.records, replayed.still_invalid) == (2, 1, 1, 1)
    assert "device-data partition 0 offsets 2..2 (1 records, 1 quarantine rows): removed from bronze by retention" in (
        replayed.missing_message()
    )
    assert offsets(paths, Table.QUARANTINE) == [(0, 1), (0, 2), (0, 4), (0, 5)]
    assert audit(ruled, kafka=False).ok

    # A second run finds nothing more to remove.
    keep = {Table.BRONZE: settings.retention("bronze"), Table.QUARANTINE: settings.retention("quarantine")}
    again = maintain(paths, [Table.BRONZE, Table.QUARANTINE], vacuum=False, row_retention=keep)
    assert [r.rows_removed for r in again] == [0, 0]
    assert offsets(paths, Table.BRONZE) == [(0, 3), (0, 4), (0, 5), (1, 2)]


@pytest.mark.spark
def test_an_interrupted_retention_run_is_reported_and_finished(spark, built_lake: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from deltalake import DeltaTable

    from lake import retention
    from lake.maintenance import maintain
    from pipeline.ops.audit import audit
    from pipeline.ops.doctor import FAIL, _retention
    from pipeline.stream.offsets import Gap, OffsetTracker
    from pipeline.stream.tables import create_tables

    settings = copy_of(built_lake, tmp_path, **RETENTION)
    paths = LakePaths.from_settings(settings)
    location = paths.table(Table.BRONZE)
    # What a crash leaves after the first two of a run's three commits: the plan, bronze open, the rows deleted.
    cutoff = NOW - timedelta(days=30)
    plan = retention._plan(DeltaTable(location), Table.BRONZE, cutoff)
    retention.begin(location, Table.BRONZE, cutoff, plan)
    assert retention.delete(location, Table.BRONZE, cutoff, plan) == 5
    assert DeltaTable(location).metadata().configuration["delta.appendOnly"] == "false"

    [finding] = [f for f in _retention(settings) if f.check == "bronze retention"]
    assert finding.status == FAIL and "appendOnly=false" in finding.detail and "lakehouse maintain" in finding.fix
    interrupted = audit(settings, kafka=False)
    assert [c.name for c in interrupted.checks if not c.ok] == ["retention runs finished"]
    create_tables(spark, paths)  # a pipeline (re)started meanwhile still starts

    reports = {r.table: r for r in maintain(paths, [Table.BRONZE], vacuum=False)}  # no retention set: repair only
    assert reports["bronze"].retention_repaired and reports["bronze"].rows_removed == 0
    assert DeltaTable(location).metadata().configuration["delta.appendOnly"] == "true"
    assert all(f.status != FAIL for f in _retention(settings))
    report = audit(settings, kafka=False)
    assert report.ok, report.checks
    assert report.totals()["removed_by_retention"] == 5  # counted once, from the run's own plan

    # With every record of a partition removed, offsets Kafka loses after the line are still found.
    everything = retention.apply_retention(paths, Table.BRONZE, timedelta(hours=1), now=NOW + timedelta(days=1))
    assert everything.rows_removed == 4
    batch = spark.createDataFrame(
        [("device-data", 0, 8, 9)], "topic STRING, `partition` INT, first BIGINT, last BIGINT"
    )
    assert OffsetTracker().gaps(spark, location, batch, lambda: {("device-data", 0): 8}) == [
        Gap("device-data", 0, 6, 7)
    ]
    # Offsets Kafka still holds were skipped for a transaction's markers or aborted records, not lost.
    assert OffsetTracker().gaps(spark, location, batch, lambda: {("device-data", 0): 7}) == [
        Gap("device-data", 0, 6, 6)
    ]
    assert OffsetTracker().gaps(spark, location, batch, lambda: {("device-data", 0): 0}) == []
