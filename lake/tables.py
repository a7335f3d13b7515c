"""Names, locations and schemas of the lake's Delta tables: bronze, silver, gold and quarantine."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lake.settings import Settings, absolute, join_path


class Table(str, Enum):
    BRONZE = "bronze"
    SILVER = "silver"
    GOLD = "gold"
    QUARANTINE = "quarantine"


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
    Table.GOLD: (
        "`timestamp` TIMESTAMP NOT NULL, reading_count BIGINT NOT NULL, device_count BIGINT NOT NULL, "
        "average_value DOUBLE NOT NULL, min_value DOUBLE NOT NULL, max_value DOUBLE NOT NULL, "
        "sum_value DOUBLE NOT NULL, stddev_value DOUBLE, updated_at TIMESTAMP NOT NULL"
    ),
    Table.QUARANTINE: (
        "topic STRING NOT NULL, `partition` INT NOT NULL, `offset` BIGINT NOT NULL, reading_index INT, "
        "reason_code STRING NOT NULL, reason STRING NOT NULL, raw STRING, kafka_timestamp TIMESTAMP, "
        "quarantined_at TIMESTAMP NOT NULL"
    ),
}

KPI_FIELDS = (
    "reading_count",
    "device_count",
    "average_value",
    "min_value",
    "max_value",
    "sum_value",
    "stddev_value",
)


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
