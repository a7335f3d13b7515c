"""Kafka's newest offsets for /health and the records-behind gauge, asked on a background thread."""

from __future__ import annotations

import threading

from lake import checkpoint, kafka
from lake.settings import Settings
from lake.tables import LakePaths
from serve import observability


class KafkaWatch:
    """Kafka's newest offsets, asked on a thread every few seconds so that /health answers at once; each answer
    also sets the records-behind gauge against the checkpoint's processed offsets."""

    def __init__(self, settings: Settings, paths: LakePaths, interval_s: float = 5.0) -> None:
        self.settings = settings
        self.paths = paths
        self.newest: dict[tuple[str, int], kafka.Watermarks] | None = None
        self.error: str | None = "Kafka's offsets not asked yet"
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kafka-offsets", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                # With LAKEHOUSE_KAFKA_PROPERTIES' security, like every other Kafka client of the project.
                self.newest = kafka.watermarks(
                    self.settings, self.settings.api_kafka_timeout_seconds, group="kpi-lakehouse-health"
                )
                self.error = None
            except Exception as exc:  # noqa: BLE001 (the broker is down or the topic is missing: /health says so)
                self.newest = None
                self.error = f"cannot read offsets from Kafka at {self.settings.kafka_bootstrap}: {exc}"
            observability.RECORDS_BEHIND.set(records_behind(self.lag()) if self.newest is not None else float("nan"))
            if self._stop.wait(self._interval_s):
                return

    def lag(self) -> list[kafka.PartitionLag]:
        processed = checkpoint.processed_offsets(self.paths)
        return kafka.lag(self.newest, processed.next_offsets if processed else {})

    def stop(self) -> None:
        self._stop.set()


def records_behind(partitions: list[kafka.PartitionLag]) -> int:
    return sum(p.records_behind or 0 for p in partitions)
