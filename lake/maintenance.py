"""Table upkeep: compaction of small files (OPTIMIZE), Delta checkpoints, and VACUUM with a safe retention.

Runs with its own Spark session (handed in by the caller) and may run while the stream writes: Delta retries
or rejects a conflicting commit, and both sides here retry on a conflict, so nothing is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
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


def maintain(
    spark: SparkSession, paths: LakePaths, tables: list[Table] | None = None,
    retain_hours: float = SAFE_RETENTION_HOURS, vacuum: bool = True, allow_unsafe_retention: bool = False,
) -> list[TableReport]:  # fmt: skip
    from delta.tables import DeltaTable

    check_retention(retain_hours, allow_unsafe_retention)

    if retain_hours < SAFE_RETENTION_HOURS:
        # Delta refuses a short retention unless told; a reader on an older version may then miss files.
        spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    reports = []
    for table in tables or list(Table):
        location = paths.table(table)
        delta = DeltaTable.forPath(spark, location)
        before = delta.detail().first()["numFiles"]
        metrics = retry_on_conflict(lambda: delta.optimize().executeCompaction().first(), f"OPTIMIZE {table.value}")
        compacted = int(metrics["metrics"]["numFilesRemoved"]) if metrics is not None else 0
        _checkpoint(spark, location)
        vacuumed = 0
        if vacuum:
            on_disk = data_files(location)
            delta.vacuum(retain_hours)
            vacuumed = max(0, on_disk - data_files(location))
        version = delta.history(1).first()["version"]
        after = delta.detail().first()["numFiles"]
        reports.append(TableReport(table.value, before, after, compacted, vacuumed, version))
        log.info("%s: %d files compacted, %d vacuumed, version %d", table.value, compacted, vacuumed, version)
    return reports


def _checkpoint(spark: SparkSession, location: str) -> None:
    """Write a Delta checkpoint of the newest version, so that readers replay a short log."""
    # delta-spark has no Python API for this. DeltaLog instances are cached per JVM and `checkpoint()` writes the
    # cached snapshot, so the cache is dropped first to checkpoint the newest version (this session is ours alone).
    jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
    jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()
    delta_log = jvm.org.apache.spark.sql.delta.DeltaLog.forTable(spark._jsparkSession, location)  # type: ignore[attr-defined]
    delta_log.checkpoint()
