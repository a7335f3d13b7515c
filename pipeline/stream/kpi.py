"""KPIs per metric and UTC second (contract section 4), recomputed from silver for the seconds a micro-batch
touched (every metric of them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame


def fingerprint() -> Column:
    """The sum of a 32-bit hash of each reading: equal for the same readings in any order (integer sums are exact),
    so a recompute whose floating-point rounding differs is not taken for a change. The metric is not hashed: a
    bucket holds one metric's readings, and a lake upgraded from before metrics keeps its buckets' fingerprints."""
    from pyspark.sql import functions as F

    return F.sum(F.hash("device_id", "timestamp", "value").cast("bigint"))


def late_for(grain: str) -> Column:
    """How many readings arrived when their bucket of `grain` was final already (lake.watermark)."""
    from pyspark.sql import functions as F

    end = F.date_trunc(grain, "timestamp") + F.expr(f"INTERVAL 1 {grain.upper()}")
    return F.count_if(F.col("arrival_watermark") >= end)


# The column `centred` adds: the mean of the reading's group, rounded once.
CENTRE = "group_mean"
# The column `centred_by_hash` adds too: a 64-bit hash of the group's keys.
GROUP_KEY = "group_key"


def centred(readings: DataFrame, *keys: Column) -> DataFrame:
    """The readings with their group's mean beside each (column CENTRE), for `contract_kpis(centre=...)`.

    Spark's `stddev_samp` updates a running mean reading by reading, and each update rounds it to the ulp of the
    values: at 1e8 that is 1.5e-8, which in a second of a meter at 1e8 +- 1 left the standard deviation 8e-8 off,
    where the contract allows 1e-9. The deviations from a mean computed first are small numbers whose own mean is
    about zero: their standard deviation loses nothing (the variance of x - c is that of x for any constant c), and
    x - c is exact when x and c are within a factor of two (Sterbenz)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    return readings.withColumn(CENTRE, F.avg("value").over(Window.partitionBy(*keys)))


def centred_by_hash(readings: DataFrame, *keys: Column) -> DataFrame:
    """`centred`, its window partitioned by a 64-bit hash of the keys (column GROUP_KEY): group by it first, then
    by the keys, and the aggregation reuses the window's partitioning (no second shuffle).

    One long sort key, which Spark sorts by radix, where a metric and a second sorted row by row, comparing
    strings (gold's KPIs of 6 million readings: 7.4 s against 10.6 s, medians of three). Any constant serves as a
    centre, so a collision of two groups' hashes (about one in 30 million for a batch of a million groups) only
    centres both on their joint mean: exact still, rounded as without a centre when their values lie far apart.

    A radix sort needs twice the pointer memory: the rollups' device minutes, computed beside gold in the same JVM,
    ran out of execution memory with it, and keep `centred`."""
    from pyspark.sql import functions as F

    return centred(readings.withColumn(GROUP_KEY, F.xxhash64(*keys)), F.col(GROUP_KEY))


def contract_kpis(centre: str | None = None) -> list[Column]:
    """The contract's KPIs of a group of readings (device_id, value), named as gold's columns; with `centre` (the
    column `centred` adds), the standard deviation is taken of the deviations from it, exact to rounding wherever
    the values sit (see `centred`)."""
    from pyspark.sql import functions as F

    deviation = F.col("value") - F.col(centre) if centre is not None else F.col("value")
    return [
        F.count("*").alias("reading_count"),
        F.count_distinct("device_id").alias("device_count"),
        F.avg("value").alias("average_value"),
        F.min("value").alias("min_value"),
        F.max("value").alias("max_value"),
        F.sum("value").alias("sum_value"),
        # stddev_samp is null for one reading, as the contract wants.
        F.stddev_samp(deviation).alias("stddev_value"),
    ]


def kpis_per_second(readings: DataFrame, *more: Column) -> DataFrame:
    """Gold rows for deduplicated readings (device_id, metric, timestamp, value, arrival_watermark), one per metric
    and second, at revision 0 (a MERGE that updates a row counts its revisions); `more` are aggregates of the
    readings put beside them."""
    from pyspark.sql import functions as F

    second = F.date_trunc("second", "timestamp")
    return (
        centred_by_hash(readings, F.col("metric"), second)
        .groupBy(GROUP_KEY, "metric", second.alias("timestamp"))
        .agg(
            *contract_kpis(CENTRE),
            fingerprint().alias("fingerprint"),
            late_for("second").alias("late_readings"),
            *more,
        )
        .drop(GROUP_KEY)
        .withColumn("updated_at", F.current_timestamp())
        .withColumn("revision", F.lit(0).cast("bigint"))
    )


def whole_seconds(silver: DataFrame, lo_literal: str, hi_literal: str) -> DataFrame:
    """Silver's readings in the seconds from `lo`'s to `hi`'s: literal bounds, so Delta skips the other files.

    Whole seconds: a touched second also holds older readings before the batch's earliest timestamp."""
    return silver.where(
        f"`timestamp` >= date_trunc('second', {lo_literal}) "
        f"AND `timestamp` < date_trunc('second', {hi_literal}) + INTERVAL 1 SECOND"
    )


def in_seconds(silver: DataFrame, seconds: list[int], lo_literal: str, hi_literal: str) -> DataFrame:
    """Silver's readings in the given seconds (Unix microseconds), all of them between `lo`'s and `hi`'s."""
    from pyspark.sql import functions as F

    return whole_seconds(silver, lo_literal, hi_literal).where(
        F.unix_micros(F.date_trunc("second", "timestamp")).isin(seconds)
    )


def kpis_for_seconds(silver: DataFrame, seconds: DataFrame, lo_literal: str, hi_literal: str) -> DataFrame:
    """Recompute the KPIs of the given seconds (a `second` column) from all of silver's readings in them."""
    from pyspark.sql import functions as F

    in_range = whole_seconds(silver, lo_literal, hi_literal)
    touched = in_range.join(
        F.broadcast(seconds), F.date_trunc("second", in_range["timestamp"]) == seconds["second"], "left_semi"
    )
    return kpis_per_second(touched)


def kpis_after_merge(
    silver: DataFrame, latest: DataFrame, seconds: list[int], lo_literal: str, hi_literal: str
) -> DataFrame:
    """The KPIs of the given seconds (Unix microseconds, between `lo`'s and `hi`'s) as silver will hold them once
    the batch's newest reading per identity (`latest`) is MERGEd into it by `dedupe.newer_and_different`: a stored
    reading stays unless the batch's is a later record with another value. Beside them, `held`: whether silver
    held a reading in the second before."""
    from pyspark.sql import functions as F

    from pipeline.stream import dedupe

    columns = ("device_id", "metric", "timestamp", "value", "arrival_watermark", *dedupe.ORDER)
    t = in_seconds(silver, seconds, lo_literal, hi_literal).select(*columns).alias("t")
    s = latest.select(*columns).alias("s")
    on = [F.col(f"t.{c}") == F.col(f"s.{c}") for c in dedupe.IDENTITY]
    joined = t.join(s, on, "full_outer")
    batch_wins = F.col("t.device_id").isNull() | (
        F.col("s.device_id").isNotNull() & F.expr(dedupe.newer_and_different())
    )
    after = joined.select(
        *[F.when(batch_wins, F.col(f"s.{c}")).otherwise(F.col(f"t.{c}")).alias(c) for c in columns[:5]],
        F.col("t.device_id").isNotNull().alias("held"),
    )
    return kpis_per_second(after, F.max("held").alias("held"))


# A recomputed second differs from the stored one: other readings, or the same ones arriving late. A stored row
# from before fingerprints were kept (null) takes the recompute once.
GOLD_CHANGED = "NOT (t.reading_count <=> s.reading_count AND t.fingerprint <=> s.fingerprint AND t.late_readings <=> s.late_readings)"


def gold_merge_condition(lo_literal: str, hi_literal: str) -> str:
    return (
        "t.metric = s.metric AND t.`timestamp` = s.`timestamp` "
        f"AND t.`timestamp` >= date_trunc('second', {lo_literal}) AND t.`timestamp` <= {hi_literal}"
    )
