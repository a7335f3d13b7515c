"""Reading identity and which record wins (contract section 3), and the idempotent MERGE into silver."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

IDENTITY = ("device_id", "timestamp")
# A later record wins: the broker's append time orders records (the topic uses LogAppendTime), then partition,
# offset and the index inside the message. Within one partition this is offset order.
ORDER = ("kafka_timestamp", "partition", "offset", "reading_index")
SILVER_COLUMNS = (
    "device_id",
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


def _order_key(alias: str | None = None) -> str:
    prefix = f"{alias}." if alias else ""
    return "struct(" + ", ".join(f"{prefix}`{c}`" for c in ORDER) + ")"


def latest_per_identity(readings: DataFrame) -> DataFrame:
    """One row per identity: the reading with the greatest ORDER key."""
    from pyspark.sql import functions as F

    columns = [c for c in SILVER_COLUMNS if c not in IDENTITY and c != "updated_at"]
    winner = F.max_by(F.struct(*[F.col(f"`{c}`") for c in columns]), F.expr(_order_key())).alias("winner")
    return (
        readings.groupBy(*IDENTITY)
        .agg(winner)
        .select(*IDENTITY, *[F.col(f"winner.`{c}`").alias(c) for c in columns])
        .withColumn("updated_at", F.current_timestamp())
    )


def merge_condition(lo_literal: str, hi_literal: str) -> str:
    """Identity match, with literal time bounds so that Delta skips files outside the batch's time range."""
    return (
        "t.device_id = s.device_id AND t.`timestamp` = s.`timestamp` "
        f"AND t.`timestamp` >= {lo_literal} AND t.`timestamp` <= {hi_literal}"
    )


def newer_and_different() -> str:
    """A matched row changes only for a correction: another value from a later record."""
    return f"s.value <> t.value AND {_order_key('s')} > {_order_key('t')}"
