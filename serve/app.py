"""The Litestar app: KPIs of a bucket and of a range, devices, health with the pipeline's lag, Prometheus metrics,
the dashboard at `/`, OpenAPI at /schema; errors as RFC 9457 problem details."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

import duckdb
import msgspec
from litestar import Litestar, MediaType, Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    TooManyRequestsException,
    ValidationException,
)
from litestar.middleware import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.params import Parameter
from litestar.plugins.problem_details import ProblemDetailsConfig, ProblemDetailsException, ProblemDetailsPlugin
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, Receive, Scope, Send

from lake import checkpoint, deltalog, duck, kafka
from lake.settings import Settings, local_path
from lake.snapshot import Refresher, Snapshot, SnapshotStore
from lake.tables import KPI_FIELDS, LakePaths, Table
from lake.timestamps import MAX_US, Grain, TimestampError, format_utc, from_us, parse_timestamp_us
from serve import observability

STATIC = Path(__file__).parent / "static"
MAX_PAGE = 10_000
# Requests carry no body (every route is GET); anything bigger than this is refused before it is read.
MAX_BODY_BYTES = 16 * 1024
MAX_HEAD_BYTES = 16 * 1024
_TIMESTAMP_DOC = "RFC 3339 / ISO 8601 instant such as 2024-07-30T12:00:00Z; '+' of an offset as %2B"
log = logging.getLogger("kpi_lakehouse.serve")


class Freshness(msgspec.Struct, kw_only=True):
    gold_version: int
    silver_version: int
    newest_event: str | None  # the newest second in gold
    last_gold_commit: str | None  # when the pipeline last committed to gold
    snapshot_loaded_at: str | None


class KpiResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    timestamp: str
    grain: str
    device_id: str | None = None
    reading_count: int
    device_count: int
    average_value: float
    min_value: float
    max_value: float
    sum_value: float
    stddev_value: float | None
    freshness: Freshness | None = None


class KpiPoint(msgspec.Struct, kw_only=True):
    timestamp: str
    reading_count: int
    device_count: int
    average_value: float
    min_value: float
    max_value: float
    sum_value: float
    stddev_value: float | None


class KpiSeriesResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
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


def _problem(status: int, title: str, detail: str) -> ProblemDetailsException:
    return ProblemDetailsException(status_code=status, title=title, detail=detail)


def _utc(moment: datetime | None) -> str | None:
    return None if moment is None else format_utc(moment)


def _freshness(snapshot: Snapshot) -> Freshness:
    if not snapshot.ready:
        raise _problem(503, "Lake not ready", "the lake has no gold and silver tables yet; run `lakehouse pipeline`")
    return Freshness(
        gold_version=snapshot.gold_version or 0,
        silver_version=snapshot.silver_version or 0,
        newest_event=_utc(snapshot.newest_event),
        last_gold_commit=_utc(snapshot.gold_committed_at),
        snapshot_loaded_at=_utc(snapshot.loaded_at),
    )


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of If-None-Match against the current ETag."""
    if not if_none_match:
        return False
    candidates = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in candidates or etag in candidates


def _conditional(request: Request, snapshot: Snapshot, body: object) -> Response:
    """200 with the body, or 304 when the client already holds this snapshot's answer; both carry the ETag."""
    headers = {"ETag": snapshot.etag, "Cache-Control": "no-cache"}
    if _etag_matches(request.headers.get("if-none-match"), snapshot.etag):
        return Response(content=b"", status_code=304, headers=headers)
    return Response(content=body, headers=headers)


def _instant(name: str, text: str) -> int:
    try:
        return parse_timestamp_us(text)
    except TimestampError as exc:
        raise _problem(400, f"Bad {name}", f"{name}: {exc}") from None


def _store(state: State) -> SnapshotStore:
    return state.store


@contextmanager
def _reading(state: State) -> Iterator[tuple[Snapshot, Freshness, duckdb.DuckDBPyConnection]]:
    """One snapshot's cursor and freshness for a request; a lake without tables is a 503."""
    store = _store(state)
    if local_path(store.paths.root) is None:
        raise _problem(503, "Lake not served", (
            f"the API reads lakes on local disk only (a folder or file: URI), not {store.paths.root}; "
            "serve it from a local copy or a mounted bucket"
        ))  # fmt: skip
    with store.read() as (snapshot, cursor):
        freshness = _freshness(snapshot)
        try:
            yield snapshot, freshness, cursor
        except duck.LakeError as exc:
            raise _problem(503, "Lake not ready", str(exc)) from None


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details, the body of every error."""

    status: int
    title: str
    detail: str | None = None
    type: str | None = None
    errors: list[dict[str, str]] | None = None  # what failed validation, parameter by parameter


def _problem_spec(description: str) -> ResponseSpec:
    return ResponseSpec(Problem, description=description, media_type="application/problem+json")


_READ_RESPONSES = {
    304: ResponseSpec(None, description="Not modified: the If-None-Match ETag is the current snapshot's"),
    400: _problem_spec("A parameter that cannot be read or is out of range"),
    429: _problem_spec("Too many requests from this address (when LAKEHOUSE_API_RATE_LIMIT is set)"),
    503: _problem_spec("The lake has no gold and silver tables yet"),
}
_KPI_RESPONSES = {**_READ_RESPONSES, 404: _problem_spec("The bucket has no readings")}


@get(
    "/kpis/{timestamp:str}",
    sync_to_thread=True,
    summary="KPIs of the bucket that contains an instant",
    responses=_KPI_RESPONSES,
)
def get_kpis(
    request: Request,
    state: State,
    timestamp: Annotated[str, Parameter(description=_TIMESTAMP_DOC, max_length=64)],
    grain: Annotated[Grain, Parameter(description="bucket size")] = Grain.SECOND,
    device_id: Annotated[
        str | None, Parameter(description="KPIs of this device only", min_length=1, max_length=512)
    ] = None,
) -> Response[KpiResponse]:
    instant_us = _instant("timestamp", timestamp)
    with _reading(state) as (snapshot, freshness, cursor):
        found = duck.kpis(cursor, instant_us, grain, device_id)
    bucket = format_utc(from_us(grain.bucket_start_us(instant_us)))
    if found is None:
        who = f" for device {device_id!r}" if device_id else ""
        raise _problem(404, "No readings", f"no readings in the {grain.value} starting {bucket}{who}")
    body = KpiResponse(
        timestamp=bucket, grain=grain.value, device_id=device_id, freshness=freshness,
        **{name: getattr(found, name) for name in KPI_FIELDS},
    )  # fmt: skip
    return _conditional(request, snapshot, body)


@get(
    "/kpis",
    sync_to_thread=True,
    summary="KPIs of every bucket with readings in a range, oldest first, a page at a time",
    responses=_READ_RESPONSES,
)
def get_kpi_series(
    request: Request,
    state: State,
    start: Annotated[
        str, Parameter(description=f"{_TIMESTAMP_DOC}; the bucket holding it is the first", max_length=64)
    ],
    end: Annotated[
        str, Parameter(description=f"{_TIMESTAMP_DOC}; buckets starting before it are included", max_length=64)
    ],
    grain: Annotated[Grain, Parameter(description="bucket size")] = Grain.SECOND,
    device_id: Annotated[
        str | None, Parameter(description="KPIs of this device only", min_length=1, max_length=512)
    ] = None,
    limit: Annotated[int, Parameter(description="most buckets in this page", ge=1, le=MAX_PAGE)] = 1000,
) -> Response[KpiSeriesResponse]:
    start_us, end_us = _instant("start", start), _instant("end", end)
    if start_us > end_us:
        raise _problem(400, "Bad range", f"start {start} is after end {end}; give start <= end")
    settings: Settings = state.settings
    first_us = grain.bucket_start_us(start_us)
    # Whole buckets: the last one is the bucket that starts before `end` (clamped at the last representable instant).
    stop_us = min(
        end_us if end_us == grain.bucket_start_us(end_us) else grain.bucket_start_us(end_us) + grain.micros, MAX_US
    )
    buckets = (stop_us - first_us) // grain.micros
    if buckets > settings.api_max_range_buckets:
        raise _problem(400, "Range too large", (
            f"the range spans {buckets:,} {grain.value}s, more than the {settings.api_max_range_buckets:,} allowed "
            f"(LAKEHOUSE_API_MAX_RANGE_BUCKETS); narrow it or use a coarser grain"
        ))  # fmt: skip
    with _reading(state) as (snapshot, freshness, cursor):
        rows = duck.kpi_series(cursor, first_us, stop_us, grain, device_id, limit + 1)
    next_page = None
    if len(rows) > limit:
        query = {
            "start": format_utc(from_us(rows[limit].bucket_start_us)),
            "end": end,
            "grain": grain.value,
            "limit": limit,
        }
        if device_id is not None:
            query["device_id"] = device_id
        next_page = f"/kpis?{urlencode(query)}"
    points = [
        KpiPoint(
            timestamp=format_utc(from_us(row.bucket_start_us)), **{name: getattr(row, name) for name in KPI_FIELDS}
        )
        for row in rows[:limit]
    ]
    body = KpiSeriesResponse(
        grain=grain.value, device_id=device_id, start=format_utc(from_us(first_us)), end=format_utc(from_us(stop_us)),
        items=points, next=next_page, freshness=freshness,
    )  # fmt: skip
    return _conditional(request, snapshot, body)


@get(
    "/devices",
    sync_to_thread=True,
    summary="Known devices with their first and last reading time and reading count, ordered by id",
    responses=_READ_RESPONSES,
)
def get_devices(
    request: Request,
    state: State,
    after: Annotated[
        str | None, Parameter(description="start after this device id (from `next`)", min_length=1, max_length=512)
    ] = None,
    limit: Annotated[int, Parameter(description="most devices in this page", ge=1, le=MAX_PAGE)] = 1000,
) -> Response[DevicesResponse]:
    with _reading(state) as (snapshot, freshness, cursor):
        found = duck.devices(cursor, after, limit + 1)
    items = [
        DeviceResponse(device_id=d.device_id, first_reading=format_utc(d.first_reading),
                       last_reading=format_utc(d.last_reading), reading_count=d.reading_count)
        for d in found[:limit]
    ]  # fmt: skip
    next_page = f"/devices?{urlencode({'after': items[-1].device_id, 'limit': limit})}" if len(found) > limit else None
    return _conditional(request, snapshot, DevicesResponse(items=items, next=next_page, freshness=freshness))


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
            observability.RECORDS_BEHIND.set(_records_behind(self.lag()) if self.newest is not None else float("nan"))
            if self._stop.wait(self._interval_s):
                return

    def lag(self) -> list[kafka.PartitionLag]:
        processed = checkpoint.processed_offsets(self.paths)
        return kafka.lag(self.newest, processed.next_offsets if processed else {})

    def stop(self) -> None:
        self._stop.set()


def _records_behind(partitions: list[kafka.PartitionLag]) -> int:
    return sum(p.records_behind or 0 for p in partitions)


@get("/health", sync_to_thread=True, summary="Is the service up, which tables exist, and how far the pipeline lags")
def health(state: State) -> HealthResponse:
    store = _store(state)
    paths: LakePaths = store.paths
    snapshot = store.current
    tables = {t.value: duck.table_exists(paths, t) for t in Table}
    gold = deltalog.latest_version(paths.table(Table.GOLD))
    processed = checkpoint.processed_offsets(paths)
    watch: KafkaWatch = state.kafka_watch
    partitions = kafka.lag(watch.newest, processed.next_offsets if processed else {})
    behind = None if watch.newest is None else _records_behind(partitions)
    committed_at = gold.committed_at if gold else None
    lag = PipelineLagResponse(
        last_gold_commit=_utc(committed_at),
        seconds_since_gold_commit=None if committed_at is None else (datetime.now(UTC) - committed_at).total_seconds(),
        checkpoint_batch=processed.batch_id if processed else None,
        records_behind=behind,
        partitions=[PartitionLagResponse(topic=p.topic, partition=p.partition, newest_offset=p.newest_offset,
                                         processed_offset=p.processed_offset, records_behind=p.records_behind)
                    for p in partitions],
        kafka_error=watch.error,
    )  # fmt: skip
    fresh = None
    if snapshot.ready:
        fresh = _freshness(snapshot)
    return HealthResponse(status="ok", tables=tables, snapshot=fresh, pipeline=lag)


class LiveResponse(msgspec.Struct, kw_only=True):
    status: str


@get("/livez", summary="Is the process up? (no lake access; for liveness probes)")
async def livez() -> LiveResponse:
    return LiveResponse(status="ok")


@get("/", include_in_schema=False, media_type=MediaType.HTML)
async def dashboard() -> Response[bytes]:
    # Everything the page runs comes from this service; the policy makes the browser refuse anything else.
    headers = {
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
    }
    return Response((STATIC / "index.html").read_bytes(), media_type=MediaType.HTML, headers=headers)


_WHAT_TO_DO = {
    ValidationException: "the parameters, their types and ranges are in the OpenAPI document at /schema",
    NotFoundException: "no such route; the API's routes are listed at /schema",
    MethodNotAllowedException: "the API answers GET requests only",
    TooManyRequestsException: "too many requests from this address; the RateLimit-Reset header says when to try again",
}


def _as_problem(exc: HTTPException) -> ProblemDetailsException:
    """Litestar's own errors (validation, routing, rate limit) as problem details that say what to do."""
    advice = next((text for kind, text in _WHAT_TO_DO.items() if isinstance(exc, kind)), None)
    detail = exc.detail if exc.detail != HTTPStatus(exc.status_code).phrase else None
    if detail and len(detail) > 300:  # Litestar quotes the whole URL; a long bad input is not sent back whole
        detail = detail[:300] + "..."
    return ProblemDetailsException(
        status_code=exc.status_code,
        title=HTTPStatus(exc.status_code).phrase,
        detail="; ".join(filter(None, [detail, advice])) or None,
        headers=exc.headers,
        extra={"errors": exc.extra} if isinstance(exc.extra, list) and exc.extra else None,
    )


class RequestHeadLimit:
    """ASGI middleware: a request whose target and headers together pass MAX_HEAD_BYTES is answered 431 unread."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(name) + len(value) for name, value in scope.get("headers", []))
            if size > MAX_HEAD_BYTES:
                body = msgspec.json.encode(Problem(
                    status=431, title="Request Header Fields Too Large",
                    detail=f"the request's target and headers take {size:,} bytes, over {MAX_HEAD_BYTES:,}; send less",
                ))  # fmt: skip
                headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 431, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"fields": {"path": request.url.path[:200]}})
    body = {"type": "about:blank", "title": "Internal Server Error", "status": 500,
            "detail": "the server failed to answer this request; the error is in its log"}  # fmt: skip
    return Response(body, status_code=500, media_type="application/problem+json")


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings()
    paths = LakePaths.from_settings(settings)
    observability.configure_logging()

    @asynccontextmanager
    async def open_lake(app: Litestar) -> AsyncIterator[None]:
        store = SnapshotStore(paths)
        try:
            observability.record_refresh(store.refresh(), store.current)
        except Exception as exc:  # noqa: BLE001 (served as 503 until a refresh succeeds)
            observability.record_refresh_error(exc)
        observability.track_snapshot(lambda: store.current)
        refresher = Refresher(
            store, settings.api_refresh_seconds,
            on_refresh=lambda report: observability.record_refresh(report, store.current),
            on_error=observability.record_refresh_error,
        )  # fmt: skip
        watch = KafkaWatch(settings, paths)
        app.state.store, app.state.kafka_watch, app.state.settings = store, watch, settings
        refresher.start()
        watch.start()
        try:
            yield
        finally:
            watch.stop()
            refresher.stop()
            store.close()

    middleware: list = [
        DefineMiddleware(observability.AccessLog),
        DefineMiddleware(RequestHeadLimit),
        observability.PROMETHEUS.middleware,
    ]
    if settings.api_rate_limit > 0:
        limiter = RateLimitConfig(
            rate_limit=("minute", settings.api_rate_limit), exclude=["/health", "/livez", "/metrics"]
        )
        middleware.append(limiter.middleware)
    origins = [origin.strip() for origin in settings.api_cors_origins.split(",") if origin.strip()]
    return Litestar(
        route_handlers=[
            get_kpis,
            get_kpi_series,
            get_devices,
            health,
            livez,
            dashboard,
            observability.MetricsController,
            create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False),
        ],
        lifespan=[open_lake],
        middleware=middleware,
        cors_config=CORSConfig(allow_origins=origins, allow_methods=["GET"]) if origins else None,
        request_max_body_size=MAX_BODY_BYTES,
        exception_handlers={Exception: _internal_error},
        plugins=[
            ProblemDetailsPlugin(ProblemDetailsConfig(exception_to_problem_detail_map={HTTPException: _as_problem}))
        ],
        openapi_config=OpenAPIConfig(title="kpi-lakehouse", version="0.1.0", path="/schema"),
    )
