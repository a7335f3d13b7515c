"""The bodies the API answers with, as msgspec structs: KPIs, the metrics' catalog, devices, health and problem
details."""

from __future__ import annotations

import msgspec

from lake.tables import KpiValues


class Freshness(msgspec.Struct, kw_only=True):
    gold_version: int
    silver_version: int
    rollups_version: int | None  # null until the pipeline created the rollups table
    newest_event: str | None  # the newest second in gold
    last_gold_commit: str | None  # when the pipeline last committed to gold
    # Buckets that end at or before it are final (see the README's "Late data"); null before the first reading.
    watermark: str | None
    snapshot_loaded_at: str | None
    served_from: str  # "store": the service's store file; "lake": the Delta tables, while the store file is built


class BucketKpis(KpiValues, kw_only=True):
    """A bucket's KPIs, whether they can still change, and how they changed."""

    final: bool  # the watermark has passed the bucket's end: only late readings can change it now
    revision: int | None  # times its KPIs changed after their first commit; null for one device's second
    late_readings: int  # readings that arrived after the bucket was final (they count in its KPIs)


class KpiResponse(BucketKpis, kw_only=True, omit_defaults=True):
    timestamp: str
    metric: str
    grain: str
    device_id: str | None = None
    freshness: Freshness | None = None


class KpiPoint(BucketKpis, kw_only=True):
    timestamp: str


class MetricKpis(BucketKpis, kw_only=True):
    """One metric's KPIs in a bucket that holds several."""

    metric: str


class BucketMetricsResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every metric with readings in one bucket, ordered by name."""

    timestamp: str
    grain: str
    device_id: str | None = None
    metrics: list[MetricKpis]
    freshness: Freshness


class KpiSeriesResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    metric: str
    grain: str
    device_id: str | None = None
    start: str  # start of the first bucket of the range
    end: str  # end of the range (exclusive)
    items: list[KpiPoint]
    next: str | None  # the next page's path and query; null on the last page
    freshness: Freshness


class DeviceResponse(msgspec.Struct, kw_only=True):
    device_id: str
    first_reading: str
    last_reading: str
    reading_count: int
    metrics: list[str]  # the names of the metrics it sent, sorted


class MetricResponse(msgspec.Struct, kw_only=True):
    metric: str
    device_count: int  # devices that sent it
    first_reading: str
    last_reading: str
    reading_count: int


class MetricsResponse(msgspec.Struct, kw_only=True):
    items: list[MetricResponse]
    freshness: Freshness


class DevicesResponse(msgspec.Struct, kw_only=True):
    items: list[DeviceResponse]
    next: str | None
    freshness: Freshness


class PartitionLagResponse(msgspec.Struct, kw_only=True):
    topic: str
    partition: int
    newest_offset: int | None
    processed_offset: int | None
    records_behind: int | None


class PipelineLagResponse(msgspec.Struct, kw_only=True):
    last_gold_commit: str | None
    seconds_since_gold_commit: float | None
    checkpoint_batch: int | None  # the newest micro-batch the pipeline's checkpoint committed
    records_behind: int | None  # over all partitions; null when Kafka could not be asked
    partitions: list[PartitionLagResponse]
    kafka_error: str | None


class HealthResponse(msgspec.Struct, kw_only=True):
    status: str
    tables: dict[str, bool]
    snapshot: Freshness | None
    pipeline: PipelineLagResponse


class LiveResponse(msgspec.Struct, kw_only=True):
    status: str


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details, the body of every error."""

    status: int
    title: str
    detail: str | None = None
    type: str | None = None
    errors: list[dict[str, str]] | None = None  # what failed validation, parameter by parameter
    known_metrics: list[str] | None = None  # for a metric the lake does not know: the first names it does, sorted
