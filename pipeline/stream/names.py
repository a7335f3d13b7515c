"""The metric names the lake knows, and the guard against unbounded names (contract section 2: `metric_limit`).

The `metrics` table lists each name once, with when it was first seen. A micro-batch's names that the table lacks
are admitted while the lake knows fewer than LAKEHOUSE_MAX_METRICS, in name order, so that a batch run again after
a crash admits the same ones; readings of the names left over are quarantined as `metric_limit`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lake.tables import LakePaths, Table
from pipeline.stream.parse import Reason

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger("lakehouse.pipeline")


@dataclass(frozen=True)
class Admission:
    """What a batch's names come to: the new names the lake takes, and, when some are refused, every name a
    reading may carry (`allowed`; None when none is refused)."""

    admitted: tuple[str, ...]
    allowed: frozenset[str] | None


@dataclass
class KnownMetrics:
    """The lake's metric names as the `metrics` table holds them; read once, and again when a batch brings a new
    name (another writer, `lakehouse replay`, may have added names since)."""

    spark: SparkSession
    paths: LakePaths
    limit: int
    names: set[str] | None = field(default=None)

    def _read(self) -> set[str]:
        table = self.spark.read.format("delta").load(self.paths.table(Table.METRICS))
        self.names = {row[0] for row in table.select("metric").collect()}
        return self.names

    def admit(self, listed: list[str], readings: DataFrame) -> Admission:
        """The batch's new names to admit. `listed`: the batch's distinct names, up to `limit` + 1 of them (more
        than `limit` means the list may be incomplete)."""
        from pyspark.sql import functions as F

        known = self.names if self.names is not None else self._read()
        if all(name in known for name in listed):
            return Admission((), None)
        known = self._read()
        new = sorted(name for name in listed if name not in known)
        if not new:
            return Admission((), None)
        room = max(0, self.limit - len(known))
        if len(listed) > self.limit:
            # The list may lack some names: the `room` smallest new ones, read from the batch in name order.
            smallest = (
                readings.select("metric")
                .distinct()
                .where(~F.col("metric").isin(*known))
                .orderBy("metric")
                .limit(room + 1)
                .collect()
            )
            new = [row[0] for row in smallest]
            refused = True
        else:
            refused = len(new) > room
        admitted = tuple(new[:room])
        if refused:
            log.warning(
                "the lake knows %d metric names (LAKEHOUSE_MAX_METRICS=%d): readings of new names are quarantined "
                "as %s",
                len(known) + len(admitted),
                self.limit,
                Reason.METRIC_LIMIT.value,
            )
        return Admission(admitted, frozenset(known) | frozenset(admitted) if refused else None)

    def record(self, admitted: tuple[str, ...]) -> DataFrame:
        """The rows that add these names to the `metrics` table."""
        from pyspark.sql import functions as F

        if self.names is not None:
            self.names.update(admitted)
        rows = self.spark.createDataFrame([(name,) for name in admitted], "metric STRING")
        return rows.withColumn("first_seen", F.current_timestamp())


def refuse(parsed: DataFrame, allowed: frozenset[str], limit: int) -> DataFrame:
    """The parsed rows with every reading of a name outside `allowed` turned into a `metric_limit` quarantine row,
    whose raw payload is the reading's quantity as JSON (the message may be 5 MiB, and hold many such readings)."""
    from pyspark.sql import functions as F

    over = F.col("reason_code").isNull() & ~F.col("metric").isin(*sorted(allowed))
    reading = F.to_json(
        F.struct(
            "device_id",
            F.date_format(F.col("timestamp"), "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX").alias("timestamp"),
            "metric",
            "value",
        )
    )
    message = F.concat(
        F.lit("metric "),
        F.col("metric"),
        F.lit(
            f" is new, and the lake knows LAKEHOUSE_MAX_METRICS={limit} names already; raise the setting, then "
            "`lakehouse replay` the row"
        ),
    )
    flagged = parsed.withColumn(_OVER, over)
    over = F.col(_OVER)
    changed = {
        "raw": reading,
        "reason": message,
        "reason_code": F.lit(Reason.METRIC_LIMIT.value),
        "device_id": F.lit(None),
        "value": F.lit(None),
        "timestamp": F.lit(None),
    }
    columns = [
        F.when(over, changed[c]).otherwise(F.col(f"`{c}`")).alias(c) if c in changed else F.col(f"`{c}`")
        for c in parsed.columns
    ]
    return flagged.select(*columns)


_OVER = "_over_metric_limit"
