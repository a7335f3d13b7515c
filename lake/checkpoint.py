"""The streaming job's checkpoint: its name, where it lives, and the Kafka offsets it says were processed, read
from its files without Spark (for the API's lag, `doctor` and `audit`)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime

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
    folder = local_path(ingest_checkpoint(paths))
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
