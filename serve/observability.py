"""Prometheus metrics of the snapshot and the pipeline's lag, and the service's logs as one JSON object a line."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

from litestar.enums import ScopeType
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Counter, Gauge, Histogram

from serve.snapshot import RefreshReport, Snapshot

PREFIX = "kpi_lakehouse"
# Requests and their latency per route template (group_path), so that timestamps in paths do not make new series.
PROMETHEUS = PrometheusConfig(app_name="kpi_lakehouse", prefix=PREFIX, group_path=True, exclude=["/metrics"])


class MetricsController(PrometheusController):
    """GET /metrics in Prometheus' text format; left out of the OpenAPI document, which would call it JSON."""

    include_in_schema = False


# Module-level: prometheus_client registers each name once per process, and every app in the process shares them.
SNAPSHOT_VERSION = Gauge(f"{PREFIX}_snapshot_version", "Delta table version the API serves", ["table"])
SNAPSHOT_AGE = Gauge(f"{PREFIX}_snapshot_age_seconds", "seconds since the served snapshot was loaded")
GOLD_COMMIT_AGE = Gauge(f"{PREFIX}_gold_commit_age_seconds", "seconds since the pipeline last committed to gold")
REFRESH_SECONDS = Histogram(
    f"{PREFIX}_snapshot_refresh_seconds",
    "time to look for a new version and load it",
    ["changed"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REFRESH_ERRORS = Counter(f"{PREFIX}_snapshot_refresh_errors_total", "refreshes that failed (the old snapshot stays)")
ANSWERS = Counter(
    f"{PREFIX}_answers_total",
    "answers to reads by how they were made: kept (the served snapshot's answer kept in memory: no query) or query",
    ["by"],
)
ANSWERED_KEPT, ANSWERED_BY_QUERY = ANSWERS.labels("kept"), ANSWERS.labels("query")
ANSWER_CACHE_BYTES = Gauge(f"{PREFIX}_answer_cache_bytes", "bytes of answers kept for the served snapshot")
RECORDS_BEHIND = Gauge(
    f"{PREFIX}_pipeline_records_behind", "Kafka records not yet processed by the pipeline (NaN when unknown)"
)

log = logging.getLogger("kpi_lakehouse.serve")


def track_answers(size_bytes: Callable[[], int]) -> None:
    ANSWER_CACHE_BYTES.set_function(lambda: float(size_bytes()))


def track_snapshot(current: Callable[[], Snapshot]) -> None:
    """Ages are computed when Prometheus scrapes, from the snapshot `current()` returns then."""

    def age(moment_of: str) -> float:
        snapshot: Snapshot = current()
        moment = getattr(snapshot, moment_of)
        return (datetime.now(UTC) - moment).total_seconds() if moment else float("nan")

    SNAPSHOT_AGE.set_function(lambda: age("loaded_at"))
    GOLD_COMMIT_AGE.set_function(lambda: age("gold_committed_at"))


def record_refresh(report: RefreshReport, snapshot: Snapshot) -> None:
    REFRESH_SECONDS.labels(changed=str(report.changed).lower()).observe(report.seconds)
    for table, version in (("gold", snapshot.gold_version), ("silver", snapshot.silver_version)):
        SNAPSHOT_VERSION.labels(table=table).set(float("nan") if version is None else version)
    if report.changed:
        log.info(
            "snapshot loaded",
            extra={
                "fields": {
                    "gold_version": snapshot.gold_version,
                    "silver_version": snapshot.silver_version,
                    "rows": report.rows,
                    "seconds": round(report.seconds, 4),
                }
            },
        )


def record_refresh_error(exc: Exception) -> None:
    REFRESH_ERRORS.inc()
    log.warning("snapshot refresh failed; serving the previous one", extra={"fields": {"error": str(exc)[:500]}})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging() -> None:
    """The service's own logger writes JSON lines to stderr (idempotent: apps made again reuse the handler)."""
    if not any(isinstance(h.formatter, JsonFormatter) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class AccessLog:
    """ASGI middleware: one structured line per request with method, route, status and duration."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:  # a str enum: equal to "http"
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = scope.get("client")
            log.info(
                "request",
                extra={
                    "fields": {
                        "method": scope["method"],
                        "path": scope["path"][:200],
                        "status": status,
                        "ms": round((time.perf_counter() - started) * 1000, 2),
                        "client": client[0] if client else None,
                    }
                },
            )
