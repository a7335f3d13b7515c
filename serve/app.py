"""The Litestar app: GET /kpis/{timestamp}, GET /health, OpenAPI at /schema, errors as RFC 9457 problem details."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import duckdb
import msgspec
from litestar import Litestar, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.params import Parameter
from litestar.plugins.problem_details import ProblemDetailsConfig, ProblemDetailsException, ProblemDetailsPlugin

from lake import duck
from lake.settings import Settings
from lake.tables import KPI_FIELDS, LakePaths, Table
from lake.timestamps import Grain, TimestampError, format_utc, from_us, parse_timestamp_us


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


class HealthResponse(msgspec.Struct, kw_only=True):
    status: str
    tables: dict[str, bool]


class Lake:
    """The service's DuckDB connection; each request works on its own cursor."""

    def __init__(self, paths: LakePaths) -> None:
        self.paths = paths
        self.connection = duck.connect(paths)
        self._views = set(self._existing())
        self._lock = threading.Lock()

    def _existing(self) -> list[Table]:
        return [t for t in Table if duck.table_exists(self.paths, t)]

    def cursor(self) -> duckdb.DuckDBPyConnection:
        if len(self._views) < len(Table):
            # Tables appear when the pipeline first runs; add their views without a restart.
            with self._lock:
                missing = set(self._existing()) - self._views
                if missing:
                    self._views |= set(duck.create_views(self.connection, self.paths))
        return self.connection.cursor()


def _lake(state: State) -> duckdb.DuckDBPyConnection:
    return state.lake.cursor()


def _problem(status: int, title: str, detail: str) -> ProblemDetailsException:
    return ProblemDetailsException(status_code=status, title=title, detail=detail)


@get(
    "/kpis/{timestamp:str}",
    dependencies={"cursor": Provide(_lake, sync_to_thread=False)},
    sync_to_thread=True,
    summary="KPIs of the bucket that contains an instant",
    raises=[ProblemDetailsException],
)
def get_kpis(
    timestamp: Annotated[str, Parameter(description="RFC 3339 / ISO 8601 instant; '+' of an offset as %2B")],
    cursor: duckdb.DuckDBPyConnection,
    grain: Annotated[Grain, Parameter(description="bucket size")] = Grain.SECOND,
    device_id: Annotated[str | None, Parameter(description="KPIs of this device only", min_length=1, max_length=512)] = None,
) -> KpiResponse:
    try:
        instant_us = parse_timestamp_us(timestamp)
    except TimestampError as exc:
        raise _problem(400, "Bad timestamp", str(exc)) from None
    try:
        found = duck.kpis(cursor, instant_us, grain, device_id)
    except duck.LakeError as exc:
        raise _problem(503, "Lake not ready", str(exc)) from None
    finally:
        cursor.close()
    bucket = format_utc(from_us(grain.bucket_start_us(instant_us)))
    if found is None:
        who = f" for device {device_id!r}" if device_id else ""
        raise _problem(404, "No readings", f"no readings in the {grain.value} starting {bucket}{who}")
    return KpiResponse(
        timestamp=bucket, grain=grain.value, device_id=device_id, **{name: getattr(found, name) for name in KPI_FIELDS}
    )


@get("/health", summary="Is the service up, and which tables can it read?")
async def health(state: State) -> HealthResponse:
    tables = {t.value: duck.table_exists(state.lake.paths, t) for t in Table}
    return HealthResponse(status="ok", tables=tables)


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings()
    paths = LakePaths.from_settings(settings)

    @asynccontextmanager
    async def open_lake(app: Litestar) -> AsyncIterator[None]:
        app.state.lake = Lake(paths)
        try:
            yield
        finally:
            app.state.lake.connection.close()

    return Litestar(
        route_handlers=[get_kpis, health],
        lifespan=[open_lake],
        plugins=[ProblemDetailsPlugin(ProblemDetailsConfig(enable_for_all_http_exceptions=True))],
        openapi_config=OpenAPIConfig(title="kpi-lakehouse", version="0.1.0", path="/schema"),
    )
