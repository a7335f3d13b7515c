"""Reading identity and which record wins (contract section 3), and the idempotent MERGE into silver."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lake.upgrade import silver_metric

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pyarrow as pa
    from pyspark.sql import DataFrame

IDENTITY = ("device_id", "metric", "timestamp")
# Which of two records of one identity is the later (contract section 3):
# - within one partition, the offset, then the index inside the message: Kafka's own order, whatever the topic's
#   timestamp type (a `CreateTime` record carries its producer's clock, which may be hours behind) and whatever
#   the broker's clock did;
# - between partitions, which Kafka does not order, the Kafka timestamp, then partition, offset and index.
# Every column the rule reads; `newer` and `latest_per_identity` apply it.
ORDER = ("topic", "partition", "offset", "reading_index", "kafka_timestamp")
_IN_PARTITION = ("offset", "reading_index")
_ACROSS_PARTITIONS = ("kafka_timestamp", "topic", "partition", "offset", "reading_index")
SILVER_COLUMNS = (
    "device_id",
    "metric",
    "timestamp",
    "value",
    "topic",
    "partition",
    "offset",
    "reading_index",
    "kafka_timestamp",
    "updated_at",
    "arrival_watermark",
)


def _key(columns: tuple[str, ...], alias: str | None = None) -> str:
    prefix = f"{alias}." if alias else ""
    return "struct(" + ", ".join(f"{prefix}`{c}`" for c in columns) + ")"


def newer(s: str, t: str) -> str:
    """SQL: the record of alias `s` is later than that of alias `t` (both of one identity)."""
    same_partition = f"{s}.topic = {t}.topic AND {s}.`partition` = {t}.`partition`"
    return (
        f"CASE WHEN {same_partition} THEN {_key(_IN_PARTITION, s)} > {_key(_IN_PARTITION, t)} "
        f"ELSE {_key(_ACROSS_PARTITIONS, s)} > {_key(_ACROSS_PARTITIONS, t)} END"
    )


def latest_per_identity(readings: DataFrame) -> DataFrame:
    """One row per identity: its latest reading by `newer`. Each partition's latest by offset first, then the latest
    of those by Kafka timestamp: a single key over both would let a record's clock beat a later offset of its own
    partition."""
    from pyspark.sql import functions as F

    columns = [c for c in SILVER_COLUMNS if c not in IDENTITY and c != "updated_at"]
    row = F.struct(*[F.col(f"`{c}`") for c in columns])

    def latest(frame: DataFrame, keys: tuple[str, ...], order: tuple[str, ...]) -> DataFrame:
        winner = F.max_by(row, F.expr(_key(order))).alias("winner")
        return frame.groupBy(*keys).agg(winner).select(*IDENTITY, *[F.col(f"winner.`{c}`").alias(c) for c in columns])

    # Hash-partitioned by identity once, both aggregations find their rows together: one shuffle, not two.
    per_partition = latest(readings.repartition(*IDENTITY), (*IDENTITY, "topic", "partition"), _IN_PARTITION)
    return latest(per_partition, IDENTITY, _ACROSS_PARTITIONS).withColumn("updated_at", F.current_timestamp())


# A large batch's readings are told apart by a 64-bit hash of their identity. Past this many hashes that repeat,
# the split of `latest_of_large_batch` would broadcast a large set: the batch takes `latest_per_identity` whole.
SPLIT_MAX_REPEATS = 1_000_000
# Hashes per task of the search for repeated ones: each task sorts its hashes in a Python worker (8 bytes each,
# about three copies at once).
_HASHES_PER_TASK = 2_000_000
_HASH = "_identity_hash"


def latest_of_large_batch(readings: DataFrame, count: int) -> DataFrame:
    """`latest_per_identity`, for a batch of many readings (`count`, about) with few duplicates: a backlog's.

    Shuffling every reading with all its columns to group it by identity cost most of silver's write of a 1 GiB
    backlog. Here only a hash of each identity is shuffled, to find the hashes that come more than once; a reading
    whose hash comes once is the only one of its identity and passes as it is, and only the readings whose hash
    repeats (duplicates, and the rare identities that share a hash) go through `latest_per_identity`. Exact
    whatever the hashes: two readings of one identity always share their hash. The search runs here, once, and
    its few rows are kept for the batch's later reads of the result."""
    from pyspark.sql import functions as F

    tagged = readings.withColumn(_HASH, F.xxhash64(*IDENTITY))
    tasks = max(1, -(-count // _HASHES_PER_TASK))
    # Sorting in numpy took 7 s for the 18.9 million hashes of the 1 GiB backlog, where Spark's count per hash (a
    # hash aggregate of distinct keys) took 19 s.
    repeated = (
        tagged.select(_HASH)
        .repartition(tasks, _HASH)
        .mapInArrow(_repeated_hashes, f"{_HASH} BIGINT")
        .localCheckpoint(eager=True)
    )
    found = repeated.count()
    if found > SPLIT_MAX_REPEATS:
        return latest_per_identity(readings)
    columns = [c for c in SILVER_COLUMNS if c != "updated_at"]
    once = tagged if not found else tagged.join(F.broadcast(repeated), _HASH, "left_anti")
    once = once.select(*columns).withColumn("updated_at", F.current_timestamp())
    if not found:
        return once
    repeats = latest_per_identity(tagged.join(F.broadcast(repeated), _HASH, "left_semi").drop(_HASH))
    return once.unionByName(repeats)


def _repeated_hashes(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The hashes that come more than once among a task's (every copy of a hash is in the same task), each once."""
    import numpy as np
    import pyarrow as pa

    parts = [batch.column(0).to_numpy() for batch in batches]
    if not parts:
        return
    hashes = np.sort(np.concatenate(parts))
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    yield pa.RecordBatch.from_arrays([pa.array(repeated, pa.int64())], names=[_HASH])


def merge_condition(lo_literal: str, hi_literal: str) -> str:
    """Identity match, with literal time bounds so that Delta skips files outside the batch's time range."""
    return (
        f"t.device_id = s.device_id AND {_TARGET_METRIC} = s.metric AND t.`timestamp` = s.`timestamp` "
        f"AND t.`timestamp` >= {lo_literal} AND t.`timestamp` <= {hi_literal}"
    )


# Silver's stored metric: null in a reading written before metrics, which is metric `value` (lake.upgrade).
_TARGET_METRIC = silver_metric("t")


def newer_and_different() -> str:
    """A matched row changes only for a correction: another value from a later record."""
    return f"s.value <> t.value AND {newer('s', 't')}"
