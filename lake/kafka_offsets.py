"""The newest offsets Kafka holds for the topic, so that readers can tell how far the pipeline lags behind."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    newest_offset: int | None  # Kafka's high watermark: the offset the next record will get
    processed_offset: int | None  # the next offset the pipeline will read (0 when it has read nothing)

    @property
    def records_behind(self) -> int | None:
        if self.newest_offset is None:
            return None
        return max(0, self.newest_offset - (self.processed_offset or 0))


def end_offsets(bootstrap: str, topic: str, timeout_s: float) -> dict[tuple[str, int], int]:
    """High watermark per partition of the topic; raises on a broker that does not answer within the timeout."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "kpi-lakehouse-health",  # no offsets are committed; watermarks need a consumer, not a group
        "enable.auto.commit": False,
        "socket.timeout.ms": max(100, int(timeout_s * 1000)),
        "log_level": 0,  # an unreachable broker is reported by /health, not logged on every poll
    })  # fmt: skip
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        described = metadata.topics.get(topic)
        if described is None or described.error is not None:
            raise KafkaException(f"topic {topic!r} not found: {described.error if described else 'no metadata'}")
        found = {}
        for partition in sorted(described.partitions):
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
            found[(topic, partition)] = high
        return found
    finally:
        consumer.close()


def lag(newest: dict[tuple[str, int], int] | None, processed: dict[tuple[str, int], int]) -> list[PartitionLag]:
    """One row per partition known to either side; Kafka's side is None when it could not be asked."""
    keys = sorted(set(newest or {}) | set(processed))
    return [PartitionLag(t, p, (newest or {}).get((t, p)), processed.get((t, p))) for t, p in keys]
