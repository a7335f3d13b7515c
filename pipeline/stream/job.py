"""The streaming job: Kafka -> bronze, quarantine, silver, gold, each micro-batch written exactly once; and beside
it silver's new commits -> rollups.

Two streaming queries with `foreachBatch`; `pipeline.stream.writes` makes each of their Delta writes exactly once.
The rollups query follows silver's Delta log, not Kafka, so that the ingest query's micro-batches (whose gold is
what freshness is measured on) never wait for the rollups: one rollups batch covers every ingest batch committed
since the previous one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import InitVar, asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lake import checkpoint, watermark
from lake.kafka import security_problem
from lake.kafka import watermarks as kafka_watermarks
from lake.rows import first_row
from lake.settings import Settings
from lake.tables import LakePaths, Table
from lake.upgrade import SILVER_METRIC
from lake.watermark import Watermark
from pipeline.errors import StreamStopped
from pipeline.stream import names, offsets, rollups
from pipeline.stream.crash import crash_point
from pipeline.stream.parse import NOT_READING_COLUMNS, OUTPUT_DDL, PASSTHROUGH, Rules, arrow_parser
from pipeline.stream.spark import SMALL_BATCH_ROWS, BatchFit
from pipeline.stream.writes import CLASSIFIED_SECONDS as SECONDS
from pipeline.stream.writes import LakeWriter

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, Row, SparkSession
    from pyspark.sql.streaming import StreamingQuery

log = logging.getLogger("lakehouse.pipeline")
# The scheduler pool of the Spark jobs a micro-batch starts (pipeline/jvm/fairscheduler.xml): a property of the
# thread that runs the batch, so it is set at each batch's start.
_POOL = "spark.scheduler.pool"


@dataclass
class BatchReport:
    batch_id: int
    records: int = 0
    readings: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage, in order
    finished_at: float = 0.0  # Unix time at the batch's end: with `seconds`, where it sits on a clock


class _StageClock:
    """Adds the seconds since the previous call to the stage's name (a stage may come twice: gold again after
    silver when another writer's commit to silver made the batch recompute it)."""

    def __init__(self, stages: dict[str, float]) -> None:
        self.stages = stages
        self.last = time.monotonic()

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.stages[name] = self.stages.get(name, 0.0) + now - self.last
        self.last = now


class _Beside:
    """A write run in a thread of its own beside the caller's; `wait()` joins it and raises what it raised. Its
    Spark jobs keep the batch's local properties (scheduler pool, query and batch ids), copied as pyspark's
    InheritableThread does."""

    def __init__(self, spark: SparkSession, write: Callable[[], None]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        context = spark.sparkContext._jsc.sc()  # type: ignore[union-attr]
        properties = context.getLocalProperties().clone()

        def run() -> None:
            context.setLocalProperties(properties)
            write()

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lakehouse-beside")
        self._done = self._pool.submit(run)

    def wait(self, raise_error: bool = True) -> None:
        error = self._done.exception()  # waits for the write to end
        self._pool.shutdown()
        if raise_error and error is not None:
            raise error


@dataclass
class IngestJob:
    """State of one run: where to write, and the reports of the batches so far (also appended to `report_file`
    as JSON lines, one per micro-batch, for `lakehouse bench` and operators)."""

    spark: SparkSession
    settings: Settings
    paths: LakePaths
    report_file: Path | None = None
    app_id: InitVar[str | None] = None  # the writes' txnAppId; read from the checkpoint when None
    reports: list[BatchReport] = field(default_factory=list)
    offset_tracker: offsets.OffsetTracker = field(default_factory=offsets.OffsetTracker)
    writer: LakeWriter = field(init=False)
    fit: BatchFit = field(init=False)
    known_metrics: names.KnownMetrics = field(init=False)
    mark: Watermark | None = None  # the watermark after the last batch with readings; read from gold at first
    checked_silver: bool = False  # whether silver's newest entry was looked at (`_first_run`)

    def __post_init__(self, app_id: str | None) -> None:
        self.writer = LakeWriter(self.spark, self.paths, app_id)
        self.fit = BatchFit.of(self.spark)
        self.known_metrics = names.KnownMetrics(self.spark, self.paths, self.settings.max_metrics)

    def _watermark(self) -> Watermark:
        if self.mark is None:
            self.mark = self.writer.recorded_watermark()
        return self.mark

    def process_batch(self, records: DataFrame, batch_id: int) -> None:
        from pyspark import StorageLevel
        from pyspark.sql import functions as F

        started = time.monotonic()
        self.spark.sparkContext.setLocalProperty(_POOL, checkpoint.INGEST_QUERY)
        report = BatchReport(batch_id)
        stage = _StageClock(report.stages)

        def committed(name: str) -> None:
            stage(name)
            crash_point(name, batch_id)

        # Gold and silver first: they are what answers wait for. Bronze follows, or, in a small batch, is written
        # beside them in a thread of its own, so that its commit (a Kafka read, a Parquet file, a log replay)
        # overlaps theirs instead of delaying the next batch; a large batch writes it after them, so that its
        # memory is not added to theirs. Each table's writes are idempotent on their own, so the order in which
        # they commit does not change what a batch run again after a crash ends with, and the batch ends (Spark
        # commits its offsets) only once every write has.
        # Kafka is read twice (the parser, then bronze): a cache of the records would hold a partition's 5 MiB
        # messages in one columnar batch of up to 10,000 rows, which ran a 2 GiB driver out of heap.
        def write_bronze() -> None:
            self.writer.append(records.withColumn("ingested_at", F.current_timestamp()), Table.BRONZE, batch_id)
            crash_point("bronze", batch_id)

        bronze: _Beside | None = None
        parsed = records.select(*PASSTHROUGH, "value").mapInArrow(
            arrow_parser(Rules.from_settings(self.settings)), OUTPUT_DDL
        )
        parsed = parsed.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            counts = _batch_counts(parsed, self.settings.max_metrics)
            admission = self.known_metrics.admit(counts["metrics"], parsed.where("reason_code IS NULL"))
            if admission.allowed is not None:  # names past LAKEHOUSE_MAX_METRICS: their readings are quarantined
                refused = names.refuse(parsed, admission.allowed, self.settings.max_metrics)
                refused = refused.persist(StorageLevel.MEMORY_AND_DISK)
                counts = _batch_counts(refused, self.settings.max_metrics)  # computed from the parse kept so far
                parsed.unpersist()
                parsed = refused
            if admission.admitted:
                self.writer.append(self.known_metrics.record(admission.admitted), Table.METRICS, batch_id)
            report.records, report.readings, report.quarantined = (
                counts["records"],
                counts["readings"],
                counts["quarantined"],
            )
            stage("parse")
            size = max(report.records, report.readings)
            # For this batch's writes, and the next batch's parse (a live stream's batches are alike in size).
            self.fit.apply((self.spark, records.sparkSession), size)
            if size < SMALL_BATCH_ROWS:
                bronze = _Beside(self.spark, write_bronze)
            # A batch run again after a crash that followed its first commit (gold's, or silver's in a backlog's
            # batch): what it yields now may differ from what its first run wrote (other settings, offsets Kafka no
            # longer holds), so gold's seconds of that run's range are recomputed from silver as well.
            query, recorded = self.writer.app_id_of_query(), self._watermark()
            first_run = self._first_run(query, batch_id, recorded)
            if report.readings:
                # Literal bounds (not a join-only condition) let Delta skip files outside the batch's time range.
                lo_us, hi_us = counts["lo"], counts["hi"]
                if first_run is not None:
                    lo_us, hi_us = min(lo_us, first_run[0]), max(hi_us, first_run[1])
                lo, hi = f"timestamp_micros({lo_us})", f"timestamp_micros({hi_us})"
                readings = parsed.where("reason_code IS NULL").drop(*NOT_READING_COLUMNS)
                mark = recorded.advanced(
                    query,
                    batch_id,
                    counts["event_high"],
                    self.settings.allowed_lateness_us,
                    lo_us,  # the first run's too: a crash of this run before its gold commit leaves them to do
                    hi_us,
                )
                self.writer.readings(
                    readings, report.readings, lo, hi, counts["seconds"], committed, mark, mark.before_us, first_run
                )
                self.mark = mark
            elif first_run is not None:
                self.writer.recompute_gold(first_run)
                committed("gold")

            bad = parsed.where("reason_code IS NOT NULL").select(
                "topic",
                "partition",
                "offset",
                "reading_index",
                "reason_code",
                "reason",
                "raw",
                "kafka_timestamp",
                "metric",
            )
            gaps = self._lost_offsets(parsed)
            if gaps:
                report.quarantined += len(gaps)
                rows = [
                    (g.topic, g.partition, g.first_lost, None, offsets.REASON_CODE, g.reason, None, None, None)
                    for g in gaps
                ]
                bad = bad.unionByName(self.spark.createDataFrame(rows, bad.schema))
            if report.quarantined:
                self.writer.append(bad.withColumn("quarantined_at", F.current_timestamp()), Table.QUARANTINE, batch_id)
                stage("quarantine")
            crash_point("quarantine", batch_id)
            if bronze is None:
                write_bronze()
            else:
                bronze.wait()
            stage("bronze")  # beside: only the time the batch waited for it past its own writes
        finally:
            if bronze is not None:
                bronze.wait(raise_error=False)
            parsed.unpersist()
        report.seconds = time.monotonic() - started
        report.finished_at = time.time()
        self.reports.append(report)
        if self.report_file is not None:
            with self.report_file.open("a", encoding="utf-8") as out:
                out.write(json.dumps(asdict(report)) + "\n")
        log.info(
            "batch %d: %d records, %d readings, %d quarantined, %.1f s (%s)",
            batch_id,
            report.records,
            report.readings,
            report.quarantined,
            report.seconds,
            ", ".join(f"{name} {seconds:.1f}" for name, seconds in report.stages.items()),
        )

    def _first_run(self, query: str, batch_id: int, recorded: Watermark) -> tuple[int, int] | None:
        """The reading times of this batch's first run, when it committed gold or silver before a crash: gold's newest
        entry is the batch's own, or, on this process's first batch, silver's is (a batch that writes silver first,
        a backlog's, may have crashed before its gold commit)."""
        entries = [recorded]
        if not self.checked_silver:
            self.checked_silver = True
            entries.append(self.writer.newest_entry(Table.SILVER) or watermark.NONE)
        for entry in entries:
            if entry.recorded_by(query, batch_id) and entry.lo_us is not None and entry.hi_us is not None:
                return (entry.lo_us, entry.hi_us)
        return None

    def _earliest_offsets(self) -> dict[tuple[str, int], int]:
        """The earliest offset Kafka holds per partition. When Kafka cannot be asked the batch fails, to run again on
        restart: a transaction's markers recorded as lost offsets could not be taken back."""
        from confluent_kafka import KafkaException

        try:
            return {key: marks.low for key, marks in kafka_watermarks(self.settings, timeout_s=10).items()}
        except KafkaException as exc:
            raise StreamStopped(
                f"the batch skipped offsets, and Kafka did not say whether it deleted them or they hold transaction "
                f"markers or aborted records ({exc}); run the pipeline again once Kafka answers"
            ) from exc

    def _lost_offsets(self, parsed: DataFrame) -> list[offsets.Gap]:
        from pyspark.sql import functions as F

        if self.settings.fail_on_data_loss:
            return []  # Spark stops the query itself before a batch that skips offsets
        ranges = parsed.groupBy("topic", "partition").agg(F.min("offset").alias("first"), F.max("offset").alias("last"))
        gaps = self.offset_tracker.gaps(self.spark, self.paths.table(Table.BRONZE), ranges, self._earliest_offsets)
        for gap in gaps:
            log.warning("data loss: %s; recorded in quarantine as %s", gap.reason, offsets.REASON_CODE)
        return gaps


def _batch_counts(parsed: DataFrame, max_metrics: int) -> Row:
    """A parsed batch's counts, time bounds and seconds, and its metric names (up to `max_metrics` + 1), in one
    pass."""
    from pyspark.sql import functions as F

    valid = F.col("reason_code").isNull()
    return first_row(
        parsed.agg(
            F.count_if("opens_record").alias("records"),
            F.count("device_id").alias("readings"),
            F.count("reason_code").alias("quarantined"),
            F.min(F.unix_micros("timestamp")).alias("lo"),
            F.max(F.unix_micros("timestamp")).alias("hi"),
            # The newest valid reading's time, each capped at its record's broker time (lake.watermark); a
            # quarantined row has no time (and `least` would give its broker time alone).
            F.max(
                F.when(
                    valid & F.col("timestamp").isNotNull(),
                    F.least(F.unix_micros("timestamp"), F.unix_micros("kafka_timestamp")),
                )
            ).alias("event_high"),
            # The seconds it touches, up to a bound (past it, a backlog's seconds are not told apart).
            F.slice(F.collect_set(F.unix_micros(F.date_trunc("second", "timestamp"))), 1, SECONDS + 1).alias("seconds"),
            F.slice(F.collect_set(F.when(valid, F.col("metric"))), 1, max_metrics + 1).alias("metrics"),
        ),
        "the batch's counts",
    )


@dataclass
class RollupsJob:
    """The rollups query's state: each micro-batch holds the (device_id, metric, timestamp) of silver rows that silver's new
    commits added or rewrote, and recomputes the rollup buckets they fall into."""

    spark: SparkSession
    paths: LakePaths
    writer: LakeWriter = field(init=False)
    fit: BatchFit = field(init=False)
    batches: int = 0

    def __post_init__(self) -> None:
        self.writer = LakeWriter(self.spark, self.paths)
        self.fit = BatchFit.of(self.spark)

    def process_batch(self, changes: DataFrame, batch_id: int) -> None:
        from pyspark.sql import functions as F

        started = time.monotonic()
        self.spark.sparkContext.setLocalProperty(_POOL, checkpoint.ROLLUPS_QUERY)
        # A reading written before metrics, rewritten by a MERGE that corrected its file's neighbours, has no metric.
        keys = changes.select("device_id", F.expr(SILVER_METRIC).alias("metric"), "timestamp")
        bounds = first_row(
            keys.agg(F.count("*"), F.min(F.unix_micros("timestamp")), F.max(F.unix_micros("timestamp"))),
            "the rollups batch's bounds",
        )
        if bounds[0]:
            self.fit.apply((self.spark, changes.sparkSession), bounds[0])
            lo, hi = f"timestamp_micros({bounds[1]})", f"timestamp_micros({bounds[2]})"
            self.writer.rollups(keys, lo, hi, read_stored_once=bounds[2] - bounds[1] <= rollups.ONE_READ_SPAN_US)
            crash_point("rollups", batch_id)
        self.batches += 1
        log.info("rollups batch %d: %d silver rows, %.1f s", batch_id, bounds[0], time.monotonic() - started)


def start_rollups(spark: SparkSession, settings: Settings, paths: LakePaths, available_now: bool) -> StreamingQuery:
    """Start the rollups query on silver's Delta log, in a session of its own (same Spark context, its own SQL
    conf), so that what one query sets for its batches (code generation, the watermark's commit metadata) never
    reaches the other's."""
    spark = spark.newSession()
    job = RollupsJob(spark, paths)
    # A MERGE that updates rows rewrites their files; `ignoreChanges` streams the rewritten files' rows again (a
    # superset of the changed rows, which only recomputes a few more buckets) instead of stopping the query.
    changes = spark.readStream.format("delta").option("ignoreChanges", "true").load(paths.table(Table.SILVER))
    writer = (
        changes.writeStream.queryName(checkpoint.ROLLUPS_QUERY)
        .option("checkpointLocation", paths.checkpoint(checkpoint.ROLLUPS_QUERY))
        .foreachBatch(job.process_batch)
    )
    trigger = {"availableNow": True} if available_now else {"processingTime": settings.rollups_interval}
    return writer.trigger(**trigger).start()  # type: ignore[arg-type]


def _await(query: StreamingQuery, settings: Settings) -> None:
    """Wait for the query to end; Spark's failure becomes a StreamStopped that says what to do."""
    from pyspark.errors import StreamingQueryException

    try:
        query.awaitTermination()
    except StreamingQueryException as exc:
        # Spark's message carries the whole plan; the first lines say what failed.
        summary = "\n".join(str(exc).splitlines()[:12])
        refused = security_problem(exc, settings, "read")
        if refused is not None:  # retrying cannot help: say why and stop
            raise StreamStopped(f"the {query.name} query stopped: {refused}") from exc
        if "data may have been lost" in str(exc).lower() or "data loss" in str(exc).lower():
            raise StreamStopped(
                f"Kafka no longer holds offsets the pipeline had not read (retention deleted them):\n{summary}\n"
                "To go on past the gap, run with --no-fail-on-data-loss (LAKEHOUSE_FAIL_ON_DATA_LOSS=false); "
                f"each gap is then recorded in quarantine with reason_code '{offsets.REASON_CODE}'."
            ) from exc
        raise StreamStopped(
            f"the {query.name} query stopped: {summary}\nthe checkpoint is intact; fix the cause and run again"
        ) from exc


def run(
    settings: Settings, available_now: bool = False, spark: SparkSession | None = None, report_file: Path | None = None
) -> list[BatchReport]:
    """Run the ingest and rollups queries until stopped (or, with `available_now`, until Kafka's backlog is processed
    and then silver's new commits are rolled up)."""
    from pyspark.errors import StreamingQueryException

    from pipeline.stream.source import read_kafka
    from pipeline.stream.spark import build_session
    from pipeline.stream.tables import create_tables

    spark = spark or build_session(settings)
    paths = LakePaths.from_settings(settings)
    create_tables(spark, paths, settings.delta_checkpoint_interval)
    job = IngestJob(spark, settings, paths, report_file)
    writer = (
        read_kafka(spark, settings)
        .writeStream.queryName(checkpoint.INGEST_QUERY)
        .option("checkpointLocation", checkpoint.ingest_checkpoint(paths))
        .foreachBatch(job.process_batch)
    )
    if available_now:
        _await(writer.trigger(availableNow=True).start(), settings)
        _await(start_rollups(spark, settings, paths, available_now=True), settings)
        return job.reports
    queries = [writer.trigger(processingTime=settings.trigger_interval).start()]
    try:
        queries.append(start_rollups(spark, settings, paths, available_now=False))
        # Whichever stops first (a failure) stops the other.
        spark.streams.resetTerminated()
        try:
            spark.streams.awaitAnyTermination()
        except StreamingQueryException:
            pass  # raised again, explained, by _await below
        for query in queries:
            if not query.isActive:
                _await(query, settings)
    except KeyboardInterrupt:
        pass
    finally:
        for query in queries:
            if query.isActive:
                query.stop()
    return job.reports
