"""The serving store follows the lake by commit: what a commit wrote is served after a refresh whatever `updated_at`
its rows carry, deleted rows are gone, and a compaction loads nothing; each metric's rows by their own key, so a
commit of one metric leaves the others as they were; on a local disk and on S3 (S3Proxy). The lake's commits are
written with delta-rs, as a replay, a MERGE that deletes, OPTIMIZE and log cleanup leave them, so no Spark is
needed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from lake import deltalog, objectstore, upgrade
from lake.deltars import open_table
from lake.tables import SCHEMAS, LakePaths, Table
from lake.timestamps import Grain
from pipeline.s3server import LocalS3Server
from serve import queries
from serve.snapshot import SnapshotStore
from tests.conftest import running_s3

START = datetime(2024, 7, 30, 12, 0, 0, tzinfo=UTC)
# When the rows first loaded were computed; a replay's rows were computed earlier and committed later.
STREAM_COMPUTED = datetime(2024, 7, 30, 13, 0, tzinfo=UTC)
REPLAY_COMPUTED = datetime(2024, 7, 30, 12, 30, tzinfo=UTC)

_ARROW_TYPES = {
    "STRING": pa.string(),
    "INT": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    "BINARY": pa.binary(),
}


def arrow_schema(table: Table) -> pa.Schema:
    """The table's Spark DDL (lake.tables.SCHEMAS) as an Arrow schema; its columns hold no nested types."""
    fields = []
    for column in SCHEMAS[table].split(", "):
        name, kind, *constraint = column.split()
        fields.append(pa.field(name.strip("`"), _ARROW_TYPES[kind], nullable=constraint != ["NOT", "NULL"]))
    return pa.schema(fields)


def rows(table: Table, values: list[dict]) -> pa.Table:
    schema = arrow_schema(table)
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in values], schema=schema)


def second_row(second: int, count: int, value: float, updated_at: datetime, metric: str = "value") -> dict:
    """Gold's row of `metric` in the second START + `second`: `count` readings of `value` from one device."""
    kpis = {"average_value": value, "min_value": value, "max_value": value, "sum_value": value * count}
    return {
        "metric": metric,
        "timestamp": START + timedelta(seconds=second),
        "reading_count": count,
        "device_count": 1,
        **kpis,
        "stddev_value": 0.0 if count > 1 else None,
        "updated_at": updated_at,
        "revision": 0,
        "late_readings": 0,
    }


def bucket_row(count: int, value: float, updated_at: datetime, grain: str = "minute", metric: str = "value") -> dict:
    """The rollups' row of `metric` in the fleet's bucket that START begins."""
    return {
        "grain": grain,
        "metric": metric,
        "device_id": None,
        "timestamp": START,
        "reading_count": count,
        "device_count": 1,
        "average_value": value,
        "min_value": value,
        "max_value": value,
        "sum_value": value * count,
        "m2_value": 0.0,
        "updated_at": updated_at,
        "revision": 0,
        "late_readings": 0,
    }


def reading(device_id: str, second: int, metric: str | None = "value") -> dict:
    """Silver's row of a reading; metric None as in rows written before metrics existed."""
    moment = START + timedelta(seconds=second)
    return {
        "metric": metric,
        "device_id": device_id,
        "timestamp": moment,
        "value": 1.0,
        "topic": "device-data",
        "partition": 0,
        "offset": second,
        "reading_index": 0,
        "kafka_timestamp": moment,
        "updated_at": STREAM_COMPUTED,
    }


def append(paths: LakePaths, table: Table, values: list[dict]) -> None:
    options = objectstore.access().delta_rs_options() if objectstore.is_s3(paths.root) else None
    location = objectstore.s3_uri(paths.table(table))
    # Partitioned as the pipeline makes the rollups (by grain).
    partitions = ["grain"] if table is Table.ROLLUPS else None
    write_deltalake(location, rows(table, values), mode="append", partition_by=partitions, storage_options=options)


def remove_commit(paths: LakePaths, table: Table, version: int) -> None:
    """Delete one commit file, as log cleanup does once a checkpoint holds it."""
    name = f"_delta_log/{version:020d}.json"
    if objectstore.is_s3(paths.root):
        objectstore.filesystem().delete_file(f"{objectstore.fs_path(paths.table(table))}/{name}")
    else:
        (Path(paths.table(table)) / name).unlink()


def merge(paths: LakePaths, table: Table, values: list[dict], on: str, delete_missing: bool = False) -> None:
    """Upsert `values` by `on`, as the pipeline's MERGEs do; with `delete_missing`, also delete the target's rows
    that `values` do not hold (a MERGE that deletes rows)."""
    condition = " AND ".join(f"t.{column} = s.{column}" for column in on.split(","))
    merging = (
        open_table(paths.table(table))
        .merge(rows(table, values), condition, source_alias="s", target_alias="t")
        .when_matched_update_all()
        .when_not_matched_insert_all()
    )
    if delete_missing:
        merging = merging.when_not_matched_by_source_delete()
    merging.execute()


BUCKET = "served"


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3Server]:
    with running_s3(BUCKET) as server:
        yield server


@pytest.fixture(params=["local disk", "s3"])
def lake(request: pytest.FixtureRequest, tmp_path: Path) -> LakePaths:
    """Silver with two readings of pump-1, gold with their seconds and the rollups with their minute and hour, all
    computed by a stream batch at STREAM_COMPUTED; silver and gold in two commits, so that a file rewrite has files
    to join."""
    root = str(tmp_path / "lake")
    if request.param == "s3":
        request.getfixturevalue("s3")
        root = f"s3a://{BUCKET}/{tmp_path.name}/lake"
    paths = LakePaths(root=root, checkpoints=str(tmp_path / "checkpoints"))
    for second in (0, 1):
        append(paths, Table.SILVER, [reading("pump-1", second)])
        append(paths, Table.GOLD, [second_row(second, 1, 1.0, STREAM_COMPUTED)])
    append(paths, Table.ROLLUPS, [bucket_row(2, 1.0, STREAM_COMPUTED), bucket_row(2, 1.0, STREAM_COMPUTED, "hour")])
    return paths


@pytest.fixture
def store(lake: LakePaths, tmp_path: Path) -> Iterator[SnapshotStore]:
    """A store that serves from its file, built from the lake as the fixture made it."""
    opened = SnapshotStore(lake, tmp_path / "store")
    try:
        opened.refresh()
        assert opened.wait_built(60), opened.build_error
        yield opened
    finally:
        opened.close()


def second_of(
    store: SnapshotStore, second: int, grain: Grain = Grain.SECOND, metric: str = "value"
) -> queries.Kpis | None:
    """The KPIs of `metric` a request for the bucket of START + `second` gets now, from the store file."""
    with store.read() as (snapshot, cursor):
        assert snapshot.from_store
        instant_us = int((START + timedelta(seconds=second)).timestamp() * 1_000_000)
        return queries.kpis(queries.Source(cursor, snapshot, store.locations), instant_us, grain, metric=metric)


def every_metric_of(store: SnapshotStore, second: int, grain: Grain = Grain.SECOND) -> dict[str, int]:
    """Reading counts by metric in the bucket of START + `second`, as GET /kpis/{timestamp}/metrics reads them."""
    with store.read() as (snapshot, cursor):
        instant_us = int((START + timedelta(seconds=second)).timestamp() * 1_000_000)
        found = queries.bucket_metrics(queries.Source(cursor, snapshot, store.locations), instant_us, grain)
    return {row.metric: row.reading_count for row in found}


def device_counts(store: SnapshotStore) -> dict[str, int]:
    with store.read() as (snapshot, cursor):
        found = queries.devices(queries.Source(cursor, snapshot, store.locations), None, 100)
    return {device.device_id: device.reading_count for device in found}


def catalog(store: SnapshotStore) -> dict[str, tuple[int, int]]:
    """The metrics' catalog as GET /catalog/metrics reads it: (device count, reading count) by metric."""
    with store.read() as (snapshot, cursor):
        found = queries.metric_catalog(queries.Source(cursor, snapshot, store.locations))
    return {m.metric: (m.device_count, m.reading_count) for m in found}


def test_a_replay_committed_after_newer_rows_is_served(lake: LakePaths, store: SnapshotStore) -> None:
    """A replay computes its rows before a stream batch and commits them after it: its rows carry an `updated_at`
    older than rows the store already holds, and are served all the same."""
    assert second_of(store, 0).reading_count == 1  # type: ignore[union-attr]
    # The replay's corrected second 0, a second 5 that it alone found, and the minute that holds them.
    replayed = [second_row(0, 4, 2.0, REPLAY_COMPUTED), second_row(5, 2, 3.0, REPLAY_COMPUTED)]
    merge(lake, Table.GOLD, replayed, on="metric,timestamp")
    merge(lake, Table.ROLLUPS, [bucket_row(8, 2.5, REPLAY_COMPUTED)], on="grain,metric,timestamp")
    append(lake, Table.SILVER, [reading("pump-2", 5)])

    report = store.refresh()

    corrected, found = second_of(store, 0), second_of(store, 5)
    assert corrected is not None and (corrected.reading_count, corrected.sum_value) == (4, 8.0)
    assert found is not None and (found.reading_count, found.sum_value) == (2, 6.0)
    assert second_of(store, 1).reading_count == 1  # type: ignore[union-attr]  # untouched
    minute = second_of(store, 0, Grain.MINUTE)
    assert minute is not None and minute.reading_count == 8
    assert second_of(store, 0, Grain.HOUR).reading_count == 2  # type: ignore[union-attr]  # another partition
    assert device_counts(store) == {"pump-1": 2, "pump-2": 1}
    assert store.current.newest_event == START + timedelta(seconds=5)
    assert store.current.gold_version == deltalog.latest_version(lake.table(Table.GOLD)).version  # type: ignore[union-attr]
    # Read from the files the commits added, not copied whole: the MERGE rewrote second 0's file, not second 1's.
    assert report.rows == {"gold": 2, "silver": 1, "rollups": 1}


def test_each_metric_is_served_and_corrected_by_its_own_key(lake: LakePaths, store: SnapshotStore) -> None:
    """A stream batch of a second metric adds its rows beside the first's: the same second and minute hold both, and
    the catalog and the devices' summary count each metric apart. A replay that corrects one metric's second loads
    that row alone and leaves the other metric's second as it was."""
    append(lake, Table.SILVER, [reading("pump-1", 0, "pressure"), reading("pump-2", 0, "pressure")])
    append(lake, Table.SILVER, [reading("pump-2", 1, "pressure")])
    append(lake, Table.GOLD, [second_row(0, 2, 2.5, STREAM_COMPUTED, "pressure")])
    append(lake, Table.GOLD, [second_row(1, 1, 2.5, STREAM_COMPUTED, "pressure")])
    append(lake, Table.ROLLUPS, [bucket_row(3, 2.5, STREAM_COMPUTED, metric="pressure")])

    store.refresh()

    assert every_metric_of(store, 0) == {"pressure": 2, "value": 1}
    assert every_metric_of(store, 0, Grain.MINUTE) == {"pressure": 3, "value": 2}
    assert every_metric_of(store, 0, Grain.HOUR) == {"value": 2}  # no hour of pressure was written
    assert every_metric_of(store, 9) == {}
    pressure = second_of(store, 0, metric="pressure")
    assert pressure is not None and (pressure.metric, pressure.reading_count, pressure.sum_value) == (
        "pressure",
        2,
        5.0,
    )
    assert second_of(store, 0).sum_value == 1.0  # type: ignore[union-attr]
    assert catalog(store) == {"pressure": (2, 3), "value": (1, 2)}
    with store.read() as (snapshot, cursor):
        source = queries.Source(cursor, snapshot, store.locations)
        summary = {d.device_id: (d.reading_count, d.metrics) for d in queries.devices(source, None, 100)}
        of_pressure = {d.device_id: d.reading_count for d in queries.devices(source, None, 100, metric="pressure")}
        assert queries.is_known(source, "pressure") and not queries.is_known(source, "flow")
    assert summary == {"pump-1": (3, ("pressure", "value")), "pump-2": (2, ("pressure",))}
    assert of_pressure == {"pump-1": 1, "pump-2": 2}

    merge(lake, Table.GOLD, [second_row(0, 2, 4.0, REPLAY_COMPUTED, "pressure")], on="metric,timestamp")
    report = store.refresh()

    assert report.rows == {"gold": 1}
    assert second_of(store, 0, metric="pressure").sum_value == 8.0  # type: ignore[union-attr]
    assert second_of(store, 0).sum_value == 1.0  # type: ignore[union-attr]
    assert second_of(store, 1, metric="pressure").sum_value == 2.5  # type: ignore[union-attr]
    assert second_of(store, 0, metric="flow") is None


def test_readings_written_before_metrics_count_as_value(tmp_path: Path) -> None:
    """A lake written before metrics, upgraded as the API's start does it (lake.upgrade): silver's old files lack the
    column and its rows stay null, gold's rows are filled with `value`. The store serves them as metric `value`,
    and so a reading appended later with a null metric."""
    paths = LakePaths(root=str(tmp_path / "lake"), checkpoints=str(tmp_path / "checkpoints"))
    for table, values in (
        (Table.SILVER, [reading("pump-1", 0)]),
        (Table.GOLD, [second_row(0, 1, 1.0, STREAM_COMPUTED)]),
    ):
        write_deltalake(paths.table(table), rows(table, values).drop_columns(["metric"]))
    assert upgrade.upgrade_lake(paths) == [Table.SILVER, Table.GOLD]
    store = SnapshotStore(paths, tmp_path / "store")
    try:
        store.refresh()
        assert store.wait_built(60), store.build_error
        assert catalog(store) == {"value": (1, 1)}
        assert second_of(store, 0).reading_count == 1  # type: ignore[union-attr]

        append(paths, Table.SILVER, [reading("pump-2", 1, metric=None)])
        store.refresh()

        assert catalog(store) == {"value": (2, 2)}
        assert device_counts(store) == {"pump-1": 1, "pump-2": 1}
    finally:
        store.close()


def test_deleted_rows_are_no_longer_served(lake: LakePaths, store: SnapshotStore) -> None:
    """A batch re-run that yields fewer seconds deletes gold's other rows with its MERGE; retention deletes
    silver's old readings."""
    merge(lake, Table.GOLD, [second_row(0, 3, 1.0, REPLAY_COMPUTED)], "metric,timestamp", True)
    open_table(lake.table(Table.SILVER)).delete(f"\"timestamp\" > '{START.isoformat()}'")

    store.refresh()

    assert second_of(store, 1) is None
    assert second_of(store, 0).reading_count == 3  # type: ignore[union-attr]
    assert store.current.newest_event == START
    assert device_counts(store) == {"pump-1": 1}


def test_a_compaction_loads_no_rows(lake: LakePaths, store: SnapshotStore) -> None:
    before = store.current.gold_version
    open_table(lake.table(Table.GOLD)).optimize.compact()

    report = store.refresh()

    assert report.changed and store.current.gold_version == (before or 0) + 1
    assert report.rows == {"gold": 0}
    assert second_of(store, 0).reading_count == 1  # type: ignore[union-attr]
    assert second_of(store, 1).reading_count == 1  # type: ignore[union-attr]


def test_a_compaction_keeps_the_rows_of_files_added_since_the_last_refresh(
    lake: LakePaths, store: SnapshotStore
) -> None:
    """OPTIMIZE rewrites a file that commits after the store's version added: its rows are loaded from the file
    that took them."""
    append(lake, Table.GOLD, [second_row(7, 1, 1.0, REPLAY_COMPUTED)])
    open_table(lake.table(Table.GOLD)).optimize.compact()

    store.refresh()

    assert second_of(store, 7).reading_count == 1  # type: ignore[union-attr]


def test_commits_that_log_cleanup_removed_are_read_as_the_newest_version(
    lake: LakePaths, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store was down while gold moved on, was checkpointed and its older commits cleaned up: the commits it
    would follow are gone, so it copies gold again at the newest version."""
    merge(lake, Table.GOLD, [second_row(1, 6, 1.0, REPLAY_COMPUTED)], "metric,timestamp", True)
    merge(
        lake,
        Table.GOLD,
        [second_row(1, 6, 1.0, REPLAY_COMPUTED), second_row(9, 1, 1.0, REPLAY_COMPUTED)],
        "metric,timestamp",
    )
    table = open_table(lake.table(Table.GOLD))
    table.create_checkpoint()
    for version in range(table.version()):  # cleanup removes the oldest commits first
        remove_commit(lake, Table.GOLD, version)
    # Long after: on S3 the store asks again whether the version it holds is still in the log.
    monkeypatch.setattr(deltalog, "_KNOWN_RECHECK_S", 0.0)

    store.refresh()

    assert store.current.gold_version == table.version()
    assert second_of(store, 0) is None
    assert second_of(store, 1).reading_count == 6  # type: ignore[union-attr]
    assert second_of(store, 9).reading_count == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("lake", ["s3"], indirect=True)
def test_a_refresh_on_s3_asks_one_file_per_table_unless_a_version_moved(
    lake: LakePaths, store: SnapshotStore, request: pytest.FixtureRequest
) -> None:
    assert objectstore.is_s3(lake.root)
    server: LocalS3Server = request.getfixturevalue("s3")
    before = server.requests_served()
    for _ in range(10):
        assert not store.refresh().changed
    assert (server.requests_served() - before) / 10 <= 3
    append(lake, Table.GOLD, [second_row(3, 1, 1.0, REPLAY_COMPUTED)])
    before = server.requests_served()
    assert store.refresh().rows == {"gold": 1}
    # The search for the new version and its commit time, the other tables' HEADs, the first commits that tell a
    # table made anew (as before), then gold's one new commit and its one new file: 19 requests, not a log scan.
    assert server.requests_served() - before <= 20
