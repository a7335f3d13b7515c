"""The API's background work, each on a daemon thread of its own: refreshing the snapshot per Delta version, and
asking Kafka for its newest offsets (for /health's lag and the records-behind gauge)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from lake import checkpoint, kafka
from lake.settings import Settings
from lake.tables import LakePaths
from serve import observability
from serve.snapshot import RefreshReport, SnapshotStore


class Periodic:
    """Calls `tick` every `interval_s` seconds on a daemon thread until stopped (with `at_start`, once at once)."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], None], at_start: bool = False) -> None:
        self._interval_s = interval_s
        self._tick = tick
        self._at_start = at_start
        self._stop = threading.Event()
        self.first_tick_done = threading.Event()  # set once the first tick has returned (or raised)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        if self._at_start:
            try:
                self._tick()
            finally:
                self.first_tick_done.set()
        while not self._stop.wait(self._interval_s):
            self._tick()

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        if wait:
            self._thread.join(timeout=30)


class Refresher(Periodic):
    """Refreshes the snapshot every `interval_s` seconds; reports each result or error."""

    def __init__(
        self,
        store: SnapshotStore,
        interval_s: float,
        on_refresh: Callable[[RefreshReport], None],
        on_error: Callable[[Exception], None],
        at_start: bool = False,
    ) -> None:
        super().__init__("snapshot-refresh", interval_s, self._refresh, at_start=at_start)
        self._store = store
        self._on_refresh = on_refresh
        self._on_error = on_error

    def _refresh(self) -> None:
        try:
            self._on_refresh(self._store.refresh())
        except Exception as exc:  # noqa: BLE001 (a torn read or a vacuumed file: keep the old snapshot, try again next time)
            self._on_error(exc)


class KafkaWatch(Periodic):
    """Kafka's newest offsets, asked every few seconds so that /health answers at once; each answer also sets the
    records-behind gauge against the checkpoint's processed offsets."""

    def __init__(self, settings: Settings, paths: LakePaths, interval_s: float = 5.0) -> None:
        super().__init__("kafka-offsets", interval_s, self._ask, at_start=True)
        self.settings = settings
        self.paths = paths
        self.newest: dict[tuple[str, int], kafka.Watermarks] | None = None
        self.error: str | None = "Kafka's offsets not asked yet"

    def _ask(self) -> None:
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

    def lag(self) -> list[kafka.PartitionLag]:
        processed = checkpoint.processed_offsets(self.paths)
        return kafka.lag(self.newest, processed.next_offsets if processed else {})


def records_behind(partitions: list[kafka.PartitionLag]) -> int:
    return sum(p.records_behind or 0 for p in partitions)
