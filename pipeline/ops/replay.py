"""Re-evaluates quarantined messages and readings with the current rules: what is now valid moves into silver,
gold and the rollups, what is still invalid stays with its reason brought up to date.

The original bytes come from bronze (quarantine's `raw` of an unreadable message is not always the bytes Kafka
held). Rows whose record bronze no longer holds (retention removed it, lake.retention) are left as they are and
named in the report: without the bytes they can be neither read again nor told valid. Writes go silver, gold,
rollups, then quarantine, each an idempotent MERGE: a replay stopped at any point and run again, or run twice, ends
in the same tables as one complete run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from lake.conflicts import retry_on_conflict
from lake.retention import retention_state
from lake.rows import first_row
from lake.settings import Settings
from lake.tables import LakePaths, Table
from pipeline.stream import names
from pipeline.stream.crash import crash_point
from pipeline.stream.offsets import REASON_CODE as OFFSETS_LOST
from pipeline.stream.parse import NOT_READING_COLUMNS, OUTPUT_DDL, PASSTHROUGH, Reason, Rules, arrow_parser
from pipeline.stream.writes import LakeWriter

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger("lakehouse.replay")

RECORD = ("topic", "partition", "offset")


@dataclass(frozen=True)
class MissingRecords:
    """Selected quarantine rows of one partition whose records bronze no longer holds."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    records: int
    quarantine_rows: int
    removed_by_retention: bool  # every one is at or below the partition's retention line

    def describe(self) -> str:
        why = (
            "removed from bronze by retention (LAKEHOUSE_BRONZE_RETENTION)"
            if self.removed_by_retention
            else "not in bronze"
        )
        return (
            f"{self.topic} partition {self.partition} offsets {self.first_offset}..{self.last_offset} "
            f"({self.records} records, {self.quarantine_rows} quarantine rows): {why}"
        )


@dataclass
class ReplayReport:
    quarantined_rows: int = 0  # rows selected for replay
    records: int = 0  # Kafka records they come from
    readings_accepted: int = 0  # now valid, merged into silver
    still_invalid: int = 0  # quarantine rows after the replay for those records
    reasons_changed: int = 0
    missing: list[MissingRecords] = field(default_factory=list)  # selected, not replayed: their bytes are gone

    @property
    def missing_rows(self) -> int:
        return sum(m.quarantine_rows for m in self.missing)

    def missing_message(self) -> str:
        """What replay could not do and why, for the operator; empty when it could do everything asked."""
        if not self.missing:
            return ""
        return (
            f"{self.missing_rows:,} of the {self.quarantined_rows:,} selected quarantine rows cannot be replayed: "
            "the raw messages they need are no longer in bronze, so they stay in quarantine as they are ("
            + "; ".join(m.describe() for m in self.missing)
            + "). The other rows were replayed; the readings these records held that were valid stay in silver."
        )


def _selected(spark: SparkSession, paths: LakePaths, reason: str | None, since: datetime | None) -> DataFrame:
    from pyspark.sql import functions as F

    rows = spark.read.format("delta").load(paths.table(Table.QUARANTINE)).where(F.col("reason_code") != OFFSETS_LOST)
    if reason is not None:
        rows = rows.where(F.col("reason_code") == reason)
    if since is not None:
        rows = rows.where(F.col("quarantined_at") >= F.lit(since))
    return rows.select(*RECORD, "reading_index", "metric", "reason_code", "reason")


def _missing_records(paths: LakePaths, targets: DataFrame, bronze: DataFrame) -> list[MissingRecords]:
    """The selected rows' records that bronze lacks, per partition, and whether retention removed them."""
    from pyspark.sql import functions as F

    absent = targets.join(bronze.select(*RECORD), list(RECORD), "left_anti")
    per_partition = (
        absent.groupBy("topic", "partition")
        .agg(
            F.min("offset").alias("first"),
            F.max("offset").alias("last"),
            F.countDistinct("offset").alias("records"),
            F.count("*").alias("rows"),
        )
        .orderBy("topic", "partition")
        .collect()
    )
    if not per_partition:
        return []
    retained = retention_state(paths, Table.BRONZE)
    return [
        MissingRecords(
            row.topic,
            row.partition,
            row.first,
            row.last,
            row.records,
            row.rows,
            row.last <= retained.through(row.topic, row.partition),
        )
        for row in per_partition
    ]


def replay(
    settings: Settings,
    reason: str | None = None,
    since: datetime | None = None,
    spark: SparkSession | None = None,
) -> ReplayReport:
    """Replay the quarantine rows with this reason code (all but lost offsets when None) quarantined since `since`."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from pipeline.stream.spark import build_session
    from pipeline.stream.tables import create_tables

    if reason is not None and reason not in {r.value for r in Reason}:
        raise ValueError(f"unknown reason code {reason!r}; known: {', '.join(r.value for r in Reason)}")
    spark = spark or build_session(settings, app_name="kpi-lakehouse-replay")
    paths = LakePaths.from_settings(settings)
    create_tables(spark, paths, settings.delta_checkpoint_interval)
    report = ReplayReport()

    # Fixed before any write: the quarantine table changes below.
    targets = _selected(spark, paths, reason, since).localCheckpoint(eager=True)
    report.quarantined_rows = targets.count()
    if not report.quarantined_rows:
        return report
    bronze = spark.read.format("delta").load(paths.table(Table.BRONZE))
    # A row whose record is gone would otherwise read as "nothing invalid any more" and be deleted below.
    report.missing = _missing_records(paths, targets, bronze)
    if report.missing:
        log.warning("replay: %s", report.missing_message())
        targets = targets.join(bronze.select(*RECORD), list(RECORD), "left_semi").localCheckpoint(eager=True)
    records = targets.select(*RECORD).distinct()
    report.records = records.count()
    if not report.records:
        return report
    reparsed = (
        bronze.join(records, list(RECORD), "left_semi")
        .select(*PASSTHROUGH, "value")
        .mapInArrow(arrow_parser(Rules.from_settings(settings)), OUTPUT_DDL)
    )
    # A message-level row stands for every entry of its record; a reading's row for the entry at its index; a
    # metric's row for that metric of the reading.
    t, r = targets.alias("t"), reparsed.alias("r")
    on_record = [F.col(f"t.{c}") == F.col(f"r.{c}") for c in RECORD]
    at_index = (
        F.col("t.reading_index").isNull()
        | F.col("r.reading_index").isNull()  # the message as a whole is now unreadable
        | (
            (F.col("t.reading_index") == F.col("r.reading_index"))
            & (F.col("t.metric").isNull() | F.col("r.metric").isNull() | (F.col("t.metric") == F.col("r.metric")))
        )
    )
    fresh = r.join(t, [*on_record, at_index], "left_semi")
    # The lake's limit on metric names holds for replayed readings as for the stream's.
    known = names.KnownMetrics(spark, paths, settings.max_metrics)
    listed = fresh.where("reason_code IS NULL").select("metric").distinct().limit(settings.max_metrics + 1)
    admission = known.admit([row[0] for row in listed.collect()], fresh.where("reason_code IS NULL"))
    if admission.allowed is not None:
        fresh = names.refuse(fresh, admission.allowed, settings.max_metrics)
    fresh = fresh.localCheckpoint(eager=True)
    if admission.admitted:
        known.record(admission.admitted).write.format("delta").mode("append").save(paths.table(Table.METRICS))

    writer = LakeWriter(spark, paths)
    readings = fresh.where("reason_code IS NULL").drop(*NOT_READING_COLUMNS)
    bounds = first_row(
        readings.agg(F.count("*"), F.min(F.unix_micros("timestamp")), F.max(F.unix_micros("timestamp"))),
        "the replayed readings' bounds",
    )
    report.readings_accepted = bounds[0]
    if report.readings_accepted:
        lo, hi = f"timestamp_micros({bounds[1]})", f"timestamp_micros({bounds[2]})"
        # Readings made valid now arrive now: late for every bucket that is final. Gold's commits here record no
        # watermark: only the stream's do, so that the newest entry is the greatest even when this commit lands
        # after a newer stream batch's, and a batch the stream runs again after a crash still finds its own.
        arrival = writer.recorded_watermark().watermark_us
        writer.readings(
            readings,
            report.readings_accepted,
            lo,
            hi,
            None,
            lambda stage: crash_point(f"replay_{stage}", 0),
            None,
            arrival,
        )
        writer.rollups(readings, lo, hi)
        crash_point("replay_rollups", 0)

    # Each target row keeps its new reason or, now valid, is deleted; a message-level row whose message now reads
    # gives way to its invalid readings' own rows.
    still_bad = fresh.where("reason_code IS NOT NULL").select(
        *RECORD, "reading_index", "metric", "reason_code", "reason", "raw", "kafka_timestamp"
    )
    b = still_bad.alias("b")
    same_key = [F.col(f"t.{c}") == F.col(f"b.{c}") for c in RECORD] + [
        F.col(f"t.{c}").eqNullSafe(F.col(f"b.{c}")) for c in ("reading_index", "metric")
    ]
    kept_or_dropped = t.join(b, same_key, "left").select(
        *[F.col(f"t.{c}").alias(c) for c in (*RECORD, "reading_index", "metric")],
        F.col("b.reason_code").alias("new_reason_code"),
        F.col("b.reason").alias("new_reason"),
        F.col("b.raw").alias("raw"),
        F.col("b.kafka_timestamp").alias("kafka_timestamp"),
    )
    added = b.join(t, same_key, "left_anti").select(
        *RECORD,
        "reading_index",
        "metric",
        F.col("reason_code").alias("new_reason_code"),
        F.col("reason").alias("new_reason"),
        "raw",
        "kafka_timestamp",
    )
    changes = kept_or_dropped.unionByName(added).localCheckpoint(eager=True)
    report.still_invalid = changes.where("new_reason_code IS NOT NULL").count()
    report.reasons_changed = (
        changes.alias("c")
        .join(
            t,
            [F.col(f"c.{c}") == F.col(f"t.{c}") for c in RECORD]
            + [F.col(f"c.{c}").eqNullSafe(F.col(f"t.{c}")) for c in ("reading_index", "metric")],
        )
        .where("c.new_reason_code IS NOT NULL AND (c.new_reason_code <> t.reason_code OR c.new_reason <> t.reason)")
        .count()
    )
    quarantine = DeltaTable.forPath(spark, paths.table(Table.QUARANTINE))
    merge = (
        quarantine.alias("q")
        .merge(
            changes.alias("c"),
            "q.topic = c.topic AND q.`partition` = c.`partition` AND q.`offset` = c.`offset` "
            "AND q.reading_index <=> c.reading_index AND q.metric <=> c.metric "
            f"AND q.reason_code <> '{OFFSETS_LOST}'",
        )
        .whenMatchedDelete(condition="c.new_reason_code IS NULL")
        .whenMatchedUpdate(
            condition="q.reason_code <> c.new_reason_code OR q.reason <> c.new_reason",
            set={"reason_code": "c.new_reason_code", "reason": "c.new_reason"},
        )
        .whenNotMatchedInsert(
            condition="c.new_reason_code IS NOT NULL",
            values={
                **{c: f"c.`{c}`" for c in (*RECORD, "reading_index", "metric", "raw", "kafka_timestamp")},
                "reason_code": "c.new_reason_code",
                "reason": "c.new_reason",
                "quarantined_at": "current_timestamp()",
            },
        )
    )
    retry_on_conflict(merge.execute, "MERGE into quarantine")
    log.info(
        "replay: %d quarantine rows from %d records; %d readings now valid, %d rows still invalid (%d new reasons)",
        report.quarantined_rows,
        report.records,
        report.readings_accepted,
        report.still_invalid,
        report.reasons_changed,
    )
    return report
