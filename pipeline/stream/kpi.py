"""KPIs per UTC second (contract section 4), recomputed from silver for the seconds a micro-batch touched."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


def kpis_per_second(readings: DataFrame) -> DataFrame:
    """Gold rows for deduplicated readings (device_id, timestamp, value)."""
    from pyspark.sql import functions as F

    return (
        readings.groupBy(F.date_trunc("second", "timestamp").alias("timestamp"))
        .agg(
            F.count("*").alias("reading_count"),
            F.count_distinct("device_id").alias("device_count"),
            F.avg("value").alias("average_value"),
            F.min("value").alias("min_value"),
            F.max("value").alias("max_value"),
            F.sum("value").alias("sum_value"),
            # stddev_samp is null for one reading, as the contract wants.
            F.stddev_samp("value").alias("stddev_value"),
        )
        .withColumn("updated_at", F.current_timestamp())
    )


def whole_seconds(silver: DataFrame, lo_literal: str, hi_literal: str) -> DataFrame:
    """Silver's readings in the seconds from `lo`'s to `hi`'s: literal bounds, so Delta skips the other files.

    Whole seconds: a touched second also holds older readings before the batch's earliest timestamp."""
    return silver.where(
        f"`timestamp` >= date_trunc('second', {lo_literal}) "
        f"AND `timestamp` < date_trunc('second', {hi_literal}) + INTERVAL 1 SECOND"
    )


def kpis_for_seconds(silver: DataFrame, seconds: DataFrame, lo_literal: str, hi_literal: str) -> DataFrame:
    """Recompute the KPIs of the given seconds (a `second` column) from all of silver's readings in them."""
    from pyspark.sql import functions as F

    in_range = whole_seconds(silver, lo_literal, hi_literal)
    touched = in_range.join(
        F.broadcast(seconds), F.date_trunc("second", in_range["timestamp"]) == seconds["second"], "left_semi"
    )
    return kpis_per_second(touched)


GOLD_CHANGED = (
    "NOT (t.reading_count <=> s.reading_count AND t.device_count <=> s.device_count "
    "AND t.sum_value <=> s.sum_value AND t.min_value <=> s.min_value AND t.max_value <=> s.max_value "
    "AND t.stddev_value <=> s.stddev_value)"
)


def gold_merge_condition(lo_literal: str, hi_literal: str) -> str:
    return (
        "t.`timestamp` = s.`timestamp` "
        f"AND t.`timestamp` >= date_trunc('second', {lo_literal}) AND t.`timestamp` <= {hi_literal}"
    )
