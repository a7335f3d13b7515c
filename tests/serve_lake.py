"""A small lake for the API tests: silver readings of several metrics made up here, gold computed from them by
tests.reference and the rollups by the pipeline's rollup functions, all written as the pipeline's Delta tables with
the project's Spark session; or, for the upgrade at the API's start, the same tables as written before metrics."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from bench.processes import free_port, wait_for_http
from lake.settings import Settings
from lake.tables import DEFAULT_METRIC, SCHEMAS, LakePaths, Table
from tests.conftest import HOME
from tests.reference import Reference

START = datetime(2024, 7, 30, 12, 0, 0, tzinfo=UTC)
DEVICES = ("meter-3", "pump-1", "pump-2")
# The metrics of the test lakes, each with the range of its values: the tutorial's bare `value`, and two named ones.
METRICS = {DEFAULT_METRIC: (-5.0, 120.0), "pressure_bar": (0.5, 4.0), "temperature_c": (-20.0, 45.0)}
# meter-3 measures no pressure: the metrics' device counts differ.
NOT_SENT = {("meter-3", "pressure_bar")}


class Reading(NamedTuple):
    device_id: str
    timestamp: datetime
    value: float
    metric: str = DEFAULT_METRIC


def make_readings(
    seed: int = 11, seconds: int = 150, stragglers: bool = True, metrics: tuple[str, ...] = tuple(METRICS)
) -> list[Reading]:
    """Readings over `seconds` seconds from START (fractional times): at each instant a device measures most of the
    `metrics` it sends, as a reading with several metrics does. With `stragglers`, a few of `value` an hour and a
    day later."""
    rng = random.Random(seed)
    found: dict[tuple[str, str, datetime], Reading] = {}
    for second in range(seconds):
        for device in DEVICES:
            for _ in range(rng.choice((0, 1, 1, 2, 3))):
                moment = START + timedelta(seconds=second, microseconds=rng.randrange(1_000_000))
                for metric in metrics:
                    if (device, metric) not in NOT_SENT and (metric == metrics[0] or rng.random() < 0.8):
                        low, high = METRICS.get(metric, (-5.0, 120.0))
                        found[(device, metric, moment)] = Reading(
                            device, moment, round(rng.uniform(low, high), 4), metric
                        )
    later = (timedelta(hours=1, seconds=5), timedelta(hours=1, seconds=5, milliseconds=1), timedelta(days=1))
    for offset in later if stragglers else ():
        found[("pump-1", metrics[0], START + offset)] = Reading("pump-1", START + offset, 7.25, metrics[0])
    return list(found.values())


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# The column each table gained with metrics (the last of silver, gold and the rollups): a lake written before
# metrics has the same tables without it.
_METRIC_COLUMN = ", metric STRING"
_BEFORE_METRICS = (Table.SILVER, Table.GOLD, Table.ROLLUPS)


class LakeWriter:
    """Writes silver rows and the gold rows of the (metric, second)s they touch, as the pipeline's tables hold them;
    with `before_metrics`, as a release before metrics wrote them (no `metric` column; every reading is `value`)."""

    def __init__(self, spark, paths: LakePaths, before_metrics: bool = False) -> None:  # type: ignore[no-untyped-def]
        from pipeline.stream.tables import create_tables

        self.spark = spark
        self.paths = paths
        self.offset = 0
        self.before_metrics = before_metrics
        if before_metrics:
            self._create_tables_before_metrics()
        else:
            create_tables(spark, paths)

    def _schema(self, table: Table) -> str:
        ddl = SCHEMAS[table]
        if self.before_metrics:
            assert ddl.endswith(_METRIC_COLUMN), f"{table.value}'s metric column is no longer its last"
            return ddl.removesuffix(_METRIC_COLUMN)
        return ddl

    def _create_tables_before_metrics(self) -> None:
        from delta.tables import DeltaTable
        from pyspark.sql.types import StructType

        for table in _BEFORE_METRICS:
            builder = DeltaTable.createIfNotExists(self.spark).location(self.paths.table(table))
            builder = builder.addColumns(StructType.fromDDL(self._schema(table)))
            if table is Table.ROLLUPS:
                builder = builder.partitionedBy("grain")
            builder.execute()

    def _frame(self, table: Table, rows: list[tuple]):  # type: ignore[no-untyped-def]
        from pyspark.sql.types import StructType

        if self.before_metrics:
            rows = [row[:-1] for row in rows]
        return self.spark.createDataFrame(rows, schema=StructType.fromDDL(self._schema(table)))

    def _on(self, condition: str, alias: str) -> str:
        """A MERGE's key condition, with the metric's when the tables have it."""
        return condition if self.before_metrics else f"{condition} AND {alias}.metric = u.metric"

    def append(self, readings: list[Reading], all_readings: list[Reading]) -> None:
        """Append `readings` to silver and upsert gold's (metric, second)s they touch (computed over
        `all_readings`)."""
        from delta.tables import DeltaTable

        assert not self.before_metrics or {r.metric for r in all_readings} <= {DEFAULT_METRIC}
        now = datetime.now(UTC)
        # Silver's columns: the reading, where it came from (topic, partition, offset, index), its Kafka time,
        # updated_at, arrival_watermark and its metric.
        silver_rows = [
            (r.device_id, r.timestamp, r.value, "device-data", 0, self.offset + i, 0, r.timestamp, now, None, r.metric)
            for i, r in enumerate(readings)
        ]
        self.offset += len(readings)
        # Merged on the reading's identity, as the pipeline does: sending a reading again with another value corrects
        # it in place.
        silver = DeltaTable.forPath(self.spark, self.paths.table(Table.SILVER))
        (
            silver.alias("s")
            .merge(
                self._frame(Table.SILVER, silver_rows).alias("u"),
                self._on("s.device_id = u.device_id AND s.`timestamp` = u.`timestamp`", "s"),
            )
            .whenMatchedUpdateAll()
            .whenNotMatchedInsertAll()
            .execute()
        )
        reference = Reference.of(all_readings)
        gold_rows = []
        for metric, second in sorted({(r.metric, r.timestamp.replace(microsecond=0)) for r in readings}):
            kpis = reference.buckets("second", metric=metric)[second]
            # No fingerprint: a test lake's gold is what the reference computes, not a recompute.
            gold_rows.append((second, *kpis.values(), now, None, 0, 0, metric))
        updates = self._frame(Table.GOLD, gold_rows)
        gold = DeltaTable.forPath(self.spark, self.paths.table(Table.GOLD))
        (
            gold.alias("g")
            .merge(updates.alias("u"), self._on("g.`timestamp` = u.`timestamp`", "g"))
            .whenMatchedUpdateAll()
            .whenNotMatchedInsertAll()
            .execute()
        )
        self.write_rollups()

    def write_rollups(self) -> None:
        """Upsert every rollup row of silver as it now is, computed by the pipeline's own rollup functions."""
        from delta.tables import DeltaTable
        from pyspark.sql import functions as F

        from pipeline.stream.rollups import from_readings

        silver = self.spark.read.format("delta").load(self.paths.table(Table.SILVER))
        if self.before_metrics:
            silver = silver.withColumn("metric", F.lit(DEFAULT_METRIC))
        rows = from_readings(silver.select("device_id", "metric", "timestamp", "value", "arrival_watermark"))
        if self.before_metrics:
            rows = rows.drop("metric")
        rollups = DeltaTable.forPath(self.spark, self.paths.table(Table.ROLLUPS))
        (
            rollups.alias("r")
            .merge(
                rows.alias("u"),
                self._on("r.grain = u.grain AND r.device_id <=> u.device_id AND r.`timestamp` = u.`timestamp`", "r"),
            )
            .whenMatchedUpdateAll()
            .whenNotMatchedInsertAll()
            .execute()
        )

    def write_checkpoint(self, batch_id: int, next_offsets: dict[int, int], topic: str = "device-data") -> None:
        """The files Spark's streaming checkpoint keeps for a committed micro-batch."""
        folder = Path(self.paths.checkpoint("ingest"))
        (folder / "offsets").mkdir(parents=True, exist_ok=True)
        (folder / "commits").mkdir(parents=True, exist_ok=True)
        metadata = {"batchWatermarkMs": 0, "batchTimestampMs": int(time.time() * 1000), "conf": {}}
        offsets = {topic: {str(p): o for p, o in next_offsets.items()}}
        (folder / "offsets" / str(batch_id)).write_text(f"v1\n{json.dumps(metadata)}\n{json.dumps(offsets)}")
        (folder / "commits" / str(batch_id)).write_text('v1\n{"nextBatchWatermarkMs":0}')


def api_settings(lake_root: Path | str, **overrides: object) -> Settings:
    """Settings of an API under test: its own lake, a fast refresh, and a Kafka address where nothing listens."""
    values: dict[str, object] = {
        "lake_root": str(lake_root),
        "home": HOME,
        "kafka_bootstrap": f"127.0.0.1:{free_port()}",
        "api_refresh_seconds": 0.2,
        "api_kafka_timeout_seconds": 0.5,
    }
    if "://" not in str(lake_root).removeprefix("file://"):
        # The store beside the lake, so that each test lake has store files of its own.
        values["api_store_dir"] = Path(str(lake_root).removeprefix("file://")).parent / "api-store"
    values.update(overrides)
    return Settings(**values)


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The API under uvicorn on a free loopback port, in this process; yields its base URL."""
    from serve.app import create_app

    with serving_app(create_app(settings), probe="/health") as base:
        yield base


@contextmanager
def serving_app(app, probe: str = "/schema/openapi.json") -> Iterator[str]:  # type: ignore[no-untyped-def]
    """An ASGI app under uvicorn on a free loopback port, in this process; yields its base URL once `probe` answers."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    assert wait_for_http(f"{base}{probe}", 30, alive=thread.is_alive), "the API did not start"
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
