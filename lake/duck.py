"""DuckDB over the lake: views `bronze`, `silver`, `gold`, `quarantine` and the KPI queries of the API.

DuckDB cannot download extensions here, so the delta extension is loaded from the pinned
`duckdb-extension-delta` wheel, which carries it for exactly the installed DuckDB version.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from lake.errors import LakeError
from lake.settings import local_path
from lake.tables import KPI_FIELDS, LakePaths, Table
from lake.timestamps import EPOCH, MAX_US, Grain, from_us

if TYPE_CHECKING:
    import pyarrow as pa


def delta_extension() -> Path:
    import duckdb_extension_delta

    path = (
        Path(duckdb_extension_delta.__file__).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / "delta.duckdb_extension"
    )
    if not path.exists():
        raise LakeError(
            f"no delta extension for DuckDB {duckdb.__version__} at {path}; "
            "install duckdb-extension-delta at the same version as duckdb"
        )
    return path


def table_exists(paths: LakePaths, table: Table) -> bool:
    """Whether the table has its first commit; on object stores assumed (listing them costs a request per table).

    The `_delta_log` folder appears before its first commit file, and a reader of a log without one fails."""
    folder = local_path(paths.table(table))
    return folder is None or (folder / "_delta_log" / "00000000000000000000.json").is_file() or any(
        (folder / "_delta_log").glob("*.checkpoint*.parquet")
    )


def connect(paths: LakePaths, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A connection with the delta extension loaded and one view per existing table."""
    connection = duckdb.connect(
        database,
        config={"autoinstall_known_extensions": "false", "autoload_known_extensions": "false"},
    )
    connection.load_extension(str(delta_extension()))
    connection.execute("SET TimeZone = 'UTC'")  # timestamps print and truncate in UTC, as the contract speaks
    create_views(connection, paths)
    return connection


def create_views(connection: duckdb.DuckDBPyConnection, paths: LakePaths) -> list[Table]:
    created = []
    for table in Table:
        if not table_exists(paths, table):
            continue
        location = paths.table(table).replace("'", "''")
        connection.execute(f"CREATE OR REPLACE VIEW {table.value} AS SELECT * FROM delta_scan('{location}')")
        created.append(table)
    return created


@dataclass(frozen=True)
class Kpis:
    bucket_start_us: int
    grain: Grain
    reading_count: int
    device_count: int
    average_value: float
    min_value: float
    max_value: float
    sum_value: float
    stddev_value: float | None


_GOLD_LOOKUP = f'SELECT {", ".join(KPI_FIELDS)} FROM gold WHERE "timestamp" = $start'
_SILVER_AGGREGATE = (
    "SELECT count(*), count(DISTINCT device_id), avg(value), min(value), max(value), sum(value), stddev_samp(value) "
    'FROM silver WHERE "timestamp" >= $start AND "timestamp" < $end'
)


def kpis(
    connection: duckdb.DuckDBPyConnection, instant_us: int, grain: Grain = Grain.SECOND, device_id: str | None = None
) -> Kpis | None:
    """KPIs of the bucket that holds the instant; None when it has no readings.

    Fleet-wide seconds come from gold; a device's KPIs and coarser buckets are computed over silver's deduplicated
    readings, because distinct devices and standard deviations do not add up from per-second rows.
    """
    start_us = grain.bucket_start_us(instant_us)
    start = from_us(start_us)
    try:
        if grain is Grain.SECOND and device_id is None:
            row = connection.execute(_GOLD_LOOKUP, {"start": start}).fetchone()
        else:
            query = _SILVER_AGGREGATE
            end_us = min(start_us + grain.micros, MAX_US)  # the last day of year 9999 ends at the last instant
            parameters: dict[str, object] = {"start": start, "end": from_us(end_us)}
            if device_id is not None:
                query += " AND device_id = $device"
                parameters["device"] = device_id
            row = connection.execute(query, parameters).fetchone()
    except duckdb.CatalogException as exc:
        raise LakeError("the lake has no tables yet; run `lakehouse pipeline` first") from exc
    if row is None or not row[0]:
        return None
    return Kpis(start_us, grain, *row)


def connect_reader(paths: LakePaths) -> duckdb.DuckDBPyConnection:
    """A connection that reads the lake's Delta tables and nothing else: file access is limited to the lake root
    and the configuration is locked, so no later statement can widen it."""
    connection = duckdb.connect(
        ":memory:", config={"autoinstall_known_extensions": "false", "autoload_known_extensions": "false"}
    )
    connection.load_extension(str(delta_extension()))
    connection.execute("SET TimeZone = 'UTC'")
    folder = local_path(paths.root)
    if folder is not None:  # object stores need their own secrets and extensions, set up by whoever runs them
        connection.execute("SET allowed_directories = [$root]", {"root": str(folder).rstrip("/") + "/"})
        connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")
    return connection


def scan_table(
    connection: duckdb.DuckDBPyConnection, location: str, version: int, updated_since: datetime | None
) -> pa.Table:
    """Rows of one pinned table version, all of them or those updated at or after `updated_since`."""
    folder = local_path(location)  # a `file:` URI as the folder it names, the spelling allowed_directories compares
    query = "SELECT * FROM delta_scan($location, version := $version)"
    parameters: dict[str, object] = {"location": str(folder) if folder else location, "version": version}
    if updated_since is not None:
        query += " WHERE updated_at >= $since"
        parameters["since"] = updated_since
    return connection.execute(query, parameters).to_arrow_table()


# A bucket's start per grain; constants chosen by the Grain enum, never text from a request.
_BUCKET_START = {grain: f"date_trunc('{grain.value}', \"timestamp\")" for grain in Grain}
_KPI_AGGREGATES = (
    "count(*), count(DISTINCT device_id), avg(value), min(value), max(value), sum(value), stddev_samp(value)"
)


def kpi_series(
    connection: duckdb.DuckDBPyConnection,
    start_us: int,
    end_us: int,
    grain: Grain,
    device_id: str | None,
    limit: int,
) -> list[Kpis]:
    """Buckets with readings whose start lies in [start, end), oldest first, at most `limit` of them.

    Fleet-wide seconds are gold's rows; other series are computed over silver, as `kpis` does for one bucket.
    """
    parameters: dict[str, object] = {"start": from_us(start_us), "end": from_us(end_us), "limit": limit}
    if grain is Grain.SECOND and device_id is None:
        query = (
            f'SELECT "timestamp", {", ".join(KPI_FIELDS)} FROM gold '
            'WHERE "timestamp" >= $start AND "timestamp" < $end ORDER BY "timestamp" LIMIT $limit'
        )
    else:
        # Readings are filtered on the range of their buckets: [start, end) holds whole buckets once both ends are
        # bucket starts, which the API makes them.
        device_filter = " AND device_id = $device" if device_id is not None else ""
        if device_id is not None:
            parameters["device"] = device_id
        query = (
            f"SELECT {_BUCKET_START[grain]} AS bucket, {_KPI_AGGREGATES} FROM silver "
            f'WHERE "timestamp" >= $start AND "timestamp" < $end{device_filter} '
            "GROUP BY bucket ORDER BY bucket LIMIT $limit"
        )
    try:
        rows = connection.execute(query, parameters).fetchall()
    except duckdb.CatalogException as exc:
        raise LakeError("the lake has no tables yet; run `lakehouse pipeline` first") from exc
    return [Kpis(_us(row[0]), grain, *row[1:]) for row in rows]


@dataclass(frozen=True)
class DeviceSummary:
    device_id: str
    first_reading: datetime
    last_reading: datetime
    reading_count: int


def devices(connection: duckdb.DuckDBPyConnection, after: str | None, limit: int) -> list[DeviceSummary]:
    """Known devices ordered by id, from the `devices` table of a snapshot, starting after the id `after`."""
    query = "SELECT device_id, first_reading, last_reading, reading_count FROM devices"
    parameters: dict[str, object] = {"limit": limit}
    if after is not None:
        query += " WHERE device_id > $after"
        parameters["after"] = after
    try:
        rows = connection.execute(query + " ORDER BY device_id LIMIT $limit", parameters).fetchall()
    except duckdb.CatalogException as exc:
        raise LakeError("the lake has no tables yet; run `lakehouse pipeline` first") from exc
    return [DeviceSummary(*row) for row in rows]


def _us(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)
