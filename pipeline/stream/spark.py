"""The one SparkSession builder, shared by the streaming job and the tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lake import objectstore
from lake.settings import MIB, Settings
from pipeline.errors import SetupError
from pipeline.jvm import jars

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def _submitted_conf() -> set[str]:
    """Keys set by spark-submit when it launched this process; empty when pyspark starts its own JVM."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # set only by a JVM that started this Python process
        return set()
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()
    return {key for key, _ in SparkConf(loadDefaults=True).getAll()}


def jvm_memory_bounds(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """JVM options and environment that bound the driver JVM's memory beyond its heap, from the settings.

    Measured (tests/test_backlog.py, Native Memory Tracking at the peak): beyond its heap the JVM holds ~280 MiB of
    class metadata (Metaspace, Class, Symbol), ~8 % of the heap for G1, ~75 MiB of compiled code, ~35 MiB of thread
    stacks, and direct memory ("Other"), which grows with the data:
    - Arrow batches to and from the parser (Arrow's Netty allocator): the parsed rows coming back are several times
      the messages going out. Direct memory is left at Java's default bound (the heap size): 320 MiB (64 MiB + 4
      Arrow batches per task) ran a 1 GiB backlog at 2000 records per trigger out of direct memory (a 55 MiB Arrow
      buffer), so a tighter bound would have to follow LAKEHOUSE_MAX_OFFSETS_PER_TRIGGER, which is not measured yet;
    - the JDK's temporary buffer for a Kafka fetch, which it caches per thread at the size of the largest read (up
      to `max_message_bytes` per thread, for ever); jdk.nio.maxCachedBufferSize frees buffers above 1 MiB instead.
    glibc gives each thread that mallocs an arena of its own (up to 8 per core) and keeps freed memory in them:
    MALLOC_ARENA_MAX=2 keeps the JVM's malloc'ed memory near what it uses. It only applies to a JVM started from
    here (pyspark starting its own, or executors through spark.executorEnv); under spark-submit, export it first.
    """
    return [f"-Djdk.nio.maxCachedBufferSize={1 * MIB}"], {"MALLOC_ARENA_MAX": "2"}


def _object_store_conf(settings: Settings, spark_jars: list[Path]) -> dict[str, str]:
    """s3a's settings from the standard AWS_* variables when the lake or its checkpoints are on S3, after checking
    that credentials and bucket are there (a clear line now, not a stack trace from the first write).

    Delta keeps its default S3 log store (S3SingleDriverLogStore): safe with one writing process per table, which is
    what the pipeline is; DEPLOY.md says how to let several write."""
    roots = [root for root in (settings.lake_root, settings.checkpoints) if objectstore.is_s3(root)]
    if not roots:
        return {}
    if not any(jar.name.startswith("hadoop-aws") for jar in spark_jars):
        raise SetupError(f"hadoop-aws is missing under {jars.spark_jar_dir(settings.home)}; run `lakehouse setup`")
    for root in roots:
        objectstore.check_access(root)
    access = objectstore.access()  # also keeps the AWS SDK's checksums to what S3-compatible servers take
    return {f"spark.hadoop.{key}": value for key, value in access.hadoop_conf().items()}


# Spark generates Java code for a plan (whole stages, and each operator's projections in every task) and compiles it
# with Janino, cached by the code's text. A micro-batch's plans miss that cache: the batch's time bounds and
# `current_timestamp()` are literals written into the code. And the text is made again for every task before the
# cache is asked, which for Delta's wide log actions is itself costly. For a micro-batch of a few readings, making
# and compiling code took about 40 % of the pipeline JVM's CPU samples (JFR, `lakehouse bench --part freshness`),
# where running the same plans interpreted costs next to nothing. For a backlog batch of millions of readings, the
# compiled code pays for itself.
# Below this many rows a micro-batch is small: its plans run interpreted, on one shuffle partition, and bronze is
# written beside silver and gold (pipeline.stream.job).
SMALL_BATCH_ROWS = 100_000


@dataclass(frozen=True)
class BatchFit:
    """Fits the plans that follow to a micro-batch's size. A small one runs interpreted (no generated code) on one
    shuffle partition, and Delta rebuilds a table's state on one: fewer, smaller tasks, whose fixed costs (Java
    serialization of each task took about a fifth of the JVM's samples) dominate a batch of a few readings. It also
    runs without adaptive query execution, which runs each shuffle and broadcast of a plan as a Spark job of its own
    and plans the rest again after each: a small batch of the ingest query runs 19 jobs instead of 36 (a median of
    3.34 s against 3.58 s over five alternating pairs of `bench/batch_loop.py --batches 24 --step 0.5`). A large
    one compiles its code and uses the partitions Spark was started with (LAKEHOUSE_SHUFFLE_PARTITIONS, or what
    spark-submit was given).

    These are session confs, read when a plan is made; a streaming query runs its batches in a clone of the session
    it was started from (the batch DataFrame's), and Delta's own jobs in a batch use that clone, so both are set."""

    shuffle_partitions: str
    snapshot_partitions: str
    adaptive: str = "true"

    @classmethod
    def of(cls, spark: SparkSession) -> BatchFit:
        """The partitions and adaptive execution the Spark context was started with (its SparkConf, which these
        changes do not touch)."""
        launched = spark.sparkContext.getConf()
        shuffle = launched.get("spark.sql.shuffle.partitions", "200") or "200"
        return cls(
            shuffle,
            launched.get("spark.databricks.delta.snapshotPartitions", shuffle) or shuffle,
            launched.get("spark.sql.adaptive.enabled", "true") or "true",
        )

    def apply(self, sessions: Iterable[SparkSession], rows: int) -> None:
        small = rows < SMALL_BATCH_ROWS
        for spark in sessions:
            spark.conf.set("spark.sql.codegen.wholeStage", "false" if small else "true")
            # NO_CODEGEN: projections and predicates interpreted; FALLBACK (Spark's default): compiled, interpreted
            # when compiling fails.
            spark.conf.set("spark.sql.codegen.factoryMode", "NO_CODEGEN" if small else "FALLBACK")
            spark.conf.set("spark.sql.shuffle.partitions", "1" if small else self.shuffle_partitions)
            spark.conf.set("spark.databricks.delta.snapshotPartitions", "1" if small else self.snapshot_partitions)
            spark.conf.set("spark.sql.adaptive.enabled", "false" if small else self.adaptive)


def build_session(
    settings: Settings, app_name: str = "kpi-lakehouse", extra: dict[str, str] | None = None
) -> SparkSession:
    from pyspark.sql import SparkSession

    # Python workers (the parser runs in mapInArrow) must use this interpreter and its packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    java_options, jvm_env = jvm_memory_bounds(settings)
    for name, value in jvm_env.items():  # read by the JVM pyspark is about to start (and its Python workers)
        os.environ.setdefault(name, value)
    on_object_store = any(objectstore.is_s3(root) for root in (settings.lake_root, settings.checkpoints))
    spark_jars = jars.spark_jars(settings.home, object_store=on_object_store)
    jar_files = ",".join(str(j) for j in spark_jars)
    conf = {
        "spark.master": settings.spark_master,
        "spark.app.name": app_name,
        "spark.jars": jar_files,
        "spark.driver.memory": settings.spark_driver_memory,
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        # Arrow batches handed to the parser: many small messages, or few large ones (a 5 MiB message alone when
        # needed), so a Python worker's memory stays bounded whatever the message sizes.
        "spark.sql.execution.arrow.maxRecordsPerBatch": "10000",
        "spark.sql.execution.arrow.maxBytesPerBatch": str(32 * 1024 * 1024),
        # Parquet checks a page's size only every 100 rows at first: 100 messages of 5 MiB in one bronze page,
        # per task, ran a 2 GiB driver out of heap. Checking from the first row keeps pages near their 1 MiB.
        "spark.hadoop.parquet.page.size.row.check.min": "1",
        "spark.sql.streaming.stopGracefullyOnShutdown": "true",
        # Spark keeps the records of each Kafka read's last poll (for a next read that goes on from where it
        # stopped) for 5 minutes by default, outside its memory accounting. A poll returns a whole fetch: up to
        # LAKEHOUSE_MAX_MESSAGE_BYTES of zstd batches, several times that once decompressed (8 messages of 5 MiB).
        # A backlog's batches, each read twice, piled up 54 such 5 MiB records (270 MiB) and ran a 1 GiB heap out
        # of memory (tests/test_backlog.py). Kept for 5 s, what the next batch goes on from is still there, and
        # the heap holds at most the last few reads.
        "spark.kafka.consumer.fetchedData.cache.timeout": "5s",
        "spark.kafka.consumer.fetchedData.cache.evictorThreadRunInterval": "1s",
        # The ingest and rollups queries share the cores; their pools (fairscheduler.xml) favour ingest.
        "spark.scheduler.mode": "FAIR",
        "spark.scheduler.allocation.file": str(jars.fair_scheduler_pools()),
        # New tables stay readable by DuckDB's pinned delta reader (no deletion vectors).
        "spark.databricks.delta.properties.defaults.enableDeletionVectors": "false",
        # Delta rebuilds table state with this many partitions (default 50): far too many for a few log files.
        "spark.databricks.delta.snapshotPartitions": str(max(1, settings.shuffle_partitions)),
        # The user's options last (Spark splits the string as a shell would, quotes included).
        "spark.driver.extraJavaOptions": " ".join(
            ["-Dio.netty.tryReflectionSetAccessible=true", *java_options, settings.spark_driver_java_options]
        ).strip(),
        **{f"spark.executorEnv.{name}": value for name, value in jvm_env.items()},
    }
    if settings.spark_executor_memory:
        conf["spark.executor.memory"] = settings.spark_executor_memory
    conf.update(_object_store_conf(settings, spark_jars))
    conf.update(extra or {})
    # Under spark-submit, what it was given (--master, --jars, --executor-memory, --conf, spark-defaults.conf) wins.
    conf = {key: value for key, value in conf.items() if key not in _submitted_conf()}
    builder = SparkSession.builder
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
