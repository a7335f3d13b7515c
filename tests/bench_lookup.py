"""Lookup latency of GET /kpis/{timestamp} with and without the snapshot cache, over a gold table of many seconds.

    .venv/bin/python -m tests.bench_lookup --seconds 300000 --lookups 2000

Builds a lake with the project's Spark session (one reading of metric `value` per device per second, two devices),
then times random second lookups three ways: the query a request ran before the cache (DuckDB views over delta_scan, which replay
the Delta log and open the files on every query), the same lookup on the serving store, and the whole HTTP
request under uvicorn, both for `serve.app` (serving store) and for a minimal app whose handler runs the query
the way the API did before the cache.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import duckdb
import httpx

from lake import duck
from lake.settings import Settings
from lake.tables import DEFAULT_METRIC, LakePaths, Table
from lake.timestamps import Grain, from_us, parse_timestamp_us
from serve import queries
from serve.snapshot import SnapshotStore
from tests.conftest import HOME
from tests.serve_lake import START, api_settings, iso, serving, serving_app


def build_lake(root: Path, seconds: int) -> None:
    from pipeline.stream.spark import build_session
    from pipeline.stream.tables import create_tables

    spark = build_session(Settings(home=HOME, spark_master="local[2]", shuffle_partitions=2), app_name="bench-lookup")
    paths = LakePaths.from_settings(Settings(lake_root=str(root)))
    create_tables(spark, paths)
    start = int(START.timestamp())
    silver = spark.range(seconds * 2).selectExpr(
        "IF(id % 2 = 0, 'pump-1', 'pump-2') AS device_id",
        f"timestamp_micros(({start} + id DIV 2) * 1000000 + (id % 2) * 250000) AS `timestamp`",
        "CAST(id % 97 AS DOUBLE) AS value",
        "'device-data' AS topic",
        "0 AS `partition`",
        "id AS `offset`",
        "0 AS reading_index",
        "CAST(NULL AS TIMESTAMP) AS kafka_timestamp",
        "current_timestamp() AS updated_at",
        "CAST(NULL AS TIMESTAMP) AS arrival_watermark",
        f"'{DEFAULT_METRIC}' AS metric",
    )
    silver.write.format("delta").mode("append").save(paths.table(Table.SILVER))
    spark.read.format("delta").load(paths.table(Table.SILVER)).createOrReplaceTempView("silver")
    spark.sql(
        "SELECT timestamp_seconds(CAST(unix_micros(`timestamp`) DIV 1000000 AS BIGINT)) AS `timestamp`, "
        "count(*) AS reading_count, count(DISTINCT device_id) AS device_count, avg(value) AS average_value, "
        "min(value) AS min_value, max(value) AS max_value, sum(value) AS sum_value, stddev_samp(value) AS stddev_value, "
        "current_timestamp() AS updated_at, metric FROM silver GROUP BY 1, metric"
    ).write.format("delta").mode("append").save(paths.table(Table.GOLD))
    spark.stop()


def uncached_app(paths: LakePaths):  # type: ignore[no-untyped-def]
    """GET /kpis/{timestamp} as it ran before the snapshot cache: a cursor on DuckDB views over delta_scan."""
    from litestar import Litestar, get
    from litestar.exceptions import NotFoundException

    views = duck.connect(paths)

    @get("/kpis/{timestamp:str}", sync_to_thread=True)
    def lookup(timestamp: str) -> dict:
        found = _uncached_kpis(views.cursor(), timestamp)
        if found is None:
            raise NotFoundException()
        return {"reading_count": found[0]}

    return Litestar([lookup])


def _uncached_kpis(cursor: duckdb.DuckDBPyConnection, instant: str) -> tuple | None:
    """Gold's row of `value` in the second that holds the instant, through a view over delta_scan."""
    second = from_us(Grain.SECOND.bucket_start_us(parse_timestamp_us(instant)))
    query = 'SELECT reading_count FROM gold WHERE metric = $metric AND "timestamp" = $t'
    return cursor.execute(query, {"t": second, "metric": DEFAULT_METRIC}).fetchone()


def timed(lookup: Callable[[str], object], instants: list[str]) -> tuple[float, float]:
    for instant in instants[:50]:  # warm-up
        lookup(instant)
    took = []
    for instant in instants:
        began = time.perf_counter()
        lookup(instant)
        took.append((time.perf_counter() - began) * 1000)
    took.sort()
    return statistics.median(took), took[min(len(took) - 1, int(len(took) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=300_000, help="seconds (gold rows) in the lake")
    parser.add_argument("--lookups", type=int, default=2000, help="timed lookups per way")
    parser.add_argument("--lake", type=Path, help="reuse (or build) the lake here instead of a temporary folder")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the figures
    logging.getLogger("kpi_lakehouse.serve").disabled = True
    root = args.lake or Path(tempfile.mkdtemp(prefix="bench-lookup-")) / "lake"
    if not (root / "gold" / "_delta_log").is_dir():
        began = time.perf_counter()
        build_lake(root, args.seconds)
        print(f"built a lake of {args.seconds:,} seconds at {root} in {time.perf_counter() - began:.0f} s")
    rng = random.Random(1)
    instants = [iso(START + timedelta(seconds=rng.randrange(args.seconds))) for _ in range(args.lookups)]
    paths = LakePaths.from_settings(Settings(lake_root=str(root)))

    views = duck.connect(paths)
    uncached = timed(lambda t: _uncached_kpis(views.cursor(), t), instants)

    store = SnapshotStore.from_settings(api_settings(root))
    loaded = store.refresh()
    store.wait_built()

    def from_snapshot(instant: str) -> object:
        with store.read() as (snapshot, cursor):
            return queries.kpis(queries.Source(cursor, snapshot, store.locations), parse_timestamp_us(instant))

    cached = timed(from_snapshot, instants)
    with serving(api_settings(root)) as base, httpx.Client(base_url=base) as client:
        over_http = timed(lambda t: client.get(f"/kpis/{t}").raise_for_status(), instants)
    with serving_app(uncached_app(paths)) as base, httpx.Client(base_url=base) as client:
        over_http_uncached = timed(lambda t: client.get(f"/kpis/{t}").raise_for_status(), instants)
    print(f"snapshot load of {loaded.rows} rows: {loaded.seconds:.2f} s")
    print(f"{'way':<52} {'median ms':>10} {'p99 ms':>10}")
    for name, (median, p99) in [
        ("lookup query, no cache (views over delta_scan)", uncached),
        ("lookup query, snapshot cache", cached),
        ("GET /kpis/{timestamp} over HTTP, no cache", over_http_uncached),
        ("GET /kpis/{timestamp} over HTTP, snapshot cache", over_http),
    ]:
        print(f"{name:<52} {median:>10.3f} {p99:>10.3f}")


if __name__ == "__main__":
    main()
