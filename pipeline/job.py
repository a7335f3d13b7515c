"""The streaming job: Kafka -> bronze, quarantine, silver, gold, each micro-batch written exactly once.

One streaming query with `foreachBatch`. Every Delta write carries the query's stable app id and the batch id
(`txnAppId`/`txnVersion`), so a batch that Spark re-runs after a crash skips the writes that already committed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lake.maintenance import retry_on_conflict
from lake.settings import Settings
from lake.tables import LakePaths, Table
from pipeline import dedupe, kpi, offsets
from pipeline.errors import StreamStopped
from pipeline.parse import OUTPUT_DDL, PASSTHROUGH, Rules, arrow_parser

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger("lakehouse.pipeline")

QUERY_NAME = "ingest"
_TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
_TXN_VERSION = "spark.databricks.delta.write.txnVersion"


# Fault injection for the crash tests: LAKEHOUSE_TEST_CRASH_AFTER=<stage>:<batch id> kills the process group with
# SIGKILL right after that stage's Delta commit (bronze, quarantine, silver, gold), before Spark's checkpoint commit.
_CRASH_AFTER = os.environ.get("LAKEHOUSE_TEST_CRASH_AFTER", "")


def crash_point(stage: str, batch_id: int) -> None:
    if _CRASH_AFTER == f"{stage}:{batch_id}":
        log.warning("LAKEHOUSE_TEST_CRASH_AFTER=%s: killing the pipeline now", _CRASH_AFTER)
        # The whole group (Python and Spark's JVM) when the pipeline leads its own, as the crash tests start it.
        if os.getpgid(0) == os.getpid():
            os.killpg(0, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class BatchReport:
    batch_id: int
    records: int = 0
    readings: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage, in order


class _StageClock:
    """Records the seconds since the previous call under each stage's name."""

    def __init__(self, stages: dict[str, float]) -> None:
        self.stages = stages
        self.last = time.monotonic()

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.stages[name] = now - self.last
        self.last = now


@dataclass
class IngestJob:
    """State of one run: where to write and the app id read from the checkpoint."""

    spark: SparkSession
    settings: Settings
    paths: LakePaths
    app_id: str | None = None
    reports: list[BatchReport] = field(default_factory=list)
    offset_tracker: offsets.OffsetTracker = field(default_factory=offsets.OffsetTracker)

    def _app_id(self) -> str:
        # The checkpoint's `metadata` file holds the query id, which stays the same across restarts on the same
        # checkpoint and is new for a new checkpoint: exactly what Delta's idempotent writes need.
        if self.app_id is None:
            line = self.spark.read.text(self.paths.checkpoint(QUERY_NAME) + "/metadata").first()
            self.app_id = "kpi-lakehouse-" + json.loads(line[0])["id"]
        return self.app_id

    def _append(self, frame: DataFrame, table: Table, batch_id: int) -> None:
        writer = (
            frame.write.format("delta").mode("append").option("txnAppId", self._app_id()).option("txnVersion", batch_id)
        )
        # A concurrent `lakehouse maintain` may conflict; the write is idempotent, so it is simply tried again.
        retry_on_conflict(lambda: writer.save(self.paths.table(table)), f"append to {table.value}")

    def _merge(self, batch_id: int | None, table: Table, run_merge: Callable[[], object]) -> None:
        if batch_id is None:  # not a micro-batch (replay): the MERGE itself is idempotent
            retry_on_conflict(run_merge, f"MERGE into {table.value}")
            return
        conf = self.spark.conf
        conf.set(_TXN_APP_ID, self._app_id())
        conf.set(_TXN_VERSION, str(batch_id))
        try:
            retry_on_conflict(run_merge, f"MERGE into {table.value}")
        finally:
            conf.unset(_TXN_APP_ID)
            conf.unset(_TXN_VERSION)

    def process_batch(self, records: DataFrame, batch_id: int) -> None:
        from pyspark import StorageLevel
        from pyspark.sql import functions as F

        started = time.monotonic()
        report = BatchReport(batch_id)
        stage = _StageClock(report.stages)
        # Kafka is read twice (bronze, then the parser): a cache of the records would hold a partition's 5 MiB
        # messages in one columnar batch of up to 10,000 rows, which ran a 2 GiB driver out of heap.
        self._append(records.withColumn("ingested_at", F.current_timestamp()), Table.BRONZE, batch_id)
        stage("bronze")
        crash_point("bronze", batch_id)

        parsed = records.select(*PASSTHROUGH, "value").mapInArrow(arrow_parser(Rules.from_settings(self.settings)), OUTPUT_DDL)
        parsed = parsed.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            counts = parsed.agg(
                # Each record yields exactly one row with index 0 or a message-level row (index null).
                F.count_if(F.coalesce(F.col("reading_index"), F.lit(0)) == 0).alias("records"),
                F.count("device_id").alias("readings"),
                F.count("reason_code").alias("quarantined"),
                F.min(F.unix_micros("timestamp")).alias("lo"),
                F.max(F.unix_micros("timestamp")).alias("hi"),
            ).first()
            report.records, report.readings, report.quarantined = counts["records"], counts["readings"], counts["quarantined"]
            stage("parse")
            bad = parsed.where("reason_code IS NOT NULL").select(
                "topic", "partition", "offset", "reading_index", "reason_code", "reason", "raw", "kafka_timestamp",
            )  # fmt: skip
            gaps = self._lost_offsets(parsed)
            if gaps:
                report.quarantined += len(gaps)
                rows = [(g.topic, g.partition, g.first_lost, None, offsets.REASON_CODE, g.reason, None, None) for g in gaps]
                bad = bad.unionByName(self.spark.createDataFrame(rows, bad.schema))
            if report.quarantined:
                self._append(bad.withColumn("quarantined_at", F.current_timestamp()), Table.QUARANTINE, batch_id)
                stage("quarantine")
            crash_point("quarantine", batch_id)
            if report.readings:
                # Literal bounds (not a join-only condition) let Delta skip files outside the batch's time range.
                lo, hi = f"timestamp_micros({counts['lo']})", f"timestamp_micros({counts['hi']})"
                readings = parsed.where("reason_code IS NULL").drop("reason_code", "reason", "raw")
                self.write_silver(readings, batch_id, lo, hi)
                stage("silver")
                crash_point("silver", batch_id)
                self.write_gold(readings, batch_id, lo, hi)
                stage("gold")
                crash_point("gold", batch_id)
        finally:
            parsed.unpersist()
        report.seconds = time.monotonic() - started
        self.reports.append(report)
        log.info(
            "batch %d: %d records, %d readings, %d quarantined, %.1f s (%s)",
            batch_id, report.records, report.readings, report.quarantined, report.seconds,
            ", ".join(f"{name} {seconds:.1f}" for name, seconds in report.stages.items()),
        )  # fmt: skip

    def _lost_offsets(self, parsed: DataFrame) -> list[offsets.Gap]:
        from pyspark.sql import functions as F

        if self.settings.fail_on_data_loss:
            return []  # Spark stops the query itself before a batch that skips offsets
        ranges = parsed.groupBy("topic", "partition").agg(F.min("offset").alias("first"), F.max("offset").alias("last"))
        gaps = self.offset_tracker.gaps(self.spark, self.paths.table(Table.BRONZE), ranges)
        for gap in gaps:
            log.warning("data loss: %s; recorded in quarantine as %s", gap.reason, offsets.REASON_CODE)
        return gaps

    def write_silver(self, readings: DataFrame, batch_id: int | None, lo: str, hi: str) -> None:
        """MERGE readings into silver: new identities inserted, corrections from later records applied."""
        from delta.tables import DeltaTable

        latest = dedupe.latest_per_identity(readings)
        silver = DeltaTable.forPath(self.spark, self.paths.table(Table.SILVER))
        merge = (
            silver.alias("t")
            .merge(latest.alias("s"), dedupe.merge_condition(lo, hi))
            .whenMatchedUpdateAll(condition=dedupe.newer_and_different())
            .whenNotMatchedInsertAll()
        )
        self._merge(batch_id, Table.SILVER, merge.execute)

    def write_gold(self, readings: DataFrame, batch_id: int | None, lo: str, hi: str) -> None:
        """Recompute from silver the KPIs of the seconds these readings touch, and MERGE them into gold."""
        from delta.tables import DeltaTable
        from pyspark.sql import functions as F

        seconds = readings.select(F.date_trunc("second", "timestamp").alias("second")).distinct()
        silver = self.spark.read.format("delta").load(self.paths.table(Table.SILVER))
        # MERGE reads its source more than once; compute the touched seconds' KPIs once (one row per second).
        fresh = kpi.kpis_for_seconds(silver, seconds, lo, hi).localCheckpoint(eager=True)
        gold = DeltaTable.forPath(self.spark, self.paths.table(Table.GOLD))
        merge = (
            gold.alias("t")
            .merge(fresh.alias("s"), kpi.gold_merge_condition(lo, hi))
            .whenMatchedUpdateAll(condition=kpi.GOLD_CHANGED)
            .whenNotMatchedInsertAll()
        )
        self._merge(batch_id, Table.GOLD, merge.execute)


def run(settings: Settings, available_now: bool = False, spark: SparkSession | None = None) -> list[BatchReport]:
    """Run the ingest query until it is stopped (or, with `available_now`, until Kafka's backlog is processed)."""
    from pyspark.errors import StreamingQueryException

    from pipeline.delta_tables import create_tables
    from pipeline.source import read_kafka
    from pipeline.spark import build_session

    spark = spark or build_session(settings)
    paths = LakePaths.from_settings(settings)
    create_tables(spark, paths)
    job = IngestJob(spark, settings, paths)
    writer = (
        read_kafka(spark, settings)
        .writeStream.queryName(QUERY_NAME)
        .option("checkpointLocation", paths.checkpoint(QUERY_NAME))
        .foreachBatch(job.process_batch)
    )
    writer = writer.trigger(availableNow=True) if available_now else writer.trigger(processingTime=settings.trigger_interval)
    query = writer.start()
    try:
        query.awaitTermination()
    except KeyboardInterrupt:
        query.stop()
    except StreamingQueryException as exc:
        # Spark's message carries the whole plan; the first lines say what failed.
        summary = "\n".join(str(exc).splitlines()[:12])
        if "data may have been lost" in str(exc).lower() or "data loss" in str(exc).lower():
            raise StreamStopped(
                f"Kafka no longer holds offsets the pipeline had not read (retention deleted them):\n{summary}\n"
                "To go on past the gap, run with --no-fail-on-data-loss (LAKEHOUSE_FAIL_ON_DATA_LOSS=false); "
                f"each gap is then recorded in quarantine with reason_code '{offsets.REASON_CODE}'."
            ) from exc
        raise StreamStopped(f"the ingest query stopped: {summary}\nthe checkpoint is intact; fix the cause and run again") from exc
    return job.reports
