"""Names, locations and schemas of the lake's Delta tables: bronze, silver, gold and quarantine."""

from __future__ import annotations

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
        "kafka_timestamp TIMESTAMP, updated_at TIMESTAMP NOT NULL"
    ),
    Table.GOLD: f"`timestamp` TIMESTAMP NOT NULL, {_KPI_COLUMNS}, updated_at TIMESTAMP NOT NULL",
    # KPIs per device and of the whole fleet (device_id null) per minute, hour and day; `m2_value` (the sum of
    # squared deviations from the bucket's mean) is what lets buckets combine exactly into coarser ones.
    Table.ROLLUPS: (
        f"grain STRING NOT NULL, device_id STRING, `timestamp` TIMESTAMP NOT NULL, {_KPI_COLUMNS}, "
        "m2_value DOUBLE NOT NULL, updated_at TIMESTAMP NOT NULL"
    ),
    Table.QUARANTINE: (
        "topic STRING NOT NULL, `partition` INT NOT NULL, `offset` BIGINT NOT NULL, reading_index INT, "
        "reason_code STRING NOT NULL, reason STRING NOT NULL, raw STRING, kafka_timestamp TIMESTAMP, "
        "quarantined_at TIMESTAMP NOT NULL"
    ),
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
