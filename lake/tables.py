"""Names, locations and schemas of the lake's Delta tables: bronze, silver, gold and quarantine."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import msgspec

from lake.settings import Settings, absolute, join_path


class Table(str, Enum):
    BRONZE = "bronze"
    SILVER = "silver"
    GOLD = "gold"
    QUARANTINE = "quarantine"
    ROLLUPS = "rollups"
    METRICS = "metrics"


# The metric of a reading that carries `value` alone (contract section 1), and of every reading of a lake written
# before metrics existed.
DEFAULT_METRIC = "value"
# A metric name (contract section 1): a letter, then letters, digits, `_`, `.` or `-`; 1 to 64 characters.
METRIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


class KpiValues(msgspec.Struct, kw_only=True):
    """The KPIs of one bucket of readings (CONTRACT section 4): gold's columns, and the fields of the serving
    queries' rows and of the API's answers, which extend this struct."""

    reading_count: int
    device_count: int
    average_value: float
    min_value: float
    max_value: float
    sum_value: float
    stddev_value: float | None  # null for a bucket of one reading


KPI_FIELDS: tuple[str, ...] = KpiValues.__struct_fields__
# Gold's KPI columns in Spark DDL, typed after KpiValues (an optional float is a nullable DOUBLE).
_SPARK_TYPES = {int: "BIGINT NOT NULL", float: "DOUBLE NOT NULL", float | None: "DOUBLE"}
_KPI_COLUMNS = ", ".join(f"{f.name} {_SPARK_TYPES[f.type]}" for f in msgspec.structs.fields(KpiValues))


# How a bucket's KPIs came to be, beside them in gold and the rollups (nullable: added to tables made before):
# - fingerprint: the sum of a 32-bit hash of each reading (device, time, value), an exact, order-free summary of
#   the bucket's readings that tells a changed bucket from a recompute whose rounding differs;
# - revision: how many times the KPIs changed after their first commit;
# - late_readings: readings that arrived after the bucket was final.
_HISTORY_COLUMNS = "fingerprint BIGINT, revision BIGINT, late_readings BIGINT"

# Schemas as Spark DDL so that this module stays importable without Spark (the API and `lakehouse sql` use it).
# Timestamps are Delta TIMESTAMP (UTC instants), not TIMESTAMP_NTZ, to keep the tables at reader 1 / writer 2.
SCHEMAS: dict[Table, str] = {
    Table.BRONZE: (
        "topic STRING NOT NULL, `partition` INT NOT NULL, `offset` BIGINT NOT NULL, kafka_timestamp TIMESTAMP, "
        "key BINARY, value BINARY, ingested_at TIMESTAMP NOT NULL"
    ),
    Table.SILVER: (
        "device_id STRING NOT NULL, `timestamp` TIMESTAMP NOT NULL, value DOUBLE NOT NULL, topic STRING NOT NULL, "
        "`partition` INT NOT NULL, `offset` BIGINT NOT NULL, reading_index INT NOT NULL, "
        # The watermark when the reading's record arrived (lake.watermark): it arrived late for every bucket that
        # ends at or before it. Null for readings written before watermarks were kept.
        "kafka_timestamp TIMESTAMP, updated_at TIMESTAMP NOT NULL, arrival_watermark TIMESTAMP, "
        # The reading's metric: its identity is (device_id, metric, timestamp). Last and nullable, as a column added
        # to a table made before metrics; `lake.upgrade` fills it in such a table, so no row holds null once read.
        "metric STRING"
    ),
    Table.GOLD: (
        f"`timestamp` TIMESTAMP NOT NULL, {_KPI_COLUMNS}, updated_at TIMESTAMP NOT NULL, {_HISTORY_COLUMNS}, "
        "metric STRING"
    ),
    # KPIs per device and of the whole fleet (device_id null) per minute, hour and day; `m2_value` (the sum of
    # squared deviations from the bucket's mean) is what lets buckets combine exactly into coarser ones, as
    # `late_for_hour` and `late_for_day` (readings late for the hour and the day that hold a finer bucket) do for
    # the late readings; `mean_residual` (sum(value - average_value), nullable: added to tables made before) keeps
    # the digits of the mean that a double rounds away, which the combination needs for values far from zero.
    Table.ROLLUPS: (
        f"grain STRING NOT NULL, device_id STRING, `timestamp` TIMESTAMP NOT NULL, {_KPI_COLUMNS}, "
        f"m2_value DOUBLE NOT NULL, updated_at TIMESTAMP NOT NULL, {_HISTORY_COLUMNS}, "
        "late_for_hour BIGINT, late_for_day BIGINT, mean_residual DOUBLE, metric STRING"
    ),
    Table.QUARANTINE: (
        "topic STRING NOT NULL, `partition` INT NOT NULL, `offset` BIGINT NOT NULL, reading_index INT, "
        "reason_code STRING NOT NULL, reason STRING NOT NULL, raw STRING, kafka_timestamp TIMESTAMP, "
        # The metric a reading's problem is about (`bad_metric`, `bad_value` of a named metric, `metric_limit`);
        # null for a problem of the whole message or reading.
        "quarantined_at TIMESTAMP NOT NULL, metric STRING"
    ),
    # The metric names the lake knows, each once: what LAKEHOUSE_MAX_METRICS bounds (contract section 2).
    Table.METRICS: "metric STRING NOT NULL, first_seen TIMESTAMP NOT NULL",
}


@dataclass(frozen=True)
class LakePaths:
    """Where each table and checkpoint lives for one set of settings."""

    root: str
    checkpoints: str

    @classmethod
    def from_settings(cls, settings: Settings) -> LakePaths:
        return cls(root=absolute(settings.lake_root), checkpoints=absolute(settings.checkpoints))

    def table(self, table: Table) -> str:
        return join_path(self.root, table.value)

    def checkpoint(self, query_name: str) -> str:
        return join_path(self.checkpoints, query_name)
