"""The API's queries over a serving snapshot (`serve.snapshot`): KPIs of one metric in one bucket or over a range,
every metric of one bucket, the metrics the lake knows, and devices.

What answers which question:
- a second of the fleet: gold's row of (metric, second);
- a minute, hour or day of the fleet or of one device: the one `rollups` row of (grain, metric, device, bucket start);
- a second of one device: silver's readings of that device and metric in that second, read from the lake at the
  snapshot's silver version with the time range as constants, so that DuckDB skips the files outside it;
- every metric of one bucket: the same rows, one key per metric the catalog holds, in one lookup;
- the metrics, and the devices with their metrics: the store's summary per device and metric.
From the store file, gold and rollups are point or range reads of an ART index; while the file is built, the same
rows come from `delta_scan` of the lake at the snapshot's pinned versions.

Which metrics the lake knows is read from the store's summary of silver, not from the lake's `metrics` table: the
summary is at the snapshot's silver version and read in the request's own transaction, so a name is known exactly
when the snapshot holds readings of it, and "no such metric" never contradicts an answer given under the same ETag.
The `metrics` table would be a fourth table to follow, may name a metric whose readings are not committed yet (or
no longer kept), and holds neither the device counts nor the reading times the catalog answers with.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import duckdb

from lake.errors import LakeError
from lake.tables import DEFAULT_METRIC, KPI_FIELDS, KpiValues, Table
from lake.timestamps import EPOCH, MAX_US, Grain, from_us
from lake.upgrade import SILVER_METRIC
from serve.snapshot import Snapshot, SnapshotStore, gold_key, rollup_key, timestamp_literal

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
# Rows of one bucket with every metric: the lake holds at most LAKEHOUSE_MAX_METRICS names, far fewer than this.
_EVERY_METRIC = 1_000_000


class Kpis(KpiValues, kw_only=True):
    """The KPIs of one metric in the bucket of `grain` that starts at `bucket_start_us`."""

    metric: str
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
    metrics: tuple[str, ...]  # the names of the metrics it sent, sorted


@dataclass(frozen=True)
class MetricSummary:
    metric: str
    device_count: int  # devices that sent it
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


def kpis(
    source: Source,
    instant_us: int,
    grain: Grain = Grain.SECOND,
    device_id: str | None = None,
    metric: str = DEFAULT_METRIC,
) -> Kpis | None:
    """KPIs of one metric in the bucket that holds the instant; None when it has no readings of that metric."""
    start_us = grain.bucket_start_us(instant_us)
    if _indexed(source, grain, device_id):
        found = _lookup(source, start_us, grain, device_id, [metric])
        return found[0] if found else None
    found = kpi_series(source, start_us, _bucket_end_us(start_us, grain), grain, device_id, limit=1, metric=metric)
    return found[0] if found else None


def kpis_at_once(
    store: SnapshotStore, instant_us: int, grain: Grain, device_id: str | None, metric: str
) -> tuple[Snapshot, Kpis, tuple[str, str]] | None:
    """`kpis` of a bucket the store file holds under a key, in one statement that also reads the snapshot's
    generation, with the row's table and key; None when another road must answer (the lake answers, a device's
    second, no row: the caller asks `kpis` in a transaction, which also tells an unknown metric from an empty
    bucket)."""
    if not store.current.from_store or (grain is Grain.SECOND and device_id is not None):
        return None
    start_us = grain.bucket_start_us(instant_us)
    (table, column), key = _keyed_table(grain), _bucket_key(grain, metric, device_id, start_us)
    query = f"SELECT {_FIELDS} FROM {table} WHERE {column} = $key"
    try:
        read = store.read_once(query, {"key": key})
    except duckdb.CatalogException:
        return None  # no rollups table in the file yet
    if read is None or not read[1]:
        return None
    snapshot, rows = read
    found = Kpis(metric=metric, bucket_start_us=start_us, grain=grain, **dict(zip(_COLUMNS, rows[0])))
    return snapshot, found, (table, key)


def bucket_metrics(source: Source, instant_us: int, grain: Grain, device_id: str | None = None) -> list[Kpis]:
    """KPIs of every metric with readings in the bucket that holds the instant, ordered by metric."""
    start_us = grain.bucket_start_us(instant_us)
    if _indexed(source, grain, device_id):
        return _lookup(source, start_us, grain, device_id, metric_names(source))
    end_us = _bucket_end_us(start_us, grain)
    return kpi_series(source, start_us, end_us, grain, device_id, limit=_EVERY_METRIC, metric=None)


def _indexed(source: Source, grain: Grain, device_id: str | None) -> bool:
    """Whether the store file holds the bucket's rows under a key (all but a device's second, read from silver)."""
    return source.snapshot.from_store and (grain is not Grain.SECOND or device_id is None)


def _bucket_end_us(start_us: int, grain: Grain) -> int:
    return min(start_us + grain.micros, MAX_US)  # the last day of year 9999 ends at the last instant


def _lookup(source: Source, start_us: int, grain: Grain, device_id: str | None, metrics: list[str]) -> list[Kpis]:
    """The store's rows of one bucket for each of `metrics`, by key: equality on an ART-indexed column, or an IN list
    of them, which DuckDB answers from the index rather than a scan."""
    if not metrics:
        return []
    if grain is not Grain.SECOND:
        _need_rollups(source)
    table, column = _keyed_table(grain)
    keys = [_bucket_key(grain, metric, device_id, start_us) for metric in metrics]
    parameters: dict[str, object] = {f"key_{index}": key for index, key in enumerate(keys)}
    wanted = ", ".join(f"${name}" for name in parameters)
    query = f"SELECT metric, {_FIELDS} FROM {table} WHERE {column} IN ({wanted}) ORDER BY metric"
    return [
        Kpis(metric=row[0], bucket_start_us=start_us, grain=grain, **dict(zip(_COLUMNS, row[1:])))
        for row in _fetch(source.cursor, query, parameters)
    ]


def _keyed_table(grain: Grain) -> tuple[str, str]:
    """The store table that holds a bucket of `grain` under a key, and its key column."""
    return ("gold", "gold_key") if grain is Grain.SECOND else ("rollups", "bucket_key")


def _bucket_key(grain: Grain, metric: str, device_id: str | None, start_us: int) -> str:
    """The store key of one metric's bucket: gold's (the fleet's seconds), or a rollup's."""
    if grain is Grain.SECOND:
        return gold_key(metric, start_us)
    return rollup_key(grain.value, metric, device_id, start_us)


def _need_rollups(source: Source) -> None:
    if source.snapshot.rollups_version is None:
        raise LakeError("the lake has no rollups table yet; run `lakehouse pipeline` first")


def kpi_series(
    source: Source,
    start_us: int,
    end_us: int,
    grain: Grain,
    device_id: str | None,
    limit: int,
    metric: str | None = DEFAULT_METRIC,
) -> list[Kpis]:
    """Buckets with readings of `metric` whose start lies in [start, end), oldest first, at most `limit` of them;
    both ends are bucket starts (the API makes them so). With `metric` None, the rows of every metric, by bucket
    and then by metric."""
    parameters: dict[str, object] = {"limit": limit}
    of_metric = "TRUE"
    if metric is not None:
        of_metric, parameters["metric"] = "metric = $metric", metric
    if grain is Grain.SECOND and device_id is None:
        if source.snapshot.from_store:
            table, in_range = "gold", '"timestamp" >= $start AND "timestamp" < $end'
            parameters |= {"start": from_us(start_us), "end": from_us(end_us)}
        else:
            table, in_range = _lake(source, Table.GOLD, parameters, start_us, end_us)
        query = (
            f'SELECT "timestamp", metric, {_FIELDS} FROM {table} WHERE {of_metric} AND {in_range} '
            'ORDER BY "timestamp", metric'
        )
    elif grain is Grain.SECOND:
        # A device's seconds: its readings in silver, the range as constants so that Delta files are skipped.
        table, in_range = _lake(source, Table.SILVER, parameters, start_us, end_us)
        parameters["device"] = device_id
        device_readings = (
            f'SELECT device_id, {SILVER_METRIC} AS metric, "timestamp", value, arrival_watermark '
            f"FROM {table} WHERE {in_range} AND device_id = $device"
        )
        readings = (
            "SELECT *, avg(value) OVER (PARTITION BY date_trunc('second', \"timestamp\"), metric) AS bucket_mean "
            f"FROM ({device_readings}) WHERE {of_metric}"
        )
        query = (
            f"SELECT date_trunc('second', \"timestamp\") AS bucket, metric, {KPI_AGGREGATES}, "
            f"{_DEVICE_SECOND_HISTORY} FROM ({readings}) GROUP BY bucket, metric ORDER BY bucket, metric"
        )
    elif source.snapshot.from_store:
        _need_rollups(source)
        # Rows are appended in key order per sync, so DuckDB's per-block min/max of grain, metric, device and time
        # skip most blocks of a range (ART indexes serve equality only).
        parameters |= {"grain": grain.value, "start": from_us(start_us), "end": from_us(end_us)}
        device = "device_id IS NULL"
        if device_id is not None:
            device, parameters["device"] = "device_id = $device", device_id
        query = (
            f'SELECT "timestamp", metric, {_FIELDS} FROM rollups WHERE grain = $grain AND {of_metric} AND {device} '
            'AND "timestamp" >= $start AND "timestamp" < $end ORDER BY "timestamp", metric'
        )
    else:
        table, in_range = _lake(source, Table.ROLLUPS, parameters, start_us, end_us)
        parameters |= {"grain": grain.value, "device": device_id}
        query = (
            f'SELECT "timestamp", metric, {_FIELDS} FROM {table} WHERE grain = $grain AND {of_metric} '
            f'AND device_id IS NOT DISTINCT FROM $device AND {in_range} ORDER BY "timestamp", metric'
        )
    rows = _fetch(source.cursor, query + " LIMIT $limit", parameters)
    return [
        Kpis(metric=row[1], bucket_start_us=_us(row[0]), grain=grain, **dict(zip(_COLUMNS, row[2:]))) for row in rows
    ]


def _lake(source: Source, table: Table, parameters: dict[str, object], start_us: int, end_us: int) -> tuple[str, str]:
    """A table of the lake at the snapshot's version, and a filter on [start, end) as constants (made from the
    integers the API computed, never from request text) so that DuckDB skips files by their statistics."""
    scan = source.scan(table)
    parameters[table.value] = source.locations[table]
    in_range = (
        f'"timestamp" >= {timestamp_literal(from_us(start_us))} AND "timestamp" < {timestamp_literal(from_us(end_us))}'
    )
    return scan, in_range


def _summary(source: Source, parameters: dict[str, object]) -> str:
    """The summary per device and metric: the store's table, or while the store file is built, the same summary
    computed over silver (once, until the file serves)."""
    if source.snapshot.from_store:
        return "device_metrics"
    parameters["silver"] = source.locations[Table.SILVER]
    return (
        f'(SELECT device_id, {SILVER_METRIC} AS metric, min("timestamp") AS first_reading, '
        f'max("timestamp") AS last_reading, count(*) AS reading_count FROM {source.scan(Table.SILVER)} '
        "GROUP BY ALL)"
    )


def metric_catalog(source: Source) -> list[MetricSummary]:
    """Every metric the snapshot holds readings of, ordered by name: the store's catalog (a row per metric), or the
    same folded from the summary while the store file is built."""
    parameters: dict[str, object] = {}
    if source.snapshot.from_store:
        query = "SELECT metric, device_count, first_reading, last_reading, reading_count FROM metrics"
    else:
        query = (
            "SELECT metric, count(*), min(first_reading), max(last_reading), sum(reading_count)::BIGINT "
            f"FROM {_summary(source, parameters)} GROUP BY metric"
        )
    return [MetricSummary(*row) for row in _fetch(source.cursor, query + " ORDER BY metric", parameters)]


def metric_names(source: Source, limit: int | None = None) -> list[str]:
    """The names of the metrics the snapshot holds readings of, sorted; the first `limit` of them with a limit."""
    parameters: dict[str, object] = {}
    if source.snapshot.from_store:
        query = "SELECT metric FROM metrics"
    else:
        parameters["silver"] = source.locations[Table.SILVER]
        query = f"SELECT DISTINCT {SILVER_METRIC} AS metric FROM {source.scan(Table.SILVER)}"
    query += " ORDER BY metric"
    if limit is not None:
        query, parameters["limit"] = query + " LIMIT $limit", limit
    return [row[0] for row in _fetch(source.cursor, query, parameters)]


def is_known(source: Source, metric: str) -> bool:
    """Whether the snapshot holds any reading of `metric`. The tutorial's `value`, which every request that names no
    metric asks for, is always known: a lake without its readings yet (a new one) answers a series with an empty
    page and a bucket with "No readings", as before metrics existed, rather than "Unknown metric"."""
    if metric == DEFAULT_METRIC:
        return True
    parameters: dict[str, object] = {"metric": metric}
    if source.snapshot.from_store:
        query = "SELECT 1 FROM metrics WHERE metric = $metric"
    else:
        parameters["silver"] = source.locations[Table.SILVER]
        query = f"SELECT 1 FROM {source.scan(Table.SILVER)} WHERE {SILVER_METRIC} = $metric LIMIT 1"
    return bool(_fetch(source.cursor, query, parameters))


def devices(source: Source, after: str | None, limit: int, metric: str | None = None) -> list[DeviceSummary]:
    """Known devices ordered by id, starting after the id `after`, each with the metrics it sent; with `metric`, only
    the devices that sent it, their first and last reading and count being that metric's."""
    parameters: dict[str, object] = {"limit": limit}
    only = ""
    if metric is not None:
        only, parameters["metric"] = " FILTER (WHERE metric = $metric)", metric
    query = (
        f"SELECT device_id, min(first_reading){only}, max(last_reading){only}, "
        f"CAST(sum(reading_count){only} AS BIGINT), "
        f"list(metric ORDER BY metric) FROM {_summary(source, parameters)}"
    )
    if after is not None:
        query += " WHERE device_id > $after"
        parameters["after"] = after
    query += " GROUP BY device_id"
    if metric is not None:
        query += " HAVING bool_or(metric = $metric)"
    rows = _fetch(source.cursor, query + " ORDER BY device_id LIMIT $limit", parameters)
    return [DeviceSummary(row[0], row[1], row[2], row[3], tuple(row[4])) for row in rows]


def _fetch(connection: duckdb.DuckDBPyConnection, query: str, parameters: dict[str, object]) -> list[tuple]:
    try:
        return connection.execute(query, parameters).fetchall()
    except duckdb.CatalogException as exc:
        raise LakeError("the lake has no tables yet; run `lakehouse pipeline` first") from exc


def _us(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)
