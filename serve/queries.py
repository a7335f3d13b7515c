"""The API's queries over a serving snapshot (`serve.snapshot`): KPIs of one bucket or of a range, and devices."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import duckdb

from lake.errors import LakeError
from lake.tables import KPI_FIELDS, KpiValues
from lake.timestamps import EPOCH, MAX_US, Grain, from_us

# The KPIs of KPI_FIELDS, in that order, over the readings of one bucket.
KPI_AGGREGATES = (
    "count(*), count(DISTINCT device_id), avg(value), min(value), max(value), sum(value), stddev_samp(value)"
)
# A bucket's start per grain; constants chosen by the Grain enum, never text from a request.
_BUCKET_START = {grain: f"date_trunc('{grain.value}', \"timestamp\")" for grain in Grain}


class Kpis(KpiValues, kw_only=True):
    """The KPIs of the bucket of `grain` that starts at `bucket_start_us`."""

    bucket_start_us: int
    grain: Grain


@dataclass(frozen=True)
class DeviceSummary:
    device_id: str
    first_reading: datetime
    last_reading: datetime
    reading_count: int


def kpis(
    connection: duckdb.DuckDBPyConnection, instant_us: int, grain: Grain = Grain.SECOND, device_id: str | None = None
) -> Kpis | None:
    """KPIs of the bucket that holds the instant; None when it has no readings."""
    start_us = grain.bucket_start_us(instant_us)
    end_us = min(start_us + grain.micros, MAX_US)  # the last day of year 9999 ends at the last instant
    found = kpi_series(connection, start_us, end_us, grain, device_id, limit=1)
    return found[0] if found else None


def kpi_series(
    connection: duckdb.DuckDBPyConnection,
    start_us: int,
    end_us: int,
    grain: Grain,
    device_id: str | None,
    limit: int,
) -> list[Kpis]:
    """Buckets with readings whose start lies in [start, end), oldest first, at most `limit` of them.

    Fleet-wide seconds are gold's rows; a device's KPIs and coarser buckets are computed over silver's deduplicated
    readings, because distinct devices and standard deviations do not add up from per-second rows.
    """
    parameters: dict[str, object] = {"start": from_us(start_us), "end": from_us(end_us), "limit": limit}
    in_range = '"timestamp" >= $start AND "timestamp" < $end'
    if grain is Grain.SECOND and device_id is None:
        query = f'SELECT "timestamp", {", ".join(KPI_FIELDS)} FROM gold WHERE {in_range} ORDER BY "timestamp"'
    else:
        # Readings are filtered on the range of their buckets: [start, end) holds whole buckets once both ends are
        # bucket starts, which the API makes them.
        if device_id is not None:
            in_range += " AND device_id = $device"
            parameters["device"] = device_id
        query = (
            f"SELECT {_BUCKET_START[grain]} AS bucket, {KPI_AGGREGATES} FROM silver WHERE {in_range} "
            "GROUP BY bucket ORDER BY bucket"
        )
    rows = _fetch(connection, query + " LIMIT $limit", parameters)
    return [Kpis(bucket_start_us=_us(row[0]), grain=grain, **dict(zip(KPI_FIELDS, row[1:]))) for row in rows]


def devices(connection: duckdb.DuckDBPyConnection, after: str | None, limit: int) -> list[DeviceSummary]:
    """Known devices ordered by id, from the `devices` table of a snapshot, starting after the id `after`."""
    query = "SELECT device_id, first_reading, last_reading, reading_count FROM devices"
    parameters: dict[str, object] = {"limit": limit}
    if after is not None:
        query += " WHERE device_id > $after"
        parameters["after"] = after
    return [DeviceSummary(*row) for row in _fetch(connection, query + " ORDER BY device_id LIMIT $limit", parameters)]


def _fetch(connection: duckdb.DuckDBPyConnection, query: str, parameters: dict[str, object]) -> list[tuple]:
    try:
        return connection.execute(query, parameters).fetchall()
    except duckdb.CatalogException as exc:
        raise LakeError("the lake has no tables yet; run `lakehouse pipeline` first") from exc


def _us(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)
