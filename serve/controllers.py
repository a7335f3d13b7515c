"""The API's routes: KPIs of one metric in a bucket or over a range, every metric of a bucket, the metrics' catalog,
devices, health and liveness, and the dashboard; answers to reads carry the snapshot's ETag and are 304 when the
client holds it.

A read is answered from the encoded answer kept for the current snapshot generation when there is one (serve.answers:
no query, no thread, and a 304 when the client holds it), else by a query on a worker thread, whose encoded answer is
then kept for the generation it read."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

import anyio.to_thread
from litestar import Controller, MediaType, Request, Response, get
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import Parameter
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.serialization import encode_json
from litestar.static_files import create_static_files_router

from lake import checkpoint, deltalog, duck, kafka, watermark
from lake.errors import LakeError
from lake.settings import Settings
from lake.tables import DEFAULT_METRIC, KPI_FIELDS, METRIC_NAME, Table
from lake.timestamps import MAX_US, Grain, TimestampError, format_utc, from_us, parse_timestamp_us
from serve import queries
from serve.answers import Kept
from serve.background import KafkaWatch, records_behind
from serve.errors import problem
from serve.observability import ANSWERED_BY_QUERY, ANSWERED_KEPT
from serve.schemas import (
    BucketMetricsResponse,
    DeviceResponse,
    DevicesResponse,
    Freshness,
    HealthResponse,
    KpiPoint,
    KpiResponse,
    KpiSeriesResponse,
    LiveResponse,
    MetricKpis,
    MetricResponse,
    MetricsResponse,
    PartitionLagResponse,
    PipelineLagResponse,
    Problem,
)
from serve.snapshot import Snapshot, SnapshotStore

STATIC = Path(__file__).parent / "static"
MAX_PAGE = 10_000
_TIMESTAMP_DOC = "RFC 3339 / ISO 8601 instant such as 2024-07-30T12:00:00Z; '+' of an offset as %2B"


def _problem_spec(description: str) -> ResponseSpec:
    return ResponseSpec(Problem, description=description, media_type="application/problem+json")


_READ_RESPONSES = {
    304: ResponseSpec(None, description="Not modified: the If-None-Match ETag is the current snapshot's"),
    400: _problem_spec("A parameter that cannot be read or is out of range"),
    429: _problem_spec("Too many requests from this address (when LAKEHOUSE_API_RATE_LIMIT is set)"),
    503: _problem_spec("The lake has no gold and silver tables yet (or no rollups, for a minute, hour or day)"),
}
_UNKNOWN_METRIC = "the lake holds no readings of the metric (the body's `known_metrics` names some it does)"
_KPI_RESPONSES = {
    **_READ_RESPONSES,
    404: _problem_spec(f"The bucket has no readings of the metric, or {_UNKNOWN_METRIC}"),
}
_BUCKET_RESPONSES = {**_READ_RESPONSES, 404: _problem_spec("The bucket has no readings")}
_METRIC_RESPONSES = {**_READ_RESPONSES, 404: _problem_spec(f"Unknown metric: {_UNKNOWN_METRIC}")}
_DEVICE_ID = Parameter(description="KPIs of this device only", min_length=1, max_length=512)
_GRAIN = Parameter(description="bucket size")
_METRIC_RULE = "a letter, then up to 63 letters, digits, '_', '.' or '-'; GET /catalog/metrics lists them"
# The name rule, anchored as a JSON Schema pattern must be (it matches anywhere in the text otherwise).
METRIC_PATTERN = f"^{METRIC_NAME.pattern}$"
_METRIC = Parameter(
    description=f"the metric whose KPIs to answer ({_METRIC_RULE}); `value` is the reading's bare `value`",
    pattern=METRIC_PATTERN,
    min_length=1,
    max_length=64,
)
# How many of the names the lake knows a 404 for an unknown metric names.
KNOWN_METRICS_SHOWN = 20


def _utc(moment: datetime | None) -> str | None:
    return None if moment is None else format_utc(moment)


def _watermark_us(store: SnapshotStore, snapshot: Snapshot) -> int | None:
    """The watermark recorded at the snapshot's gold version (read once per version)."""
    return watermark.at_version(store.paths.table(Table.GOLD), snapshot.gold_version).watermark_us


def _unknown_metric(source: queries.Source, metric: str) -> ProblemDetailsException:
    """The 404 of a metric the snapshot holds no reading of, naming the first of those it does, and where all are
    listed."""
    names = queries.metric_names(source, KNOWN_METRICS_SHOWN + 1)
    if not names:
        known = "it holds no readings yet; run `lakehouse pipeline`"
    else:
        more = ", ..." if len(names) > KNOWN_METRICS_SHOWN else ""
        known = f"it knows {', '.join(names[:KNOWN_METRICS_SHOWN])}{more} (GET /catalog/metrics lists them all)"
    return problem(
        404,
        "Unknown metric",
        f"the lake holds no readings of metric {metric!r}; {known}",
        known_metrics=names[:KNOWN_METRICS_SHOWN],
    )


def _state(row: queries.Kpis, watermark_us: int | None) -> dict[str, object]:
    end_us = row.bucket_start_us + row.grain.micros
    return {
        "final": watermark_us is not None and end_us <= watermark_us,
        "revision": row.revision,
        "late_readings": row.late_readings,
        **{name: getattr(row, name) for name in KPI_FIELDS},
    }


def _freshness(snapshot: Snapshot, watermark_us: int | None) -> Freshness:
    if not snapshot.ready:
        raise problem(503, "Lake not ready", "the lake has no gold and silver tables yet; run `lakehouse pipeline`")
    return Freshness(
        gold_version=snapshot.gold_version or 0,
        silver_version=snapshot.silver_version or 0,
        newest_event=_utc(snapshot.newest_event),
        rollups_version=snapshot.rollups_version,
        last_gold_commit=_utc(snapshot.gold_committed_at),
        snapshot_loaded_at=_utc(snapshot.loaded_at),
        served_from="store" if snapshot.from_store else "lake",
        watermark=None if watermark_us is None else format_utc(from_us(watermark_us)),
    )


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of If-None-Match against the current ETag."""
    if not if_none_match:
        return False
    candidates = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in candidates or etag in candidates


def _encoded(if_none_match: str | None, etag: str, body: bytes) -> Response:
    """200 with the encoded body, or 304 when the client already holds this snapshot's answer; both carry the ETag."""
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _etag_matches(if_none_match, etag):
        return Response(content=b"", status_code=304, headers=headers)
    return Response(content=body, media_type=MediaType.JSON, headers=headers)


@dataclass(frozen=True)
class _Answer:
    """What a read found: the snapshot it read, `render(snapshot)` for its encoded body (a kept answer is rendered
    again with a later snapshot's freshness), and the store row it depends on alone (`serve.answers.Kept.depends`)."""

    snapshot: Snapshot
    render: Callable[[Snapshot], bytes]
    depends: tuple[str, str] | None = None


def _made(body: object) -> Callable[[Snapshot], bytes]:
    """`render` of an answer dropped at every sync, so never rendered again for another snapshot."""
    return lambda _: encode_json(body)


@functools.lru_cache(maxsize=8)
def _encoded_freshness(store: SnapshotStore, snapshot: Snapshot) -> bytes:
    """A snapshot's `freshness` as JSON, encoded once for every answer rendered for it."""
    return encode_json(_freshness(snapshot, _watermark_us(store, snapshot)))


async def _answer(request: Request, store: SnapshotStore, key: Hashable, compute: Callable[[], _Answer]) -> Response:
    """A read's response (200, or 304 when the client holds it): the answer kept for the current generation without a
    query, else `compute` (a query on a worker thread), whose encoded answer is kept for the generation it read."""
    if_none_match = request.headers.get("if-none-match")
    # The kept generation first: a sync clears it before it commits, and publishes the new snapshot before it sets it.
    generation = store.kept_generation
    current = store.current
    if generation is not None and current.generation == generation:
        # A kept answer is also what a conditional request is checked against: a 304 without a query. (The ETag is
        # the snapshot's, not the answer's: only an answer that exists may be "not modified", so a request whose
        # answer is not kept asks DuckDB, and a bucket without readings stays a 404.)
        kept = store.answers.get(generation, key)
        if kept is not None:
            body = kept.body
            if kept.generation != generation:
                # Kept from an earlier generation whose sync left its row alone: made again with this snapshot's
                # freshness, here (the store read the new version's watermark when it published it).
                body = kept.render(current)
                store.answers.rendered(generation, key, kept, body)
            ANSWERED_KEPT.inc()
            return _encoded(if_none_match, current.etag, body)

    def computed() -> tuple[_Answer, bytes]:
        answer = compute()
        return answer, answer.render(answer.snapshot)

    answer, body = await anyio.to_thread.run_sync(computed)
    ANSWERED_BY_QUERY.inc()
    snapshot = answer.snapshot
    if snapshot.from_store and snapshot.generation is not None:
        store.answers.put(snapshot.generation, key, Kept(answer.render, answer.depends, body, snapshot.generation))
    return _encoded(if_none_match, snapshot.etag, body)


def _metric_name(metric: str) -> str:
    """The metric parameter, whole: `$` of the schema's pattern also lets a name end with a newline."""
    if not METRIC_NAME.fullmatch(metric):
        raise problem(400, "Bad metric", f"metric {metric[:80]!r} is not a metric name: {_METRIC_RULE}")
    return metric


def _instant(name: str, text: str) -> int:
    try:
        return parse_timestamp_us(text)
    except TimestampError as exc:
        raise problem(400, f"Bad {name}", f"{name}: {exc}") from None


@contextmanager
def _reading(store: SnapshotStore) -> Iterator[tuple[Snapshot, Freshness, queries.Source, int | None]]:
    """One snapshot's cursor, freshness and watermark for a request; a lake without tables is a 503."""
    with store.read() as (snapshot, cursor):
        watermark_us = _watermark_us(store, snapshot) if snapshot.ready else None
        freshness = _freshness(snapshot, watermark_us)
        try:
            yield snapshot, freshness, queries.Source(cursor, snapshot, store.locations), watermark_us
        except LakeError as exc:
            raise problem(503, "Lake not ready", str(exc)) from None


def _kpis_renderer(
    store: SnapshotStore, row: queries.Kpis, bucket: str, metric: str, grain: Grain, device_id: str | None
) -> Callable[[Snapshot], bytes]:
    """`render` of one bucket's KPIs kept across syncs: its body without `freshness` is encoded once per value of
    `final` (which follows the watermark), and a snapshot's encoded freshness is appended, so that a kept answer
    is rendered for a new snapshot in a few microseconds. Byte for byte the encoding of the whole KpiResponse,
    whose last field is `freshness`."""
    heads: dict[bool, bytes] = {}

    def render(snapshot: Snapshot) -> bytes:
        state = _state(row, _watermark_us(store, snapshot))
        head = heads.get(state["final"])  # type: ignore[call-overload]
        if head is None:
            body = KpiResponse(timestamp=bucket, metric=metric, grain=grain.value, device_id=device_id, **state)  # type: ignore[arg-type]
            head = heads[state["final"]] = encode_json(body)[:-1]  # type: ignore[index]
        return head + b',"freshness":' + _encoded_freshness(store, snapshot) + b"}"

    return render


class KpiController(Controller):
    path = "/kpis"

    @get(
        "/{timestamp:str}",
        summary="KPIs of the bucket that contains an instant",
        responses=_KPI_RESPONSES,
    )
    async def get_kpis(
        self,
        request: Request,
        store: NamedDependency[SnapshotStore],
        timestamp: Annotated[str, Parameter(description=_TIMESTAMP_DOC, max_length=64)],
        grain: Annotated[Grain, _GRAIN] = Grain.SECOND,
        device_id: Annotated[str | None, _DEVICE_ID] = None,
        metric: Annotated[str, _METRIC] = DEFAULT_METRIC,
    ) -> Response[KpiResponse]:
        instant_us, metric = _instant("timestamp", timestamp), _metric_name(metric)
        start_us = grain.bucket_start_us(instant_us)

        def compute() -> _Answer:
            bucket = format_utc(from_us(start_us))
            at_once = queries.kpis_at_once(store, instant_us, grain, device_id, metric)
            if at_once is not None:  # one statement: the row and the generation it belongs to
                snapshot, row, depends = at_once
                return _Answer(snapshot, _kpis_renderer(store, row, bucket, metric, grain, device_id), depends)
            with _reading(store) as (snapshot, _, source, _):
                found = queries.kpis(source, instant_us, grain, device_id, metric)
                if found is None and not queries.is_known(source, metric):
                    raise _unknown_metric(source, metric)
            if found is None:
                who = f" of device {device_id!r}" if device_id else ""
                raise problem(
                    404, "No readings", f"no readings of metric {metric!r} in the {grain.value} starting {bucket}{who}"
                )
            # Not kept past the next sync (no store row named): rendered once, for this snapshot.
            return _Answer(snapshot, _kpis_renderer(store, found, bucket, metric, grain, device_id))

        return await _answer(request, store, ("kpi", start_us, grain, device_id, metric), compute)

    @get(
        "/{timestamp:str}/metrics",
        summary="KPIs of every metric with readings in the bucket that contains an instant, ordered by metric",
        responses=_BUCKET_RESPONSES,
    )
    async def get_bucket_metrics(
        self,
        request: Request,
        store: NamedDependency[SnapshotStore],
        timestamp: Annotated[str, Parameter(description=_TIMESTAMP_DOC, max_length=64)],
        grain: Annotated[Grain, _GRAIN] = Grain.SECOND,
        device_id: Annotated[str | None, _DEVICE_ID] = None,
    ) -> Response[BucketMetricsResponse]:
        instant_us = _instant("timestamp", timestamp)
        start_us = grain.bucket_start_us(instant_us)

        def compute() -> _Answer:
            with _reading(store) as (snapshot, freshness, source, watermark_us):
                found = queries.bucket_metrics(source, instant_us, grain, device_id)
            bucket = format_utc(from_us(start_us))
            if not found:
                who = f" of device {device_id!r}" if device_id else ""
                raise problem(
                    404, "No readings", f"no readings of any metric in the {grain.value} starting {bucket}{who}"
                )
            body = BucketMetricsResponse(
                timestamp=bucket,
                grain=grain.value,
                device_id=device_id,
                metrics=[MetricKpis(metric=row.metric, **_state(row, watermark_us)) for row in found],  # type: ignore[arg-type]
                freshness=freshness,
            )
            return _Answer(snapshot, _made(body))

        return await _answer(request, store, ("bucket", start_us, grain, device_id), compute)

    @get(
        "/",
        summary="KPIs of one metric in every bucket with readings in a range, oldest first, a page at a time",
        responses=_METRIC_RESPONSES,
    )
    async def get_kpi_series(
        self,
        request: Request,
        store: NamedDependency[SnapshotStore],
        settings: NamedDependency[Settings],
        start: Annotated[
            str, Parameter(description=f"{_TIMESTAMP_DOC}; the bucket holding it is the first", max_length=64)
        ],
        end: Annotated[
            str, Parameter(description=f"{_TIMESTAMP_DOC}; buckets starting before it are included", max_length=64)
        ],
        grain: Annotated[Grain, _GRAIN] = Grain.SECOND,
        device_id: Annotated[str | None, _DEVICE_ID] = None,
        metric: Annotated[str, _METRIC] = DEFAULT_METRIC,
        limit: Annotated[int, Parameter(description="most buckets in this page", ge=1, le=MAX_PAGE)] = 1000,
        final: Annotated[
            bool | None,
            Parameter(description="only final buckets (true), or only those that may still change (false)"),
        ] = None,
    ) -> Response[KpiSeriesResponse]:
        start_us, end_us, metric = _instant("start", start), _instant("end", end), _metric_name(metric)
        if start_us > end_us:
            raise problem(400, "Bad range", f"start {start} is after end {end}; give start <= end")
        first_us = grain.bucket_start_us(start_us)
        # Whole buckets: the last one is the bucket that starts before `end` (clamped at the last representable
        # instant).
        stop_us = min(
            end_us if end_us == grain.bucket_start_us(end_us) else grain.bucket_start_us(end_us) + grain.micros,
            MAX_US,
        )
        buckets = (stop_us - first_us) // grain.micros
        if buckets > settings.api_max_range_buckets:
            raise problem(
                400,
                "Range too large",
                (
                    f"the range spans {buckets:,} {grain.value}s, more than the {settings.api_max_range_buckets:,} "
                    f"allowed (LAKEHOUSE_API_MAX_RANGE_BUCKETS); narrow it or use a coarser grain"
                ),
            )

        def compute() -> _Answer:
            with _reading(store) as (snapshot, freshness, source, watermark_us):
                # A bucket is final when it ends at or before the watermark: those start before the watermark's bucket.
                boundary_us = first_us if watermark_us is None else max(first_us, grain.bucket_start_us(watermark_us))
                low_us, high_us = first_us, stop_us
                if final is True:
                    high_us = min(stop_us, boundary_us)
                elif final is False:
                    low_us = max(first_us, min(boundary_us, stop_us))
                rows = []
                if low_us < high_us:
                    rows = queries.kpi_series(source, low_us, high_us, grain, device_id, limit + 1, metric)
                if not rows and not queries.is_known(source, metric):  # an empty page of a metric that exists is a 200
                    raise _unknown_metric(source, metric)
            next_page = None
            if len(rows) > limit:
                query = {
                    "start": format_utc(from_us(rows[limit].bucket_start_us)),
                    "end": end,
                    "metric": metric,
                    "grain": grain.value,
                    "limit": limit,
                }
                if final is not None:
                    query["final"] = str(final).lower()
                if device_id is not None:
                    query["device_id"] = device_id
                next_page = f"/kpis?{urlencode(query)}"
            points = [
                KpiPoint(timestamp=format_utc(from_us(row.bucket_start_us)), **_state(row, watermark_us))  # type: ignore[arg-type]
                for row in rows[:limit]
            ]
            body = KpiSeriesResponse(
                metric=metric,
                grain=grain.value,
                device_id=device_id,
                start=format_utc(from_us(first_us)),
                end=format_utc(from_us(stop_us)),
                items=points,
                next=next_page,
                freshness=freshness,
            )
            return _Answer(snapshot, _made(body))

        # `end` as given: the next page's link repeats it.
        key = ("series", first_us, stop_us, end, grain, device_id, metric, limit, final)
        return await _answer(request, store, key, compute)


class DeviceController(Controller):
    path = "/devices"

    @get(
        "/",
        summary="Known devices with the metrics they sent, first and last reading time and reading count, by id",
        responses=_METRIC_RESPONSES,
    )
    async def get_devices(
        self,
        request: Request,
        store: NamedDependency[SnapshotStore],
        after: Annotated[
            str | None, Parameter(description="start after this device id (from `next`)", min_length=1, max_length=512)
        ] = None,
        metric: Annotated[
            str | None,
            Parameter(
                description=f"only the devices that sent this metric, with its reading times and count ({_METRIC_RULE})",
                pattern=METRIC_PATTERN,
                min_length=1,
                max_length=64,
            ),
        ] = None,
        limit: Annotated[int, Parameter(description="most devices in this page", ge=1, le=MAX_PAGE)] = 1000,
    ) -> Response[DevicesResponse]:
        metric = None if metric is None else _metric_name(metric)

        def compute() -> _Answer:
            with _reading(store) as (snapshot, freshness, source, _):
                found = queries.devices(source, after, limit + 1, metric)
                if not found and metric is not None and not queries.is_known(source, metric):
                    raise _unknown_metric(source, metric)
            items = [
                DeviceResponse(
                    device_id=d.device_id,
                    first_reading=format_utc(d.first_reading),
                    last_reading=format_utc(d.last_reading),
                    reading_count=d.reading_count,
                    metrics=list(d.metrics),
                )
                for d in found[:limit]
            ]
            next_page = None
            if len(found) > limit:
                query: dict[str, object] = {"after": items[-1].device_id, "limit": limit}
                if metric is not None:
                    query["metric"] = metric
                next_page = f"/devices?{urlencode(query)}"
            return _Answer(snapshot, _made(DevicesResponse(items=items, next=next_page, freshness=freshness)))

        return await _answer(request, store, ("devices", after, metric, limit), compute)


class CatalogController(Controller):
    path = "/catalog"

    @get(
        "/metrics",
        summary="The metrics the lake holds readings of, with how many devices sent each, when and how often, by name",
        responses=_READ_RESPONSES,
    )
    async def get_metrics(self, request: Request, store: NamedDependency[SnapshotStore]) -> Response[MetricsResponse]:
        def compute() -> _Answer:
            # No paging: the lake keeps at most LAKEHOUSE_MAX_METRICS names (1,000 by default), a row each.
            with _reading(store) as (snapshot, freshness, source, _):
                found = queries.metric_catalog(source)
            items = [
                MetricResponse(
                    metric=m.metric,
                    device_count=m.device_count,
                    first_reading=format_utc(m.first_reading),
                    last_reading=format_utc(m.last_reading),
                    reading_count=m.reading_count,
                )
                for m in found
            ]
            return _Answer(snapshot, _made(MetricsResponse(items=items, freshness=freshness)))

        return await _answer(request, store, ("catalog",), compute)


class HealthController(Controller):
    path = "/"

    @get("/health", sync_to_thread=True, summary="Is the service up, which tables exist, and how far the pipeline lags")
    def health(self, store: NamedDependency[SnapshotStore], kafka_watch: NamedDependency[KafkaWatch]) -> HealthResponse:
        paths = store.paths
        snapshot = store.current
        tables = {t.value: duck.table_exists(paths, t) for t in Table}
        gold = deltalog.latest_version(paths.table(Table.GOLD), known=snapshot.gold_version)
        processed = checkpoint.processed_offsets(paths)
        partitions = kafka.lag(kafka_watch.newest, processed.next_offsets if processed else {})
        behind = None if kafka_watch.newest is None else records_behind(partitions)
        committed_at = gold.committed_at if gold else None
        since_commit = None if committed_at is None else (datetime.now(UTC) - committed_at).total_seconds()
        lag = PipelineLagResponse(
            last_gold_commit=_utc(committed_at),
            seconds_since_gold_commit=since_commit,
            checkpoint_batch=processed.batch_id if processed else None,
            records_behind=behind,
            partitions=[
                PartitionLagResponse(
                    topic=p.topic,
                    partition=p.partition,
                    newest_offset=p.newest_offset,
                    processed_offset=p.processed_offset,
                    records_behind=p.records_behind,
                )
                for p in partitions
            ],
            kafka_error=kafka_watch.error,
        )
        fresh = _freshness(snapshot, _watermark_us(store, snapshot)) if snapshot.ready else None
        return HealthResponse(status="ok", tables=tables, snapshot=fresh, pipeline=lag)

    @get("/livez", summary="Is the process up? (no lake access; for liveness probes)")
    async def livez(self) -> LiveResponse:
        return LiveResponse(status="ok")


class DashboardController(Controller):
    path = "/"
    include_in_schema = False

    @get("/", media_type=MediaType.HTML)
    async def dashboard(self) -> Response[bytes]:
        # Everything the page runs comes from this service; the policy makes the browser refuse anything else.
        headers = {
            "Content-Security-Policy": (
                "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
        }
        return Response((STATIC / "index.html").read_bytes(), media_type=MediaType.HTML, headers=headers)


# The dashboard's scripts and styles.
static_files = create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False)
