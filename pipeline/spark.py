"""The one SparkSession builder, shared by the streaming job and the tests."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from lake.settings import MIB, Settings
from pipeline import jars

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def _submitted_conf() -> set[str]:
    """Keys set by spark-submit when it launched this process; empty when pyspark starts its own JVM."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # set only by a JVM that started this Python process
        return set()
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()
    return {key for key, _ in SparkConf(loadDefaults=True).getAll()}


ARROW_BATCH_BYTES = 32 * MIB  # spark.sql.execution.arrow.maxBytesPerBatch: messages handed to the parser at once


def task_slots(master: str) -> int:
    """Tasks that run at once in a local master (local, local[N], local[*], local[N,F]); the machine's cores else."""
    if master == "local":
        return 1
    if master.startswith("local[") and (count := master[6:].split(",")[0].rstrip("]")).isdigit():
        return int(count)
    return os.cpu_count() or 1


def jvm_memory_bounds(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """JVM options and environment that bound the driver JVM's memory beyond its heap, from the settings.

    Measured (tests/test_backlog.py, Native Memory Tracking at the peak): beyond its heap the JVM holds ~280 MiB of
    class metadata (Metaspace, Class, Symbol), ~8 % of the heap for G1, ~75 MiB of compiled code, ~35 MiB of thread
    stacks, and direct memory. Direct memory is what grows with the data:
    - each task's Arrow batches to and from the parser (at most ARROW_BATCH_BYTES of messages, or one message),
      through Arrow's Netty allocator, and the JDK's temporary buffer for a Kafka fetch (one message, at most);
    - the JDK caches that temporary buffer per thread at the size of the largest read (a fetch: up to
      `max_message_bytes` per thread, for ever); jdk.nio.maxCachedBufferSize frees buffers above 1 MiB instead;
    - MaxDirectMemorySize (default: the heap size) bounds both, at 4 batches per task plus 64 MiB for Spark's own.
    glibc gives each thread that mallocs an arena of its own (up to 8 per core) and keeps freed memory in them:
    MALLOC_ARENA_MAX=2 keeps the JVM's malloc'ed memory near what it uses. It only applies to a JVM started from
    here (pyspark starting its own, or executors through spark.executorEnv); under spark-submit, export it first.
    """
    per_task = 4 * max(ARROW_BATCH_BYTES, settings.kafka_limit_bytes)
    direct = 64 * MIB + task_slots(settings.spark_master) * per_task
    options = [f"-XX:MaxDirectMemorySize={direct // MIB}m", f"-Djdk.nio.maxCachedBufferSize={1 * MIB}"]
    return options, {"MALLOC_ARENA_MAX": "2"}


def build_session(settings: Settings, app_name: str = "kpi-lakehouse", extra: dict[str, str] | None = None) -> SparkSession:
    from pyspark.sql import SparkSession

    # Python workers (the parser runs in mapInArrow) must use this interpreter and its packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    java_options, jvm_env = jvm_memory_bounds(settings)
    for name, value in jvm_env.items():  # read by the JVM pyspark is about to start (and its Python workers)
        os.environ.setdefault(name, value)
    jar_files = ",".join(str(j) for j in jars.spark_jars(settings.home))
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
        # New tables stay readable by DuckDB's pinned delta reader (no deletion vectors).
        "spark.databricks.delta.properties.defaults.enableDeletionVectors": "false",
        # Delta rebuilds table state with this many partitions (default 50): far too many for a few log files.
        "spark.databricks.delta.snapshotPartitions": str(max(1, settings.shuffle_partitions)),
        "spark.driver.extraJavaOptions": " ".join(["-Dio.netty.tryReflectionSetAccessible=true", *java_options]),
        **{f"spark.executorEnv.{name}": value for name, value in jvm_env.items()},
    }
    if settings.spark_executor_memory:
        conf["spark.executor.memory"] = settings.spark_executor_memory
    conf.update(extra or {})
    # Under spark-submit, what it was given (--master, --jars, --executor-memory, --conf, spark-defaults.conf) wins.
    conf = {key: value for key, value in conf.items() if key not in _submitted_conf()}
    builder = SparkSession.builder
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
