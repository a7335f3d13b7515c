"""The Kafka source of the streaming job, with fetch limits that let a message at the size limit through."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lake.kafka import java_properties
from lake.settings import Settings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


def kafka_options(settings: Settings) -> dict[str, str]:
    limit = settings.kafka_limit_bytes
    return {
        # Security and the like, from LAKEHOUSE_KAFKA_PROPERTIES (the producer reads the same file); the keys below win.
        **{f"kafka.{key}": value for key, value in java_properties(settings).items()},
        "kafka.bootstrap.servers": settings.kafka_bootstrap,
        # Records of a transaction count once it commits; an aborted one's never (contract section 1).
        "kafka.isolation.level": "read_committed",
        "subscribe": settings.topic,
        "startingOffsets": settings.starting_offsets,
        "failOnDataLoss": str(settings.fail_on_data_loss).lower(),
        "maxOffsetsPerTrigger": str(settings.max_offsets_per_trigger),
        "kafka.max.partition.fetch.bytes": str(limit),
        "kafka.fetch.max.bytes": str(max(50 * 1024 * 1024, limit)),
    }


# The records `read_kafka` gives, as the ingest job's micro-batches hold them (tests and bench/batch_loop.py make such
# batches without Kafka).
RECORD_DDL = "topic STRING, `partition` INT, `offset` BIGINT, kafka_timestamp TIMESTAMP, key BINARY, value BINARY"


def read_kafka(spark: SparkSession, settings: Settings) -> DataFrame:
    """Kafka records as (topic, partition, offset, kafka_timestamp, key, value): RECORD_DDL."""
    reader = spark.readStream.format("kafka")
    for key, value in kafka_options(settings).items():
        reader = reader.option(key, value)
    return reader.load().selectExpr("topic", "`partition`", "`offset`", "timestamp AS kafka_timestamp", "key", "value")
