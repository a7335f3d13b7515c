"""Table upkeep: retention of bronze and quarantine rows (lake.retention), compaction of small files, a Delta
checkpoint of each table, VACUUM with a safe retention, and removal of expired log files.

Runs on delta-rs (the `deltalake` package), not Spark: a Spark session takes longer to start than the upkeep of a
small lake. It may run while the stream writes: delta-rs commits only if no concurrent commit removed a file it
removes, the stream's writes retry on a conflict (lake.conflicts), and so does every commit here. On S3 it may not:
Spark's S3 log store does not create commit files with the put-if-absent that delta-rs relies on (DEPLOY.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

from lake import objectstore, watermark
from lake.conflicts import delta_rs_conflicts, retry_on_conflict
from lake.deltars import open_table
from lake.retention import RETAINED_TABLES, apply_retention
from lake.settings import MIB, local_path
from lake.tables import LakePaths, Table

log = logging.getLogger("lakehouse.maintenance")

SAFE_RETENTION_HOURS = 168  # Delta's own default: a week of history for readers and time travel
# Compacted files of about the size Spark reads in one task (spark.sql.files.maxPartitionBytes): a table of a few
# MiB becomes one file, a large one files that readers still split across cores. A table's own
# `delta.targetFileSize` wins.
TARGET_FILE_BYTES = 128 * MIB


class UnsafeRetention(ValueError):
    """A VACUUM retention that would delete files a running writer has not committed yet."""


def check_retention(retain_hours: float, allow_unsafe: bool = False) -> None:
    if retain_hours < 1 and not allow_unsafe:
        raise UnsafeRetention(
            f"--retain-hours {retain_hours:g} would delete the files a running pipeline has written but not yet "
            "committed, corrupting the table; use at least 1, or add --unsafe-retention when no writer runs"
        )


@dataclass
class TableReport:
    table: str
    live_files_before: int  # data files of the current table version
    live_files_after: int
    files_compacted: int  # live files that compaction replaced
    files_vacuumed: int  # files deleted from storage
    version: int  # the version checkpointed
    rows_removed: int = 0  # rows older than the table's retention, deleted
    retention_repaired: bool = False  # an interrupted retention run was finished first


def data_files(path: str) -> int:
    """Parquet files on disk (local lakes only; -1 for object stores)."""
    root = local_path(path)
    if root is None:
        return -1
    return sum(1 for f in root.rglob("*.parquet") if "_delta_log" not in f.parts)


def maintain(
    paths: LakePaths,
    tables: list[Table] | None = None,
    retain_hours: float = SAFE_RETENTION_HOURS,
    vacuum: bool = True,
    allow_unsafe_retention: bool = False,
    row_retention: Mapping[Table, timedelta | None] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> list[TableReport]:
    """Upkeep of `tables` (all by default); `row_retention` says how long bronze and quarantine keep rows (absent
    or None: forever). `on_step` hears what is being done, for a progress line."""
    check_retention(retain_hours, allow_unsafe_retention)
    if objectstore.is_s3(paths.root):
        objectstore.check_access(paths.root)
    step = on_step or (lambda text: None)
    reports = []
    for table in tables or list(Table):
        removed, repaired = 0, False
        if table in RETAINED_TABLES:  # an interrupted run is repaired even when no retention is set any more
            retained = apply_retention(paths, table, (row_retention or {}).get(table), on_step=step)
            removed, repaired = retained.rows_removed, retained.repaired
        step(f"{table.value}: compacting, checkpointing" + (", vacuuming" if vacuum else ""))
        report = _maintain_table(paths.table(table), table, retain_hours, vacuum)
        report.rows_removed, report.retention_repaired = removed, repaired
        reports.append(report)
    return reports


def _compact(location: str) -> int:
    """Compact the newest version's small files (a commit of dataChange=false, which append-only tables allow); the
    number of files replaced, 0 (and no commit) when there is nothing to compact."""
    delta = open_table(location)
    own_target = "delta.targetFileSize" in delta.metadata().configuration
    metrics = delta.optimize.compact(target_size=None if own_target else TARGET_FILE_BYTES)
    return int(metrics["numFilesRemoved"])


def _vacuum(location: str, retain_hours: float) -> int:
    """Delete files older than the retention that the newest version does not use; how many were deleted."""
    deleted = open_table(location).vacuum(
        retention_hours=math.ceil(retain_hours),  # whole hours; rounding up keeps more, never less
        # delta-rs refuses a retention under the table's deletedFileRetentionDuration (a week) unless told;
        # check_retention has already refused an unsafe one.
        enforce_retention_duration=retain_hours >= SAFE_RETENTION_HOURS,
        dry_run=False,
        # Spark's VACUUM too lists the folder: files of writes that never committed go as well once old enough,
        # while untracked files younger than the retention (a running writer's) stay.
        full=True,
    )
    return len(deleted)


def _maintain_table(location: str, table: Table, retain_hours: float, vacuum: bool) -> TableReport:
    started = time.monotonic()
    before = len(open_table(location).file_uris())
    conflicts = delta_rs_conflicts()
    # Each try opens the newest version: the stream may have committed since the last one.
    compacted = retry_on_conflict(lambda: _compact(location), f"compaction of {table.value}", conflicts)
    vacuumed = 0
    if vacuum:
        vacuumed = retry_on_conflict(lambda: _vacuum(location, retain_hours), f"VACUUM of {table.value}", conflicts)
    # A checkpoint of the newest version, so that readers replay a short log; it carries the stream's txn actions
    # (app id and batch) that keep a re-run micro-batch from writing twice. Log files older than the table's
    # logRetentionDuration (30 days) and covered by a checkpoint go, as Spark removes them when it checkpoints.
    if table is Table.GOLD:  # before its log is cleaned: the watermark lives in gold's commitInfo
        watermark.keep(location)
    newest = open_table(location)
    newest.create_checkpoint()
    newest.cleanup_metadata()
    _drop_stale_checksum(location)
    report = TableReport(table.value, before, len(newest.file_uris()), compacted, vacuumed, newest.version())
    log.info(
        "%s: %d files compacted, %d vacuumed, version %d checkpointed (%.1f s)",
        table.value,
        compacted,
        vacuumed,
        report.version,
        time.monotonic() - started,
    )
    return report


def _drop_stale_checksum(location: str) -> None:
    """Remove Spark's checksum of `_last_checkpoint` in a local table's log, which delta-rs has just rewritten.

    Hadoop's local file system writes `.<name>.crc` beside each file and refuses to read a file that no longer
    matches it; a stale one made every new Spark reader log a ChecksumException and list the whole log instead.
    Spark reads a file without a checksum as it is. Only this file: other checksums may belong to a commit that
    Spark is renaming into place right now, and a rename that misses its checksum fails the commit."""
    folder = local_path(location)
    if folder is not None:  # object stores keep no such files
        (folder / "_delta_log" / "._last_checkpoint.crc").unlink(missing_ok=True)
