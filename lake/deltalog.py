"""What a reader can learn from a local Delta table's log without a query engine: its newest version and commit
time."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lake.settings import local_path

_COMMIT_FILE = re.compile(r"(\d{20})\.json")


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


def created_at(table_location: str) -> datetime | None:
    """When the table's first version was committed, or None when its log no longer holds version 0.

    A table made anew under the same path has another creation time even if it has already reached a higher
    version than a reader last saw, so readers that keep state across versions compare it."""
    folder = local_path(table_location)
    if folder is None:
        return None
    first = folder / "_delta_log" / f"{0:020d}.json"
    return _commit_time(first) if first.is_file() else None
