"""The serving store follows the lake by commit: what a commit wrote is served after a refresh whatever `updated_at`
its rows carry, deleted rows are gone, and a compaction loads nothing; on a local disk and on S3 (S3Proxy). The
lake's commits are written with delta-rs, as a replay, a MERGE that deletes, OPTIMIZE and log cleanup leave them,
so no Spark is needed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from lake import deltalog, objectstore
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


def second_row(second: int, count: int, value: float, updated_at: datetime) -> dict:
    """Gold's row of the second START + `second`: `count` readings of `value` from one device."""
    kpis = {"average_value": value, "min_value": value, "max_value": value, "sum_value": value * count}
    return {
        "timestamp": START + timedelta(seconds=second),
        "reading_count": count,
        "device_count": 1,
        **kpis,
        "stddev_value": 0.0 if count > 1 else None,
        "updated_at": updated_at,
        "revision": 0,
        "late_readings": 0,
    }


def bucket_row(count: int, value: float, updated_at: datetime, grain: str = "minute") -> dict:
    """The rollups' row of the fleet's bucket that START begins."""
    return {
        "grain": grain,
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


def reading(device_id: str, second: int) -> dict:
    moment = START + timedelta(seconds=second)
    return {
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


def second_of(store: SnapshotStore, second: int, grain: Grain = Grain.SECOND) -> queries.Kpis | None:
    """The KPIs a request for the bucket of START + `second` gets now, from the store file."""
    with store.read() as (snapshot, cursor):
        assert snapshot.from_store
        instant_us = int((START + timedelta(seconds=second)).timestamp() * 1_000_000)
        return queries.kpis(queries.Source(cursor, snapshot, store.locations), instant_us, grain)


def device_counts(store: SnapshotStore) -> dict[str, int]:
    with store.read() as (snapshot, cursor):
        found = queries.devices(queries.Source(cursor, snapshot, store.locations), None, 100)
    return {device.device_id: device.reading_count for device in found}


def test_a_replay_committed_after_newer_rows_is_served(lake: LakePaths, store: SnapshotStore) -> None:
    """A replay computes its rows before a stream batch and commits them after it: its rows carry an `updated_at`
    older than rows the store already holds, and are served all the same."""
    assert second_of(store, 0).reading_count == 1  # type: ignore[union-attr]
    # The replay's corrected second 0, a second 5 that it alone found, and the minute that holds them.
    replayed = [second_row(0, 4, 2.0, REPLAY_COMPUTED), second_row(5, 2, 3.0, REPLAY_COMPUTED)]
    merge(lake, Table.GOLD, replayed, on="timestamp")
    merge(lake, Table.ROLLUPS, [bucket_row(8, 2.5, REPLAY_COMPUTED)], on="grain,timestamp")
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


def test_deleted_rows_are_no_longer_served(lake: LakePaths, store: SnapshotStore) -> None:
    """A batch re-run that yields fewer seconds deletes gold's other rows with its MERGE; retention deletes
    silver's old readings."""
    merge(lake, Table.GOLD, [second_row(0, 3, 1.0, REPLAY_COMPUTED)], "timestamp", True)
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
    merge(lake, Table.GOLD, [second_row(1, 6, 1.0, REPLAY_COMPUTED)], "timestamp", True)
    merge(
        lake, Table.GOLD, [second_row(1, 6, 1.0, REPLAY_COMPUTED), second_row(9, 1, 1.0, REPLAY_COMPUTED)], "timestamp"
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
