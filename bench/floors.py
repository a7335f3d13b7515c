"""The floors of `lakehouse bench`: the same engine, with the same session settings, doing the bare minimum.

- freshness: a Kafka -> Delta append stream, one commit per micro-batch, at the pipeline's trigger; run as its own
  process (`python -m bench.floors`), as the pipeline is. `CommitWatcher` sees its commits by listing the table's
  log, so the probe costs next to nothing on a machine whose cores Spark needs.
- ingest: Kafka's records appended raw to a Delta table, then parsed with `from_json` + `explode` and appended to
  another, one after the other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lake.settings import Settings, join_path

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

FLOOR_TABLE = "floor"


def freshness_stream(settings: Settings) -> None:
    """Append Kafka's records to the `floor` table of the lake until stopped."""
    from pipeline.stream.source import read_kafka
    from pipeline.stream.spark import build_session

    spark = build_session(settings, app_name="kpi-lakehouse-floor")
    root = settings.lake_root
    query = (
        read_kafka(spark, settings)
        .writeStream.format("delta")
        .option("checkpointLocation", join_path(root, "_checkpoints", FLOOR_TABLE))
        .trigger(processingTime=settings.trigger_interval)
        .start(join_path(root, FLOOR_TABLE))
    )
    query.awaitTermination()


class CommitWatcher:
    """The values of the records each new commit of a Delta table (on a local disk) made visible."""

    def __init__(self, table: Path) -> None:
        self.log = table / "_delta_log"
        self.table = table
        self.seen: set[str] = set()

    def new_values(self) -> Iterator[bytes]:
        import pyarrow.parquet as pq

        if not self.log.is_dir():
            return
        for name in sorted({p.name for p in self.log.glob("*.json")} - self.seen):
            self.seen.add(name)
            for line in (self.log / name).read_text().splitlines():
                add = json.loads(line).get("add")
                if add is not None:
                    yield from pq.read_table(self.table / add["path"], columns=["value"]).column(0).to_pylist()


@dataclass
class IngestFloor:
    raw_seconds: float
    parsed_seconds: float
    readings: int

    @property
    def seconds(self) -> float:
        return self.raw_seconds + self.parsed_seconds


def ingest_floor(spark: SparkSession, settings: Settings, folder: Path) -> IngestFloor:
    """Time the raw append, then the `from_json` + `explode` append, of every record in the settings' topic."""
    from pyspark.sql import functions as F

    from lake.kafka import java_properties

    reader = spark.read.format("kafka")
    for key, value in java_properties(settings).items():
        reader = reader.option(f"kafka.{key}", value)
    records = (
        reader.option("kafka.bootstrap.servers", settings.kafka_bootstrap)
        .option("subscribe", settings.topic)
        .option("kafka.max.partition.fetch.bytes", str(settings.kafka_limit_bytes))
        .load()
    )
    started = time.perf_counter()
    records.write.format("delta").save(str(folder / "raw"))
    raw = time.perf_counter() - started

    schema = "device_id STRING, readings ARRAY<STRUCT<timestamp: STRING, value: DOUBLE>>"
    readings = (
        records.select(F.from_json(F.col("value").cast("string"), schema).alias("m"))
        .select("m.device_id", F.explode("m.readings").alias("r"))
        .select("device_id", F.to_timestamp("r.timestamp").alias("timestamp"), F.col("r.value").alias("value"))
    )
    started = time.perf_counter()
    readings.write.format("delta").save(str(folder / "parsed"))
    parsed = time.perf_counter() - started
    count = spark.read.format("delta").load(str(folder / "parsed")).count()
    return IngestFloor(raw, parsed, count)


if __name__ == "__main__":
    freshness_stream(Settings())
