"""The one SparkSession builder, shared by the streaming job and the tests."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from lake.settings import Settings
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


def build_session(settings: Settings, app_name: str = "kpi-lakehouse", extra: dict[str, str] | None = None) -> SparkSession:
    from pyspark.sql import SparkSession

    # Python workers (the parser runs in mapInArrow) must use this interpreter and its packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
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
        "spark.driver.extraJavaOptions": "-Dio.netty.tryReflectionSetAccessible=true",
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
