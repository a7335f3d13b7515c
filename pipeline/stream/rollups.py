"""The `rollups` table: KPIs per metric, per device and of the whole fleet, per minute, hour and day.

Each bucket is exact, not an approximation of its readings:
- a device's minute is computed from its readings in silver, its standard deviation from the deviations from the
  minute's mean (`kpi.centred`);
- a coarser bucket combines the finer buckets inside it with count, mean and M2 (the sum of squared deviations from
  the mean): M2 = sum of the parts' M2 + sum of n_i * (mean_i - mean)^2, the parallel form of Welford's update, whose
  terms are all non-negative so nothing cancels;
- a fleet bucket combines the device buckets of the same grain, one per device, so its `device_count` is the number
  of distinct devices with readings in it.

A part's mean rounded to a double is 1.5e-8 off at 1e8, which for a meter at 1e8 +- 1 is a tenth of a percent of a
mean_i - mean of some hundredths: the hour's standard deviation came out 5e-9 off where the contract allows 1e-9.
So each row keeps beside its rounded `average_value` the rest of its mean, `mean_residual` = sum(value -
average_value), and buckets combine on mean_i - c (c: one part's rounded mean, so the difference is exact) plus the
residual's share: the means as two doubles. A row written before the residual was kept counts it as 0.

A micro-batch recomputes only the buckets its readings fall into: its device-minutes from silver, then each coarser
bucket from the stored finer buckets it holds with the fresh ones in place of theirs. Everything goes into the table
with one MERGE, exactly once per batch like gold's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lake.tables import KPI_FIELDS

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

_FINER = {"hour": "minute", "day": "hour"}
COLUMNS = (
    "grain",
    "metric",
    "device_id",
    "timestamp",
    *KPI_FIELDS,
    "m2_value",
    "mean_residual",
    "updated_at",
    "fingerprint",
    "revision",
    "late_readings",
    "late_for_hour",
    "late_for_day",
)
# A batch of readings within this time span (Unix microseconds; a live stream's, every 30 s by default) reads the
# stored buckets it needs once (`for_batch`'s `read_stored_once`).
ONE_READ_SPAN_US = 3600 * 1_000_000
# The column of finer rows that counts the readings late for a bucket of each grain.
_LATE_FOR = {"minute": "late_readings", "hour": "late_for_hour", "day": "late_for_day"}


def _stddev(count: Column, m2: Column) -> Column:
    from pyspark.sql import functions as F

    # Sample standard deviation, null for a bucket of one reading as the contract wants.
    return F.when(count > 1, F.sqrt(F.greatest(m2, F.lit(0.0)) / (count - 1)))


def device_minutes(readings: DataFrame) -> DataFrame:
    """One row per device, metric and minute of deduplicated readings (device_id, metric, timestamp, value,
    arrival_watermark)."""
    from pyspark.sql import functions as F

    from pipeline.stream.kpi import CENTRE, centred, fingerprint, late_for

    count = F.count("*")
    minute = F.date_trunc("minute", "timestamp")
    # Deviations from the minute's mean: small numbers, whose sums and variance are exact to rounding.
    deviation = F.col("value") - F.col(CENTRE)
    rows = (
        centred(readings, F.col("device_id"), F.col("metric"), minute)
        .groupBy("device_id", "metric", minute.alias("timestamp"))
        .agg(
            count.alias("reading_count"),
            F.lit(1).cast("bigint").alias("device_count"),
            F.first(CENTRE).alias("centre"),
            F.sum(deviation).alias("deviation_sum"),
            F.min("value").alias("min_value"),
            F.max("value").alias("max_value"),
            F.sum("value").alias("sum_value"),
            F.stddev_samp(deviation).alias("stddev_value"),
            (F.var_pop(deviation) * count).alias("m2_value"),
            fingerprint().alias("fingerprint"),
            late_for("minute").alias("late_readings"),
            late_for("hour").alias("late_for_hour"),
            late_for("day").alias("late_for_day"),
        )
        .withColumn("average_value", F.col("centre") + F.col("deviation_sum") / F.col("reading_count"))
    )
    return (
        rows.withColumn("mean_residual", _residual(F.col("deviation_sum"), F.col("reading_count"), F.col("centre")))
        .withColumn("grain", F.lit("minute"))
        .withColumn("updated_at", F.current_timestamp())
        .withColumn("revision", F.lit(0).cast("bigint"))
        .select(*COLUMNS)
    )


def _residual(shifted_sum: Column, count: Column, centre: Column) -> Column:
    """sum(value - average_value) of a bucket from sum(value - centre): the part of the mean its rounded
    `average_value` lacks, times the count (average_value - centre is exact: the two are close)."""
    from pyspark.sql import functions as F

    return shifted_sum - count * (F.col("average_value") - centre)


def combine(parts: DataFrame, grain: str, per_device: bool) -> DataFrame:
    """Buckets of `grain` (per device, or of the fleet) from device buckets of a finer grain or the same one."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    keys = [F.col("metric"), F.date_trunc(grain, "timestamp").alias("timestamp")]
    if per_device:
        keys.insert(0, F.col("device_id"))
    bucket = parts.select(
        *keys,
        F.col("device_id").alias("part_device"),
        "reading_count",
        "sum_value",
        "average_value",
        "min_value",
        "max_value",
        "m2_value",
        F.coalesce("mean_residual", F.lit(0.0)).alias("mean_residual"),
        "fingerprint",
        "late_readings",
        "late_for_hour",
        "late_for_day",
    )
    by = ["device_id", "metric", "timestamp"] if per_device else ["metric", "timestamp"]
    window = Window.partitionBy(*by)
    n = F.col("reading_count")
    # Each part's mean less c (one part's rounded mean, the same for the whole bucket): the difference of two close
    # doubles is exact, and the residual adds the digits the rounded mean lacks.
    offset = (F.col("average_value") - F.col("centre")) + F.col("mean_residual") / n
    with_offset = bucket.withColumn("centre", F.min("average_value").over(window)).withColumn("offset", offset)
    bucket_offset = F.sum(n * F.col("offset")).over(window) / F.sum(n).over(window)
    spread = n * F.pow(F.col("offset") - F.col("bucket_offset"), 2)
    count, m2 = F.sum("reading_count"), F.sum(F.col("m2_value") + spread)
    combined = (
        with_offset.withColumn("bucket_offset", bucket_offset)
        .groupBy(*by)
        .agg(
            count.alias("reading_count"),
            F.count_distinct("part_device").alias("device_count"),
            F.first("centre").alias("centre"),
            F.sum(n * F.col("offset")).alias("offset_sum"),
            F.min("min_value").alias("min_value"),
            F.max("max_value").alias("max_value"),
            F.sum("sum_value").alias("sum_value"),
            _stddev(count, m2).alias("stddev_value"),
            m2.alias("m2_value"),
            F.sum("fingerprint").alias("fingerprint"),
            F.sum(_LATE_FOR[grain]).alias("late_readings"),
            (F.sum("late_for_hour") if grain != "day" else F.lit(None).cast("bigint")).alias("late_for_hour"),
            F.sum("late_for_day").alias("late_for_day"),
        )
        .withColumn("average_value", F.col("centre") + F.col("offset_sum") / F.col("reading_count"))
        .withColumn("mean_residual", _residual(F.col("offset_sum"), F.col("reading_count"), F.col("centre")))
        .withColumn("grain", F.lit(grain))
        .withColumn("updated_at", F.current_timestamp())
        .withColumn("revision", F.lit(0).cast("bigint"))
    )
    if not per_device:
        combined = combined.withColumn("device_id", F.lit(None).cast("string"))
    return combined.select(*COLUMNS)


def from_readings(readings: DataFrame) -> DataFrame:
    """Every rollup row of a set of readings (all of silver, for a rebuild)."""
    minutes = device_minutes(readings)
    hours = combine(minutes, "hour", per_device=True)
    days = combine(hours, "day", per_device=True)
    fleet = [combine(rows, grain, per_device=False) for rows, grain in ((minutes, "minute"), (hours, "hour"))]
    return (
        minutes.unionByName(hours)
        .unionByName(days)
        .unionByName(fleet[0])
        .unionByName(fleet[1])
        .unionByName(combine(days, "day", per_device=False))
    )


def _replaced(stored: DataFrame, fresh: DataFrame) -> DataFrame:
    """Stored device buckets with the fresh ones in place of theirs."""
    keys = ["device_id", "metric", "timestamp"]
    kept = stored.join(fresh.select(*keys), keys, "left_anti")
    return kept.unionByName(fresh)


def for_batch(
    silver: DataFrame, stored: DataFrame, readings: DataFrame, lo: str, hi: str, read_stored_once: bool = False
) -> DataFrame:
    """The rollup rows the batch's readings change, recomputed from silver (which holds them already) and from the
    stored rollups (`stored`: the table as it was before this batch) for everything coarser.

    With `read_stored_once` (for a batch of a short time range: a live stream's), the stored device buckets all
    steps read are read from the table once and kept (each read of a Delta table filters its files and plans a scan
    anew): for a batch within an hour, at most about 170 rows per device of the fleet (the fleet's buckets need
    every device's), spilled to disk past the memory Spark has for them. A batch of a long range (a replay's)
    reads them step by step, so as not to keep a device's every minute."""
    from pyspark.sql import functions as F

    def span(grain: str) -> tuple[str, str]:
        """The batch's time range widened to whole buckets of `grain`."""
        return f"date_trunc('{grain}', {lo})", f"date_trunc('{grain}', {hi}) + INTERVAL 1 {grain.upper()}"

    minute_lo, minute_hi = span("minute")
    touched = readings.select("device_id", "metric", F.date_trunc("minute", "timestamp").alias("minute")).distinct()
    # Whole minutes: a touched minute also holds the device's earlier readings.
    in_minutes = silver.where(f"`timestamp` >= {minute_lo} AND `timestamp` < {minute_hi}").select(
        "device_id", "metric", "timestamp", "value", "arrival_watermark"
    )
    keyed = in_minutes.withColumn("minute", F.date_trunc("minute", "timestamp"))
    minutes = device_minutes(
        keyed.join(F.broadcast(touched), ["device_id", "metric", "minute"], "left_semi")
    ).localCheckpoint()

    def within(grain: str, coarser: str) -> str:
        """Device buckets of `grain` inside the batch's buckets of grain `coarser`."""
        start, end = span(coarser)
        return f"grain = '{grain}' AND device_id IS NOT NULL AND `timestamp` >= {start} AND `timestamp` < {end}"

    if read_stored_once:  # per device: its minutes in the batch's hours, its hours and its day in the batch's days
        needed = [("minute", "hour"), ("hour", "day"), ("day", "day")]
        stored = stored.where(" OR ".join(f"({within(g, c)})" for g, c in needed)).localCheckpoint()

    def stored_devices(grain: str, coarser: str) -> DataFrame:
        return stored.where(within(grain, coarser))

    def touching(rows: DataFrame, changed: DataFrame, grain: str, per_device: bool) -> DataFrame:
        """Rows that lie in a bucket of `grain` holding one of the changed rows (of the same metric, and of the same
        device if per device)."""
        keys = ["device_id", "metric", "bucket"] if per_device else ["metric", "bucket"]
        marks = changed.select(*keys[:-1], F.date_trunc(grain, "timestamp").alias("bucket")).distinct()
        return (
            rows.withColumn("bucket", F.date_trunc(grain, "timestamp"))
            .join(F.broadcast(marks), keys, "left_semi")
            .drop("bucket")
        )

    changes = [minutes]
    finer, fresh = minutes, minutes
    for grain in ("hour", "day"):
        context = _replaced(stored_devices(_FINER[grain], grain), fresh)
        fresh = combine(touching(context, fresh, grain, per_device=True), grain, per_device=True).localCheckpoint()
        changes.append(fresh)
        # The fleet's buckets of the finer grain: every device's bucket in them.
        changes.append(combine(touching(context, finer, _FINER[grain], per_device=False), _FINER[grain], False))
        finer = fresh
    days = _replaced(stored_devices("day", "day"), fresh)
    changes.append(combine(touching(days, fresh, "day", per_device=False), "day", per_device=False))
    result = changes[0]
    for frame in changes[1:]:
        result = result.unionByName(frame)
    return result


# A recomputed bucket differs from the stored one: other readings, or other late counts (a rounding difference
# alone is no change, see kpi.fingerprint).
CHANGED = (
    "NOT (" + " AND ".join(f"t.{c} <=> s.{c}" for c in ("reading_count", "fingerprint", *_LATE_FOR.values())) + ")"
)


def merge_condition(lo: str, hi: str) -> str:
    """Key match, with literal time bounds so that Delta skips files outside the batch's days."""
    return (
        "t.grain = s.grain AND t.metric = s.metric AND t.device_id <=> s.device_id AND t.`timestamp` = s.`timestamp` "
        f"AND t.`timestamp` >= date_trunc('day', {lo}) AND t.`timestamp` <= {hi}"
    )
