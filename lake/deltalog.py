"""What a reader can learn from a Delta table's log without a query engine: its newest version and commit time, and
the data files a range of commits added, on a local disk or on S3."""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote

from lake import objectstore
from lake.settings import local_path

_COMMIT_FILE = re.compile(r"(\d{20})\.json")
# On S3 a known version is taken to exist, so that a table that did not change costs one request. Log cleanup can
# remove it once it is older than the table's log retention (30 days by default), after which the next version is
# not there either and a reader would never move on: whether it still exists is asked again at most this often.
_KNOWN_RECHECK_S = 60.0
_known_seen: dict[str, tuple[int, float]] = {}  # an S3 table's location: a version seen to exist, and when


@dataclass(frozen=True)
class TableVersion:
    """A Delta table's newest committed version and when it was committed (from its commitInfo)."""

    version: int
    committed_at: datetime | None


def latest_version(table_location: str, known: int | None = None) -> TableVersion | None:
    """The newest version in `_delta_log`, or None when the table does not exist (or is on another store than a
    local disk or S3). `known`, a version the caller saw before, is where the search starts.

    Commit files are asked for by name, from a version known to exist (the caller's, or the last checkpoint's)
    onwards, doubling the step, then halving it: a reader that knows the current version pays one lookup per table
    when nothing changed, however long the log. Listing the folder instead costs as much as the log is long (30
    days of commits by default, more than a million files for a commit every few seconds), and on S3 pages through
    all of it. A commit file appears whole (Delta writes it with an atomic rename or put-if-absent), so a version
    found is committed.
    """
    folder = local_path(table_location)
    if folder is not None:
        log = folder / "_delta_log"

        def exists(version: int) -> bool:
            return (log / f"{version:020d}.json").is_file()

        # A stat is cheap here: the known version is checked too, so that a table made anew with fewer versions
        # is not taken to be at the old one.
        start = known if known is not None and exists(known) else None
        found = _newest(exists, start, lambda: _local_checkpoint(log))
        if found is None and log.is_dir():  # neither version 0 nor a checkpoint pointer: list the folder once
            found = max(
                (int(m.group(1)) for name in os.listdir(log) if (m := _COMMIT_FILE.fullmatch(name))), default=None
            )
        return None if found is None else TableVersion(found, _commit_time(log / f"{found:020d}.json"))
    if not objectstore.is_s3(table_location):
        return None
    start = _remote_known(table_location, known)
    found = _newest(
        lambda version: _remote_exists(table_location, version), start, lambda: _last_checkpoint(table_location)
    )
    if found is None:
        return None
    if found != start:  # just seen to exist
        _known_seen[table_location] = (found, time.monotonic())
    return TableVersion(found, _remote_commit_time(table_location, found))


def _remote_known(table_location: str, known: int | None) -> int | None:
    """`known`, unless it was not seen lately and is no longer in the log (then None: start from the checkpoint)."""
    if known is None:
        return None
    seen = _known_seen.get(table_location)
    now = time.monotonic()
    if seen is not None and seen[0] == known and now - seen[1] < _KNOWN_RECHECK_S:
        return known
    if not _remote_exists(table_location, known):
        _known_seen.pop(table_location, None)
        return None
    _known_seen[table_location] = (known, now)
    return known


def _newest(exists: Callable[[int], bool], known: int | None, checkpoint: Callable[[], int | None]) -> int | None:
    """The newest version for which `exists`, searched from `known` (or else the last checkpoint's version, read
    only then, or 0) on: versions are contiguous, and the start is taken to exist."""
    start = known if known is not None else checkpoint()
    if start is None:
        start = 0
        if not exists(start):
            return None
    low, step = start, 1
    while exists(low + step):
        low, step = low + step, step * 2
    high = low + step  # does not exist
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if exists(middle) else (low, middle)
    return low


def _local_checkpoint(log: Path) -> int | None:
    try:
        return int(json.loads((log / "_last_checkpoint").read_bytes())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _commit_time(commit_file: Path) -> datetime | None:
    try:
        with commit_file.open("rb") as lines:  # commitInfo comes first: the rest of the file is not read
            found = _commit_time_of(lines)
    except OSError:
        found = None
    if found is not None:
        return found
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
        if not objectstore.is_s3(table_location):
            return None
        commit = _remote_commit(table_location, 0)
        return _commit_time_of(commit.splitlines()) if commit is not None else None
    first = folder / "_delta_log" / f"{0:020d}.json"
    return _commit_time(first) if first.is_file() else None


def exists(table_location: str) -> bool:
    """Whether a table on S3 has its first commit, or a checkpoint once old commits are cleaned up."""
    return _remote_exists(table_location, 0) or _last_checkpoint(table_location) is not None


def _log_file(table_location: str, version: int) -> str:
    return f"{objectstore.fs_path(table_location)}/_delta_log/{version:020d}.json"


def _remote_exists(table_location: str, version: int) -> bool:
    try:
        with objectstore.explained(table_location):
            objectstore.filesystem().open_input_file(_log_file(table_location, version))  # a HEAD request, no GET
    except FileNotFoundError:
        return False
    return True


def _remote_commit(table_location: str, version: int) -> bytes | None:
    try:
        with (
            objectstore.explained(table_location),
            objectstore.filesystem().open_input_stream(_log_file(table_location, version)) as commit,
        ):
            return commit.read()
    except FileNotFoundError:
        return None


def _last_checkpoint(table_location: str) -> int | None:
    location = f"{objectstore.fs_path(table_location)}/_delta_log/_last_checkpoint"
    try:
        with objectstore.explained(table_location), objectstore.filesystem().open_input_stream(location) as pointer:
            return int(json.loads(pointer.read())["version"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _remote_commit_time(table_location: str, version: int) -> datetime | None:
    """A commit file never changes once written: it is read once per version (with its commitInfo, which the
    watermark's readers want too), not at every refresh."""
    return _time_of(_remote_commit_info(table_location, version))


def _commit_time_of(lines: Iterable[bytes]) -> datetime | None:
    """The commitInfo timestamp among a commit file's lines (actions)."""
    return _time_of(_commit_info_of(lines))


def _time_of(info: dict | None) -> datetime | None:
    if info is None or "timestamp" not in info:
        return None
    return datetime.fromtimestamp(info["timestamp"] / 1000, UTC)


def commit_info(table_location: str, version: int) -> dict | None:
    """The commitInfo action of one commit (None when the commit file is gone, holds none, or the table lives on a
    store other than a local disk or S3). A commit file never changes once written, so S3's are read once."""
    folder = local_path(table_location)
    if folder is None:
        if not objectstore.is_s3(table_location):
            return None
        return _remote_commit_info(table_location, version)
    try:
        with (folder / "_delta_log" / f"{version:020d}.json").open("rb") as lines:
            return _commit_info_of(lines)
    except OSError:
        return None


@functools.lru_cache(maxsize=256)
def _remote_commit_info(table_location: str, version: int) -> dict | None:
    commit = _remote_commit(table_location, version)
    return _commit_info_of(commit.splitlines()) if commit is not None else None


def _commit_info_of(lines: Iterable[bytes]) -> dict | None:
    for line in lines:
        if b'"commitInfo"' not in line:
            continue
        try:
            action = json.loads(line)
        except ValueError:
            continue
        if isinstance(action.get("commitInfo"), dict):
            return action["commitInfo"]  # type: ignore[no-any-return]
    return None


@dataclass(frozen=True)
class DataFile:
    """A data file as DuckDB and pyarrow open it (a local path or an `s3://` URI), and its partition values as the
    log spells them (text, or None for null), which a partitioned table keeps in the log, not in the file."""

    location: str
    partition_values: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class AddedFiles:
    """The data files that commits after one version up to a later one added and that the later version still
    holds, oldest first; or, in `unfollowable`, why those files are not all that changed, so that the table must be
    read whole at the later version."""

    files: tuple[DataFile, ...]
    unfollowable: str | None = None


# Operations that rewrite files without deleting a row: every row they remove they add again, changed or not.
# A MERGE is one when its metrics say so (Spark's name, then delta-rs's).
_ROW_KEEPING = {"UPDATE"}
_MERGE_DELETED = ("numTargetRowsDeleted", "num_target_rows_deleted")


def added_files(table_location: str, after: int, through: int) -> AddedFiles:
    """The files of the rows that commits `after`+1 .. `through` added or changed; each commit file is read once.

    A file added and later removed in the range is left out (the file that replaced it holds its rows), and so are
    the files that a commit without data change (OPTIMIZE) added, unless they took the rows of a file added in the
    range. Unfollowable: a commit that deleted rows (a DELETE, a MERGE that deleted, an overwrite, a RESTORE) or
    one the log no longer holds (cleaned up after a checkpoint), a change of the table's metadata (its schema may
    have changed), and files whose rows are not all live (deletion vectors)."""
    live: dict[str, dict] = {}  # path: its add action, in the order added
    for version in range(after + 1, through + 1):
        commit = _commit_bytes(table_location, version)
        if commit is None:
            return AddedFiles((), f"commit {version} is no longer in the log")
        actions = [json.loads(line) for line in commit.splitlines() if line.strip()]
        reason = _unfollowable(actions)
        if reason is not None:
            return AddedFiles((), f"commit {version} {reason}")
        removed = [a["remove"]["path"] for a in actions if "remove" in a]
        adds = [a["add"] for a in actions if "add" in a]
        # A rewrite without data change moves rows between files: its files matter only where they took rows
        # this range added.
        takes_new_rows = any(path in live for path in removed)
        for path in removed:
            live.pop(path, None)
        for add in adds:
            if add.get("dataChange", True) or takes_new_rows:
                live[add["path"]] = add
    return AddedFiles(
        tuple(
            DataFile(_data_file(table_location, path), tuple(sorted((add.get("partitionValues") or {}).items())))
            for path, add in live.items()
        )
    )


def _unfollowable(actions: list[dict]) -> str | None:
    """Why a commit's adds are not all its changes, or None when they are."""
    info: dict = next((action["commitInfo"] for action in actions if "commitInfo" in action), {})
    operation = info.get("operation")
    # A change of table properties alone (`lakehouse maintain` keeping the watermark) changes no row or column.
    if any("metaData" in action for action in actions) and operation != "SET TBLPROPERTIES":
        return "changed the table's metadata"
    for action in actions:
        file = action.get("add") or action.get("remove") or {}
        if file.get("deletionVector"):
            return "carries deletion vectors"
    if operation == "RESTORE":  # it sets the table back to another version, whatever its actions
        return "is a RESTORE"
    if not any(action["remove"].get("dataChange", True) for action in actions if "remove" in action):
        return None  # appends, and rewrites without data change
    if operation in _ROW_KEEPING:
        return None
    if operation == "MERGE":
        metrics = info.get("operationMetrics") or {}
        deleted = next((metrics[name] for name in _MERGE_DELETED if name in metrics), None)
        if deleted is not None and int(deleted) == 0:
            return None
        return "is a MERGE that deleted rows" if deleted is not None else "is a MERGE without row metrics"
    return f"removed files ({operation or 'no commitInfo'})"


def _commit_bytes(table_location: str, version: int) -> bytes | None:
    folder = local_path(table_location)
    if folder is None:
        return _remote_commit(table_location, version) if objectstore.is_s3(table_location) else None
    try:
        return (folder / "_delta_log" / f"{version:020d}.json").read_bytes()
    except FileNotFoundError:
        return None


def _data_file(table_location: str, path: str) -> str:
    """A data file's location from its action's path: a URI-encoded path under the table, or an absolute URI."""
    if "://" in path or path.startswith("file:"):
        folder = local_path(path)
        return str(folder) if folder is not None else objectstore.s3_uri(path)
    folder = local_path(table_location)
    if folder is not None:
        return str(folder / unquote(path))
    return f"{objectstore.s3_uri(table_location).rstrip('/')}/{unquote(path)}"
