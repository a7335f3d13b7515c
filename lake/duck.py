"""DuckDB over the lake: views `bronze`, `silver`, `gold`, `quarantine` and the KPI queries of the API.

DuckDB cannot download extensions here, so the delta extension is loaded from the pinned
`duckdb-extension-delta` wheel, which carries it for exactly the installed DuckDB version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

from lake.settings import local_path
from lake.tables import KPI_FIELDS, LakePaths, Table
from lake.timestamps import MAX_US, Grain, from_us


class LakeError(Exception):
    """The lake cannot be opened or queried as asked."""


def delta_extension() -> Path:
    import duckdb_extension_delta

    path = Path(duckdb_extension_delta.__file__).parent / "extensions" / f"v{duckdb.__version__}" / "delta.duckdb_extension"
    if not path.exists():
        raise LakeError(
            f"no delta extension for DuckDB {duckdb.__version__} at {path}; "
            "install duckdb-extension-delta at the same version as duckdb"
        )
    return path


def table_exists(paths: LakePaths, table: Table) -> bool:
    """Whether the table has a Delta log; on object stores assumed (listing them costs a request per table)."""
    folder = local_path(paths.table(table))
    return folder is None or (folder / "_delta_log").is_dir()


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


_GOLD_LOOKUP = f"SELECT {', '.join(KPI_FIELDS)} FROM gold WHERE \"timestamp\" = $start"
_SILVER_AGGREGATE = (
    "SELECT count(*), count(DISTINCT device_id), avg(value), min(value), max(value), sum(value), stddev_samp(value) "
    "FROM silver WHERE \"timestamp\" >= $start AND \"timestamp\" < $end"
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
