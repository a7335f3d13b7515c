"""What a reader can learn from the files of a local lake without a query engine: a Delta table's newest version
and commit time, and the Kafka offsets the streaming job's checkpoint says it has processed."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lake.settings import local_path

_COMMIT_FILE = re.compile(r"(\d{20})\.json")
_BATCH_FILE = re.compile(r"\d+")
# The streaming query's name, which is the folder of its checkpoint under the checkpoint root.
INGEST_QUERY_NAME = "ingest"


@dataclass(frozen=True)
class TableVersion:
    """A Delta table's newest committed version and when it was committed (from its commitInfo)."""

    version: int
    committed_at: datetime | None


def latest_version(table_location: str) -> TableVersion | None:
    """The newest version in `_delta_log`, or None when the table does not exist (or is not on a local disk).

    Listing the log folder finds the newest commit without replaying the log; a commit file appears whole (Delta
    writes it with an atomic rename or put-if-absent), so the listed version is committed.
    """
    folder = local_path(table_location)
    if folder is None:
        return None
    try:
        names = os.listdir(folder / "_delta_log")
    except FileNotFoundError:
        return None
    versions = [int(m.group(1)) for name in names if (m := _COMMIT_FILE.fullmatch(name))]
    if not versions:
        return None
    version = max(versions)
    return TableVersion(version, _commit_time(folder / "_delta_log" / f"{version:020d}.json"))


def _commit_time(commit_file: Path) -> datetime | None:
    try:
        with commit_file.open("rb") as lines:
            for line in lines:
                action = json.loads(line)
                if "commitInfo" in action and "timestamp" in action["commitInfo"]:
                    return datetime.fromtimestamp(action["commitInfo"]["timestamp"] / 1000, UTC)
    except (OSError, ValueError):
        pass
    try:  # a writer that records no commitInfo: the file's own time is the commit time
        return datetime.fromtimestamp(commit_file.stat().st_mtime, UTC)
    except OSError:
        return None


@dataclass(frozen=True)
class ProcessedOffsets:
    """The next offset to read per (topic, partition), after the newest micro-batch the checkpoint committed."""

    batch_id: int
    next_offsets: dict[tuple[str, int], int]
    committed_at: datetime | None


def processed_offsets(checkpoint_location: str) -> ProcessedOffsets | None:
    """Read Spark's checkpoint: `commits/<n>` marks batch n done, `offsets/<n>` holds its end offsets (exclusive)
    as JSON on the line after the version and the batch metadata. None when no batch has been committed."""
    folder = local_path(checkpoint_location)
    if folder is None:
        return None
    try:
        committed = [int(name) for name in os.listdir(folder / "commits") if _BATCH_FILE.fullmatch(name)]
    except FileNotFoundError:
        return None
    for batch_id in sorted(committed, reverse=True):
        offsets_file = folder / "offsets" / str(batch_id)
        try:
            lines = offsets_file.read_text().splitlines()
            committed_at = datetime.fromtimestamp((folder / "commits" / str(batch_id)).stat().st_mtime, UTC)
        except OSError:
            continue  # cleaned up between listing and reading: an older batch still tells something
        next_offsets: dict[tuple[str, int], int] = {}
        for line in lines[2:]:
            try:
                source = json.loads(line)
            except ValueError:
                continue
            if isinstance(source, dict):
                for topic, partitions in source.items():
                    if isinstance(partitions, dict):
                        next_offsets.update({(topic, int(p)): int(o) for p, o in partitions.items()})
        return ProcessedOffsets(batch_id, next_offsets, committed_at)
    return None
