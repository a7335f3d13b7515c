"""The streaming job's checkpoint: its name, where it lives, and the Kafka offsets it says were processed, read
from its files without Spark, on a local disk or S3 (for the API's lag, `doctor` and `audit`)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from lake import objectstore
from lake.settings import local_path
from lake.tables import LakePaths

# The streaming queries' names, which are also the folders of their checkpoints under the checkpoint root: the
# ingest query (Kafka -> bronze, quarantine, silver, gold) and the rollups query (silver's new commits -> rollups).
INGEST_QUERY = "ingest"
ROLLUPS_QUERY = "rollups"
_BATCH_FILE = re.compile(r"\d+")


def ingest_checkpoint(paths: LakePaths) -> str:
    """Where the ingest query keeps its checkpoint (a folder or a URI)."""
    return paths.checkpoint(INGEST_QUERY)


@dataclass(frozen=True)
class ProcessedOffsets:
    """The next offset to read per (topic, partition), after the newest micro-batch the checkpoint committed."""

    batch_id: int
    next_offsets: dict[tuple[str, int], int]
    committed_at: datetime | None


def processed_offsets(paths: LakePaths) -> ProcessedOffsets | None:
    """Read Spark's checkpoint: `commits/<n>` marks batch n done, `offsets/<n>` holds its end offsets (exclusive)
    as JSON on the line after the version and the batch metadata. None when no batch has been committed."""
    location = ingest_checkpoint(paths)
    folder = local_path(location)
    if folder is None:
        return _remote_processed_offsets(location) if objectstore.is_s3(location) else None
    try:
        committed = [int(name) for name in os.listdir(folder / "commits") if _BATCH_FILE.fullmatch(name)]
    except FileNotFoundError:
        return None
    for batch_id in sorted(committed, reverse=True):
        offsets_file = folder / "offsets" / str(batch_id)
        try:
            text = offsets_file.read_text()
            committed_at = datetime.fromtimestamp((folder / "commits" / str(batch_id)).stat().st_mtime, UTC)
        except OSError:
            continue  # cleaned up between listing and reading: an older batch still tells something
        return ProcessedOffsets(batch_id, _next_offsets(text), committed_at)
    return None


def _remote_processed_offsets(location: str) -> ProcessedOffsets | None:
    """The same from a checkpoint on S3: one listing of `commits/` (Spark keeps the last 100 batches) and one read."""
    from pyarrow.fs import FileSelector

    store = objectstore.filesystem()
    root = objectstore.fs_path(location)
    with objectstore.explained(location):
        listed = store.get_file_info(FileSelector(f"{root}/commits", allow_not_found=True))
    committed = {int(name): info for info in listed if _BATCH_FILE.fullmatch(name := info.base_name)}
    for batch_id in sorted(committed, reverse=True):
        try:
            with objectstore.explained(location), store.open_input_stream(f"{root}/offsets/{batch_id}") as offsets:
                text = offsets.read().decode()
        except FileNotFoundError:
            continue
        modified = committed[batch_id].mtime
        committed_at = modified.astimezone(UTC) if isinstance(modified, datetime) else None
        return ProcessedOffsets(batch_id, _next_offsets(text), committed_at)
    return None


def _next_offsets(offsets_file: str) -> dict[tuple[str, int], int]:
    next_offsets: dict[tuple[str, int], int] = {}
    for line in offsets_file.splitlines()[2:]:
        try:
            source = json.loads(line)
        except ValueError:
            continue
        if isinstance(source, dict):
            for topic, partitions in source.items():
                if isinstance(partitions, dict):
                    next_offsets.update({(topic, int(p)): int(o) for p, o in partitions.items()})
    return next_offsets
