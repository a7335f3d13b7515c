"""The API's queries over a serving snapshot (`serve.snapshot`): KPIs of one bucket or of a range, and devices.

What answers which question:
- a second of the fleet: gold's row;
- a minute, hour or day of the fleet or of one device: the one `rollups` row of (grain, device, bucket start);
- a second of one device: silver's readings of that device in that second, read from the lake at the snapshot's
  silver version with the time range as constants, so that DuckDB skips the files outside it.
From the store file, gold and rollups are point or range reads of an ART index; while the file is built, the same
rows come from `delta_scan` of the lake at the snapshot's pinned versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import duckdb

from lake.errors import LakeError
from lake.tables import KPI_FIELDS, KpiValues, Table
from lake.timestamps import EPOCH, MAX_US, Grain, from_us
from serve.snapshot import Snapshot, rollup_key, timestamp_literal

# The KPIs of KPI_FIELDS, in that order, over the readings of one bucket, each beside its bucket's mean
# (`bucket_mean`). DuckDB's stddev_samp keeps a running mean rounded to the values' ulp, 1.5e-8 at 1e8: for a meter
# at 1e8 +- 1 it was 4e-6 off. Of the deviations from the mean (small numbers, exact when the two are close) it
# loses nothing, and the variance of value - c is that of value.
KPI_AGGREGATES = (
    "count(*), count(DISTINCT device_id), avg(value), min(value), max(value), sum(value), "
    "stddev_samp(value - bucket_mean)"
)
# And how they came to be (lake.tables): revisions since the first commit, readings that arrived late.
HISTORY_FIELDS = ("revision", "late_readings")
_FIELDS = ", ".join(KPI_FIELDS) + ", coalesce(revision, 0), coalesce(late_readings, 0)"
# A device's second, computed from silver at request time: its late readings are counted, its revisions not kept.
_COLUMNS = (*KPI_FIELDS, *HISTORY_FIELDS)
_DEVICE_SECOND_HISTORY = (
    "NULL::BIGINT, count_if(arrival_watermark >= date_trunc('second', \"timestamp\") + INTERVAL 1 SECOND)"
)


class Kpis(KpiValues, kw_only=True):
    """The KPIs of the bucket of `grain` that starts at `bucket_start_us`."""

    bucket_start_us: int
    grain: Grain
    revision: int | None  # null for one device's second (computed from silver, whose history is not kept)
    late_readings: int


@dataclass(frozen=True)
class DeviceSummary:
    device_id: str
    first_reading: datetime
    last_reading: datetime
    reading_count: int


@dataclass(frozen=True)
class Source:
    """Where a request's answers come from: a cursor (inside the snapshot's transaction when the store file
    answers), the snapshot, and the lake's table folders as that cursor may read them."""

    cursor: duckdb.DuckDBPyConnection
    snapshot: Snapshot
    locations: dict[Table, str]

    def scan(self, table: Table) -> str:
        """`delta_scan` of the table at the snapshot's version; `$<table>` names its folder."""
        version = self.snapshot.version(table)
        if version is None:
            raise LakeError(f"the lake has no {table.value} table yet; run `lakehouse pipeline` first")
        return f"delta_scan(${table.value}, version := {int(version)})"


def kpis(source: Source, instant_us: int, grain: Grain = Grain.SECOND, device_id: str | None = None) -> Kpis | None:
    """KPIs of the bucket that holds the instant; None when it has no readings."""
    start_us = grain.bucket_start_us(instant_us)
    if source.snapshot.from_store and (grain is not Grain.SECOND or device_id is None):
        parameters: dict[str, object]
        # One equality on an ART-indexed column: DuckDB answers it from the index, not from a scan.
        if grain is Grain.SECOND:
            query, parameters = f'SELECT {_FIELDS} FROM gold WHERE "timestamp" = $start', {"start": from_us(start_us)}
        else:
            _need_rollups(source)
            query = f"SELECT {_FIELDS} FROM rollups WHERE bucket_key = $key"
            parameters = {"key": rollup_key(grain.value, device_id, start_us)}
        rows = _fetch(source.cursor, query, parameters)
        return Kpis(bucket_start_us=start_us, grain=grain, **dict(zip(_COLUMNS, rows[0]))) if rows else None
    end_us = min(start_us + grain.micros, MAX_US)  # the last day of year 9999 ends at the last instant
    found = kpi_series(source, start_us, end_us, grain, device_id, limit=1)
    return found[0] if found else None


def _need_rollups(source: Source) -> None:
    if source.snapshot.rollups_version is None:
        raise LakeError("the lake has no rollups table yet; run `lakehouse pipeline` first")


def kpi_series(
    source: Source, start_us: int, end_us: int, grain: Grain, device_id: str | None, limit: int
) -> list[Kpis]:
    """Buckets with readings whose start lies in [start, end), oldest first, at most `limit` of them; both ends are
    bucket starts (the API makes them so)."""
    parameters: dict[str, object] = {"limit": limit}
    if grain is Grain.SECOND and device_id is None:
        if source.snapshot.from_store:
            table, in_range = "gold", '"timestamp" >= $start AND "timestamp" < $end'
            parameters |= {"start": from_us(start_us), "end": from_us(end_us)}
        else:
            table, in_range = _lake(source, Table.GOLD, parameters, start_us, end_us)
        query = f'SELECT "timestamp", {_FIELDS} FROM {table} WHERE {in_range} ORDER BY "timestamp"'
    elif grain is Grain.SECOND:
        # A device's seconds: its readings in silver, the range as constants so that Delta files are skipped.
        table, in_range = _lake(source, Table.SILVER, parameters, start_us, end_us)
        parameters["device"] = device_id
        readings = (
            f"SELECT *, avg(value) OVER (PARTITION BY date_trunc('second', \"timestamp\")) AS bucket_mean "
            f"FROM {table} WHERE {in_range} AND device_id = $device"
        )
        query = (
            f"SELECT date_trunc('second', \"timestamp\") AS bucket, {KPI_AGGREGATES}, {_DEVICE_SECOND_HISTORY} "
            f"FROM ({readings}) GROUP BY bucket ORDER BY bucket"
        )
    elif source.snapshot.from_store:
        _need_rollups(source)
        # Rows are appended in key order per sync, so DuckDB's per-block min/max of grain, device and time skip most
        # blocks of a range (ART indexes serve equality only).
        parameters |= {"grain": grain.value, "start": from_us(start_us), "end": from_us(end_us)}
        device = "device_id IS NULL"
        if device_id is not None:
            device, parameters["device"] = "device_id = $device", device_id
        query = (
            f'SELECT "timestamp", {_FIELDS} FROM rollups WHERE grain = $grain AND {device} '
            'AND "timestamp" >= $start AND "timestamp" < $end ORDER BY "timestamp"'
        )
    else:
        table, in_range = _lake(source, Table.ROLLUPS, parameters, start_us, end_us)
        parameters |= {"grain": grain.value, "device": device_id}
        query = (
            f'SELECT "timestamp", {_FIELDS} FROM {table} WHERE grain = $grain '
            f'AND device_id IS NOT DISTINCT FROM $device AND {in_range} ORDER BY "timestamp"'
        )
    rows = _fetch(source.cursor, query + " LIMIT $limit", parameters)
    return [Kpis(bucket_start_us=_us(row[0]), grain=grain, **dict(zip(_COLUMNS, row[1:]))) for row in rows]


def _lake(source: Source, table: Table, parameters: dict[str, object], start_us: int, end_us: int) -> tuple[str, str]:
    """A table of the lake at the snapshot's version, and a filter on [start, end) as constants (made from the
    integers the API computed, never from request text) so that DuckDB skips files by their statistics."""
    scan = source.scan(table)
    parameters[table.value] = source.locations[table]
    in_range = (
        f'"timestamp" >= {timestamp_literal(from_us(start_us))} AND "timestamp" < {timestamp_literal(from_us(end_us))}'
    )
    return scan, in_range


def devices(source: Source, after: str | None, limit: int) -> list[DeviceSummary]:
    """Known devices ordered by id, starting after the id `after`: the store's `devices` summary, or while the store
    file is built, the same summary computed over silver."""
    parameters: dict[str, object] = {"limit": limit}
    if source.snapshot.from_store:
        query = "SELECT device_id, first_reading, last_reading, reading_count FROM devices"
    else:
        parameters["silver"] = source.locations[Table.SILVER]
        query = (
            'SELECT device_id, min("timestamp"), max("timestamp"), count(*) '
            f"FROM {source.scan(Table.SILVER)} GROUP BY device_id"
        )
        query = f"SELECT * FROM ({query})"
    if after is not None:
        query += " WHERE device_id > $after"
        parameters["after"] = after
    return [
        DeviceSummary(*row) for row in _fetch(source.cursor, query + " ORDER BY device_id LIMIT $limit", parameters)
    ]


def _fetch(connection: duckdb.DuckDBPyConnection, query: str, parameters: dict[str, object]) -> list[tuple]:
    try:
        return connection.execute(query, parameters).fetchall()
    except duckdb.CatalogException as exc:
        raise LakeError("the lake has no tables yet; run `lakehouse pipeline` first") from exc


def _us(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)
