"""The Litestar app factory: the lake upgraded if it predates metrics, then its snapshot and the Kafka watch opened
in the lifespan, dependencies, middleware, problem details and routes (`serve.controllers`), the dashboard at `/`,
OpenAPI at /schema."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.middleware import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.openapi import OpenAPIConfig
from litestar.plugins.problem_details import ProblemDetailsConfig, ProblemDetailsPlugin
from uvicorn.protocols.http.h11_impl import H11Protocol

from lake.settings import Settings
from lake.tables import LakePaths
from serve import controllers, errors, observability
from serve.background import KafkaWatch, Refresher
from serve.snapshot import SnapshotStore

# Requests carry no body (every route is GET); anything bigger than this is refused before it is read.
MAX_BODY_BYTES = 16 * 1024
log = logging.getLogger("kpi_lakehouse.serve")


def provide_store(state: State) -> SnapshotStore:
    return state.store


def provide_settings(state: State) -> Settings:
    return state.settings


def provide_kafka_watch(state: State) -> KafkaWatch:
    return state.kafka_watch


def upgrade_lake(paths: LakePaths) -> None:
    """Bring a lake written before metrics to this release's tables (lake.upgrade: idempotent, and a read of the
    tables' properties when there is nothing to do), before the store reads them: a `metric` column the store's
    keys need, its readings as metric `value`."""
    from lake import objectstore
    from lake.upgrade import upgrade_lake as upgrade  # only at start: the module writes Delta tables

    if objectstore.is_s3(paths.root):
        # What is missing (credentials, the server, the bucket) in one line, rather than delta-rs's first failure.
        objectstore.check_access(paths.root)
    upgrade(paths)


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings()
    paths = LakePaths.from_settings(settings)
    observability.configure_logging()

    @asynccontextmanager
    async def open_lake(app: Litestar) -> AsyncIterator[None]:
        await asyncio.to_thread(upgrade_lake, paths)
        store = SnapshotStore.from_settings(settings)
        if not store.current.from_store:
            # A never-seen lake (or one made anew): pin its versions and answer from it while the file is built.
            # A store file that exists is caught up by the refresher's first tick instead, which start waits for.
            try:
                observability.record_refresh(store.refresh(), store.current)
            except Exception as exc:  # noqa: BLE001 (served as 503 until a refresh succeeds)
                observability.record_refresh_error(exc)
        observability.track_snapshot(lambda: store.current)
        refresher = Refresher(
            store,
            settings.api_refresh_interval,
            on_refresh=lambda report: observability.record_refresh(report, store.current),
            on_error=observability.record_refresh_error,
            at_start=store.current.from_store,
        )
        watch = KafkaWatch(settings, paths)
        app.state.store, app.state.kafka_watch, app.state.settings = store, watch, settings
        observability.track_answers(lambda: store.answers.size_bytes)
        refresher.start()
        watch.start()
        try:
            if store.current.from_store:
                # Answer at the lake's versions from the first request: the catch-up reads only what changed since
                # the file's versions. A file far behind (a long stop) answers at its own versions past the bound.
                caught_up = await asyncio.to_thread(refresher.first_tick_done.wait, settings.api_catch_up_seconds)
                if not caught_up:
                    log.warning(
                        "the serving store is still catching up after %.0f s; answering at gold version %s meanwhile",
                        settings.api_catch_up_seconds,
                        store.current.gold_version,
                    )
            yield
        finally:
            watch.stop(wait=False)  # a Kafka request in flight ends within its timeout; nothing waits for it
            refresher.stop()
            store.close()

    middleware: list = [
        DefineMiddleware(observability.AccessLog),
        DefineMiddleware(errors.RequestHeadLimit),
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
            controllers.KpiController,
            controllers.DeviceController,
            controllers.CatalogController,
            controllers.HealthController,
            controllers.DashboardController,
            controllers.static_files,
            observability.MetricsController,
        ],
        lifespan=[open_lake],
        dependencies={
            "store": Provide(provide_store, sync_to_thread=False),
            "settings": Provide(provide_settings, sync_to_thread=False),
            "kafka_watch": Provide(provide_kafka_watch, sync_to_thread=False),
        },
        middleware=middleware,
        cors_config=CORSConfig(allow_origins=origins, allow_methods=["GET"]) if origins else None,
        request_max_body_size=MAX_BODY_BYTES,
        exception_handlers={Exception: errors.internal_error},
        plugins=[
            ProblemDetailsPlugin(
                ProblemDetailsConfig(exception_to_problem_detail_map={HTTPException: errors.as_problem})
            )
        ],
        openapi_config=OpenAPIConfig(title="kpi-lakehouse", version="0.1.0", path="/schema"),
    )


class NoDelayHttp(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with Nagle's algorithm off on each connection. asyncio turns it off only for a
    socket made with protocol IPPROTO_TCP, and uvicorn's listening socket with `--workers` is made with protocol 0:
    each answer's body then waited for the client's delayed ACK of its head, 40 ms."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
