"""Table upkeep: compaction of small files (OPTIMIZE), Delta checkpoints, and VACUUM with a safe retention.

Runs with its own Spark session (handed in by the caller) and may run while the stream writes: Delta retries
or rejects a conflicting commit, and both sides here retry on a conflict, so nothing is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from lake.settings import local_path
from lake.tables import LakePaths, Table

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("lakehouse.maintenance")
T = TypeVar("T")

SAFE_RETENTION_HOURS = 168  # Delta's own default: a week of history for readers and time travel


class UnsafeRetention(ValueError):
    """A VACUUM retention that would delete files a running writer has not committed yet."""


def check_retention(retain_hours: float, allow_unsafe: bool = False) -> None:
    if retain_hours < 1 and not allow_unsafe:
        raise UnsafeRetention(
            f"--retain-hours {retain_hours:g} would delete the files a running pipeline has written but not yet "
            "committed, corrupting the table; use at least 1, or add --unsafe-retention when no writer runs"
        )


def concurrent_conflicts() -> tuple[type[BaseException], ...]:
    from delta import exceptions

    return tuple(getattr(exceptions, name) for name in exceptions.__all__)


def retry_on_conflict(action: Callable[[], T], what: str, attempts: int = 8) -> T:
    """Run a Delta commit again when a concurrent commit conflicted with it (each try reads the newest version)."""
    conflicts = concurrent_conflicts()
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except conflicts as exc:
            if attempt == attempts:
                raise
            wait = min(30.0, 0.5 * 2**attempt)
            log.warning("%s conflicted with a concurrent commit (%s); retrying in %.1f s", what, type(exc).__name__, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


@dataclass
class TableReport:
    table: str
    live_files_before: int  # data files of the current table version
    live_files_after: int
    files_compacted: int  # live files that OPTIMIZE replaced
    files_vacuumed: int  # files deleted from storage
    version: int


def data_files(path: str) -> int:
    """Parquet files on disk (local lakes only; -1 for object stores)."""
    root = local_path(path)
    if root is None:
        return -1
    return sum(1 for f in root.rglob("*.parquet") if "_delta_log" not in f.parts)


@contextmanager
def _upkeep_conf(spark: SparkSession, retain_hours: float) -> Iterator[None]:
    """Delta settings for upkeep of the session's tables, restored afterwards (the caller's session may go on)."""
    parallelism = str(spark.conf.get("spark.sql.shuffle.partitions"))
    conf: dict[str, str] = {
        # VACUUM lists a table in this many tasks: Spark's default, 10,000, made a vacuum of a few hundred files
        # take 40 to 100 s of empty tasks on two cores. The tables are not partitioned: one folder each.
        "spark.sql.sources.parallelPartitionDiscovery.parallelism": parallelism,
        # VACUUM deletes with Spark tasks (as many as shuffle partitions) instead of one file after another.
        "spark.databricks.delta.vacuum.parallelDelete.enabled": "true",
        # Delta 4 ignores a VACUUM retention other than 0 (it keeps the table's deletedFileRetentionDuration,
        # 7 days) unless told otherwise; --retain-hours means what it says.
        "spark.databricks.delta.vacuum.retentionWindowIgnore.enabled": "false",
    }
    if retain_hours < SAFE_RETENTION_HOURS:
        # Delta refuses a short retention unless told; a reader on an older version may then miss files.
        conf["spark.databricks.delta.retentionDurationCheck.enabled"] = "false"
    previous = {key: spark.conf.get(key, None) for key in conf}  # None: not set in this session
    for key, value in conf.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, old in previous.items():
            if old is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, old)


def maintain(
    spark: SparkSession, paths: LakePaths, tables: list[Table] | None = None,
    retain_hours: float = SAFE_RETENTION_HOURS, vacuum: bool = True, allow_unsafe_retention: bool = False,
) -> list[TableReport]:  # fmt: skip
    check_retention(retain_hours, allow_unsafe_retention)
    with _upkeep_conf(spark, retain_hours):
        return [
            _maintain_table(spark, paths.table(table), table, retain_hours, vacuum) for table in tables or list(Table)
        ]


def _maintain_table(spark: SparkSession, location: str, table: Table, retain_hours: float, vacuum: bool) -> TableReport:
    from delta.tables import DeltaTable

    started = time.monotonic()
    delta = DeltaTable.forPath(spark, location)
    before = delta.detail().first()["numFiles"]
    # OPTIMIZE plans from the table's newest version and commits nothing when no bin has two files to compact.
    metrics = retry_on_conflict(lambda: delta.optimize().executeCompaction().first(), f"OPTIMIZE {table.value}")
    compacted = int(metrics["metrics"]["numFilesRemoved"]) if metrics is not None else 0
    vacuumed = 0
    if vacuum:
        on_disk = data_files(location)
        delta.vacuum(retain_hours)
        vacuumed = max(0, on_disk - data_files(location))
    version, after = _checkpoint(spark, location)
    report = TableReport(table.value, before, after, compacted, vacuumed, version)
    log.info("%s: %d files compacted, %d vacuumed, version %d checkpointed (%.1f s)",
             table.value, compacted, vacuumed, version, time.monotonic() - started)  # fmt: skip
    return report


def _checkpoint(spark: SparkSession, location: str) -> tuple[int, int]:
    """Write a Delta checkpoint of the newest version, so that readers replay a short log; its version and files."""
    # delta-spark has no Python API for this. `update()` brings the JVM's cached DeltaLog to the newest version
    # (reading only the commits since the version it holds; the stream may have committed meanwhile), and the
    # checkpoint is written from that snapshot.
    jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
    none = jvm.scala.Option.empty()  # type: ignore[union-attr]
    delta_log = jvm.org.apache.spark.sql.delta.DeltaLog.forTable(spark._jsparkSession, location)  # type: ignore[attr-defined]
    snapshot = delta_log.update(False, none, none)
    delta_log.checkpoint(snapshot, none)
    return snapshot.version(), snapshot.numOfFiles()
