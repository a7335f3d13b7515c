"""Offsets Kafka lost before the pipeline read them (retention), found per micro-batch and kept in quarantine.

Spark's Kafka source, with `failOnDataLoss=false`, skips to the earliest offset Kafka still holds and only logs
it. The gap is found here by comparing each partition's first offset in a batch with the last one in bronze.

Not every offset holds a record the pipeline reads: a transaction's commit or abort marker takes one, and a
`read_committed` reader skips the records of aborted transactions. Those gaps are not losses: an offset Kafka still
holds (at or above the partition's earliest) was skipped for that reason, and only the offsets below the earliest
are lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

REASON_CODE = "offsets_lost"


@dataclass(frozen=True)
class Gap:
    topic: str
    partition: int
    first_lost: int
    last_lost: int

    @property
    def reason(self) -> str:
        return (
            f"offsets {self.first_lost}..{self.last_lost} of {self.topic} partition {self.partition} "
            f"({self.last_lost - self.first_lost + 1} records) were deleted by Kafka before the pipeline read them"
        )


class OffsetTracker:
    """The last offset processed per (topic, partition): read from bronze once, then carried batch to batch."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, int], int] | None = None

    def gaps(
        self,
        spark: SparkSession,
        bronze_path: str,
        batch_offsets: DataFrame,
        earliest: Callable[[], dict[tuple[str, int], int]],
    ) -> list[Gap]:
        """`batch_offsets` has topic, partition, first, last of one batch (its records may already be in bronze
        when Spark re-runs the batch, so bronze is read below each partition's first offset). `earliest()` gives
        the earliest offset Kafka holds per partition; it is asked only when offsets are missing."""
        from pyspark.sql import functions as F

        ranges = {(r.topic, r.partition): (r.first, r.last) for r in batch_offsets.collect()}
        if self._last is None:
            bronze = spark.read.format("delta").load(bronze_path)
            # A partition whose every record retention removed goes on from the retention line.
            self._last = {key: line for key, line in _retention_lines(bronze_path).items() if key in ranges}
            for (topic, partition), (first, _) in ranges.items():
                row = (
                    bronze.where(
                        (F.col("topic") == topic) & (F.col("partition") == partition) & (F.col("offset") < first)
                    )
                    .agg(F.max("offset"))
                    .first()
                )
                if row is not None and row[0] is not None:
                    self._last[(topic, partition)] = max(row[0], self._last.get((topic, partition), row[0]))
        skipped = []
        for key, (first, last) in sorted(ranges.items()):
            previous = self._last.get(key)
            if previous is not None and first > previous + 1:
                skipped.append(Gap(key[0], key[1], previous + 1, first - 1))
            self._last[key] = max(last, previous or last)
        if not skipped:
            return []
        held_from = earliest()
        found = []
        for gap in skipped:
            # A partition Kafka does not list any more: taken as lost.
            kept = held_from.get((gap.topic, gap.partition), gap.last_lost + 1)
            if kept > gap.first_lost:  # below Kafka's earliest: deleted before the pipeline read them
                found.append(Gap(gap.topic, gap.partition, gap.first_lost, min(gap.last_lost, kept - 1)))
        return found


def _retention_lines(bronze_path: str) -> dict[tuple[str, int], int]:
    """Per partition the highest offset retention removed from bronze; none where delta-rs cannot open the table
    (stores other than a local disk and S3 need delta-rs settings of their own)."""
    from lake.deltars import open_table
    from lake.errors import LakeError
    from lake.retention import state_of

    try:
        return state_of(open_table(bronze_path)).lines()
    except LakeError:
        return {}
