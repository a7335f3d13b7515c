"""`lakehouse bench`: ingest, freshness, lookups and memory, each beside a reference measured in the same run.

It starts what it needs (a local Kafka broker on its own port with fresh storage, the pipeline and the API as
subprocesses, a Spark session for the references) in a work folder, and reports medians and ratios, never a
single timing against a fixed number alone.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from bench.memory import PeakSampler
from bench.processes import free_port, running_api, start_lakehouse, stop_group
from bench.serving_lake import LakeShape
from lake.settings import MIB, Settings

if TYPE_CHECKING:
    from lake.tables import LakePaths


@dataclass
class Figure:
    name: str
    ours: float
    unit: str
    reference: float | None = None
    reference_name: str = ""
    goal: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference in (None, 0) or self.ours == 0:
            return None
        return self.ours / self.reference  # type: ignore[operator]


@dataclass
class Plan:
    """Sizes of one run; `quick()` is the smoke run CI makes."""

    ingest_mib: int = 1024
    ingest_metrics: int = 8  # metrics per reading of the second ingest run (`metrics` form); 0: no second run
    freshness_readings: int = 60
    freshness_rate: float = 2.0
    # Sent at the same rate just before the measured readings, not measured: the stream's JVM compiles its hot code
    # in its first minute (a small micro-batch took 4.0 s over the first ten and 3.0 s after, bench/batch_loop.py),
    # and a stream runs for days. A minute, so that the pipeline's first rollups batch with readings (30 s in, 8-11 s
    # long where a warm one takes 3-4 s) is behind it too.
    freshness_warmup: int = 120
    lookup_seconds: int = 1_000_000
    lookup_rate: float = 500
    lookup_duration_s: float = 10
    tutorial_requests: int = 20
    # Device-metric-seconds of the serving lake (devices at 1 Hz, before its gaps): 1,000 devices of 8 metrics over
    # 12,500 seconds.
    serving_readings: int = 100_000_000
    serving_devices: int = 1000
    serving_requests: int = 300  # timed requests per question, one client
    serving_checks: int = 10  # answers per question checked against the formula

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            ingest_mib=5,
            # The 8-metric ingest run is left out of the smoke run: tests/test_notebooks.py sends a fleet of
            # metrics through the producer and the pipeline already.
            ingest_metrics=0,
            freshness_readings=6,
            freshness_rate=2.0,
            freshness_warmup=2,
            lookup_seconds=20_000,
            lookup_rate=100,
            lookup_duration_s=3,
            tutorial_requests=5,
            # Two UTC days of 16 devices: the lake of tests/test_serving_scale.py, built once for both.
            serving_readings=16 * 2 * 86_400,  # 1,000 devices of 8 metrics over 345 seconds
            serving_devices=1000,
            serving_requests=50,
            serving_checks=3,
        )


@dataclass
class Context:
    settings: Settings  # broker, jars, Spark sizing; each part gets its own topic and lake under `folder`
    folder: Path
    plan: Plan
    say: Callable[[str], None]
    figures: list[Figure] = field(default_factory=list)
    _spark: object | None = None

    def part(self, name: str) -> Settings:
        return self.settings.model_copy(
            update={
                "topic": f"bench-{name}-{uuid.uuid4().hex[:6]}",
                "lake_root": str(self.folder / name / "lake"),
                "checkpoint_root": None,
            }
        )

    def spark(self):  # type: ignore[no-untyped-def]
        if self._spark is None:
            from pipeline.stream.spark import build_session

            self._spark = build_session(self.settings, app_name="kpi-lakehouse-bench")
        return self._spark

    def stop_spark(self) -> None:
        if self._spark is not None:
            self._spark.stop()  # type: ignore[attr-defined]
            self._spark = None


def _produce(settings: Settings, payloads: list[bytes]) -> None:
    from pipeline.kafka.broker import ensure_topic
    from pipeline.kafka.produce import produce

    ensure_topic(settings)
    report = produce(settings, payloads)
    report.raise_for_problems(settings.max_message_bytes)


# ---------------------------------------------------------------------------------------------------- ingest


def ingest_messages(mib: int, max_message_bytes: int, metrics: int = 0) -> list[bytes]:
    """The ingest part's backlog: about `mib` MiB of batch messages filled up to `max_message_bytes`, from a fleet of
    200 devices over an hour (deterministic); with `metrics`, readings of that many metrics in the `metrics` form."""
    from pipeline.kafka.synthetic import Fleet, generate

    count = max(1, round(mib * MIB / max_message_bytes))
    fleet = Fleet(
        devices=200,
        messages=count,
        full_batches=count,
        max_message_bytes=max_message_bytes,
        span_seconds=3600,
        seed=3,
        metrics=metrics,
    )
    return list(generate(fleet))


@dataclass
class IngestRun:
    settings: Settings  # its topic and lake
    total: int  # bytes of messages
    readings: int  # rows into silver and gold: metric values
    batches: int
    processing: float  # from the first micro-batch's start to the last one's end
    wall: float
    spent: str  # seconds per stage, over all batches
    memory: PeakSampler


def _ingest_run(ctx: Context, name: str, metrics: int) -> IngestRun:
    settings = ctx.part(name)
    form = f"{metrics} metrics per reading" if metrics else "one value per reading"
    ctx.say(f"{name}: generating {ctx.plan.ingest_mib} MiB of messages of up to 5 MiB, {form}")
    payloads = ingest_messages(ctx.plan.ingest_mib, settings.max_message_bytes, metrics)
    total = sum(len(p) for p in payloads)
    _produce(settings, payloads)
    del payloads

    ctx.say(f"{name}: the pipeline on {total / MIB:.0f} MiB already in Kafka")
    report = ctx.folder / f"{name}-batches.jsonl"
    started = time.monotonic()
    log = ctx.folder / f"{name}-pipeline.log"
    pipeline = start_lakehouse(settings, "pipeline", "--available-now", "--report", str(report), log=log)
    with PeakSampler(pipeline.pid) as memory:
        pipeline.wait()
    wall = time.monotonic() - started
    if pipeline.returncode != 0:
        raise RuntimeError(f"the pipeline failed; see {log}")
    ctx.say(f"{name}: {memory.describe()}")
    # From the first micro-batch's start to the last one's end: Spark's start is left out, the work between
    # micro-batches (offsets, checkpoint commits) is counted.
    batches = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    if not batches:
        raise RuntimeError(f"the pipeline reported no micro-batch in {report}; see {log}")
    processing = batches[-1]["finished_at"] - (batches[0]["finished_at"] - batches[0]["seconds"])
    stages: dict[str, float] = {}
    for batch in batches:
        for stage, seconds in batch["stages"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    spent = ", ".join(f"{stage} {seconds:,.1f} s" for stage, seconds in stages.items())
    readings = sum(batch["readings"] for batch in batches)
    return IngestRun(settings, total, readings, len(batches), processing, wall, spent, memory)


def bench_ingest(ctx: Context) -> None:
    run = _ingest_run(ctx, "ingest", 0)
    settings = run.settings
    total, readings, processing, memory = run.total, run.readings, run.processing, run.memory

    ctx.say("ingest: the floor, raw append then from_json + explode append of the same records")
    from bench.floors import ingest_floor

    floor = ingest_floor(ctx.spark(), settings, ctx.folder / "ingest-floor")
    ours_mb, floor_mb = total / 1e6 / processing, total / 1e6 / floor.seconds
    ours_rate, floor_rate = readings / processing, floor.readings / floor.seconds
    floor_name = "raw append + from_json/explode append"
    ctx.figures.append(
        Figure(
            "ingest, Kafka to gold (micro-batches)",
            ours_mb,
            "MB/s",
            floor_mb,
            floor_name,
            "≥ 1.0x floor",
            ours_mb >= floor_mb,
            f"{readings:,} readings in {run.batches} micro-batch{'' if run.batches == 1 else 'es'} ({run.spent}); "
            f"{run.wall:.0f} s wall with Spark's start; floor: raw {floor.raw_seconds:.1f} s + parsed "
            f"{floor.parsed_seconds:.1f} s",
        )
    )
    ctx.figures.append(
        Figure(
            "ingest readings/s, Kafka to gold",
            ours_rate,
            "readings/s",
            floor_rate,
            floor_name,
            "≥ 1.0x floor",
            ours_rate >= floor_rate,
        )
    )
    # No goal: the floor leaves out gold, which the contract cannot do without (nor its checks and deduplication).
    least_mb = total / 1e6 / floor.minimum_seconds
    ctx.figures.append(
        Figure(
            "ingest against the contract's minimum writes",
            ours_mb,
            "MB/s",
            least_mb,
            "the floor's two appends + gold's KPIs appended",
            note=f"gold's KPIs per second of the parsed table: {floor.gold_seconds:.1f} s; that reference is "
            f"{least_mb / floor_mb:.2f}x the floor",
        )
    )
    if ctx.plan.ingest_metrics:
        named = _ingest_run(ctx, "ingest-metrics", ctx.plan.ingest_metrics)
        values_rate = named.readings / named.processing
        ctx.figures.append(
            Figure(
                f"ingest metric values/s, {ctx.plan.ingest_metrics} metrics per reading, Kafka to gold",
                values_rate,
                "values/s",
                ours_rate,
                "readings/s of the one-value fleet above",
                "≥ 1.0x",
                values_rate >= ours_rate,
                f"{named.readings:,} metric values ({named.total / MIB:.0f} MiB, `metrics` form, most devices all "
                f"{ctx.plan.ingest_metrics}) in {named.batches} micro-batches ({named.spent}); "
                f"{named.total / 1e6 / named.processing:.2f} MB/s; {named.wall:.0f} s wall with Spark's start; "
                f"JVM peak {named.memory.jvm_rss / MIB:,.0f} MiB",
            )
        )
    heap = settings.spark_driver_memory
    from pipeline.ops.doctor import parse_memory

    # The JVM is bounded by its heap plus Spark's and Java's own overhead; the Python workers by the Arrow batch
    # size (32 MiB of messages each) and what those messages parse into.
    jvm_bound = (parse_memory(heap) or 0) + 1536 * MIB
    ctx.figures.append(
        Figure(
            "pipeline peak RSS, JVM",
            memory.jvm_rss / MIB,
            "MiB",
            goal=f"≤ heap + 1.5 GiB = {jvm_bound / MIB:,.0f} MiB",
            met=memory.jvm_rss <= jvm_bound,
            note=f"{total / MIB:.0f} MiB backlog of 5 MiB messages; driver heap {heap}, "
            f"{settings.max_offsets_per_trigger} records per trigger; whole tree (JVM, Python driver and workers) "
            f"{memory.tree_pss / MIB:,.0f} MiB PSS at its peak",
        )
    )


# ------------------------------------------------------------------------------------------------- freshness


_FRESH_BASE = datetime(2031, 1, 1, tzinfo=UTC)


def _fresh_reading(n: int) -> bytes:
    from lake.timestamps import format_utc

    moment = _FRESH_BASE + timedelta(seconds=n)
    return json.dumps({"device_id": "fresh-1", "timestamp": format_utc(moment), "value": float(n)}).encode()


def _visibility(ctx: Context, settings: Settings, visible: Callable[[set[int]], set[int]]) -> list[float]:
    """Send the plan's warm-up readings, then its measured ones, at its rate in one stream; `visible(pending)` says
    which became visible (asked every 50 ms, one cheap question for all of them, so that the probe does not take the
    cores it measures). The latencies are the measured readings'."""
    from pipeline.kafka.produce import produce

    warmup, rate = ctx.plan.freshness_warmup, ctx.plan.freshness_rate
    count = warmup + ctx.plan.freshness_readings
    sent: dict[int, float] = {}

    def send() -> None:
        for n in range(1, count + 1):
            sent[n] = time.monotonic()
            produce(settings, [_fresh_reading(n)])
            time.sleep(max(0.0, 1 / rate - (time.monotonic() - sent[n])))

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    latencies: list[float] = []
    seen: set[int] = set()
    deadline = time.monotonic() + count / rate + 120
    while len(seen) < count and time.monotonic() < deadline:
        pending = set(sent) - seen
        if pending:
            now = time.monotonic()
            for n in visible(pending) & pending:
                seen.add(n)
                if n > warmup:
                    latencies.append(now - sent[n])
        time.sleep(0.05)
    sender.join(timeout=60)
    if not latencies:
        raise RuntimeError("no reading became visible")
    return sorted(latencies)


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    return statistics.median(latencies), latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]


def _floor_freshness(ctx: Context, tables: int = 1) -> list[float]:
    """The bare Kafka -> Delta append stream (with `tables` > 1, appending to that many tables in each micro-batch),
    seen by listing its first table's log."""
    from bench.floors import FLOOR_TABLE, CommitWatcher
    from bench.processes import start_command
    from pipeline.kafka.broker import ensure_topic
    from pipeline.kafka.produce import produce

    name = "freshness-floor" if tables == 1 else f"freshness-floor-{tables}-tables"
    settings = ctx.part(name)
    ensure_topic(settings)
    produce(settings, [_fresh_reading(0)])
    log = ctx.folder / f"{name}.log"
    stream = start_command([sys.executable, "-m", "bench.floors", "--tables", str(tables)], settings, log=log)
    watcher = CommitWatcher(Path(settings.lake_root) / FLOOR_TABLE)
    try:
        deadline = time.monotonic() + 300
        while not any(True for _ in watcher.new_values()):
            if stream.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the freshness floor made no commit; see {log}")
            time.sleep(0.2)

        def visible(pending: set[int]) -> set[int]:
            return {int(json.loads(value)["value"]) for value in watcher.new_values()}

        return _visibility(ctx, settings, visible)
    finally:
        stop_group(stream)


def _batch_medians(report: Path) -> str:
    """The median seconds of the pipeline's micro-batches and of each stage, the first batch (Spark warming up)
    left out."""
    batches = [json.loads(line) for line in report.read_text().splitlines()][1:] if report.exists() else []
    if not batches:
        return "no micro-batch reported after the first"
    names = dict.fromkeys(name for b in batches for name in b["stages"])  # in the order the batches ran them
    stages = {name: statistics.median(b["stages"].get(name, 0.0) for b in batches) for name in names}
    spent = ", ".join(f"{name} {seconds:.2f}" for name, seconds in stages.items())
    readings = statistics.median(b["readings"] for b in batches)
    return (
        f"{len(batches)} micro-batches after the first, median {statistics.median(b['seconds'] for b in batches):.2f} s "
        f"for {readings:g} readings ({spent} s)"
    )


def _rollups_batches(log: Path) -> str:
    """The rollups batches with readings in the pipeline's log (`rollups batch N: R silver rows, S s`), in order."""
    found = re.findall(r"rollups batch \d+: (\d+) silver rows, ([\d.]+) s", log.read_text() if log.exists() else "")
    runs = [f"{seconds} s ({rows} rows)" for rows, seconds in found if int(rows)]
    return f"rollups batches beside them: {', '.join(runs) or 'none'}"


def bench_freshness(ctx: Context) -> None:
    import httpx

    from bench.floors import CONTRACT_TABLES
    from lake.timestamps import format_utc
    from pipeline.kafka.broker import ensure_topic
    from pipeline.kafka.produce import produce

    ctx.say(
        f"freshness: the floor, {ctx.plan.freshness_readings} single readings at {ctx.plan.freshness_rate}/s after "
        f"{ctx.plan.freshness_warmup} to warm up"
    )
    floor = _floor_freshness(ctx)
    ctx.say(f"freshness: the contract's minimum writes, {len(CONTRACT_TABLES)} appends per micro-batch")
    minimum = _floor_freshness(ctx, tables=len(CONTRACT_TABLES))

    settings = ctx.part("freshness")
    ensure_topic(settings)
    log = ctx.folder / "freshness-pipeline.log"
    produce(settings, [_fresh_reading(0)])  # the tables exist once the first batch commits
    report = ctx.folder / "freshness-batches.jsonl"
    pipeline = start_lakehouse(settings, "pipeline", "--report", str(report), log=log)
    try:
        with running_api(settings, ctx.folder / "freshness-api.log") as api, httpx.Client(timeout=5) as client:
            deadline = time.monotonic() + 300
            while client.get(f"{api}/kpis/{format_utc(_FRESH_BASE)}").status_code != 200:
                if pipeline.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the pipeline did not produce gold; see {log}")
                time.sleep(0.2)
            ctx.say(
                f"freshness: the pipeline, {ctx.plan.freshness_readings} single readings after "
                f"{ctx.plan.freshness_warmup} to warm up"
            )

            def visible(pending: set[int]) -> set[int]:
                start = format_utc(_FRESH_BASE + timedelta(seconds=min(pending)))
                end = format_utc(_FRESH_BASE + timedelta(seconds=max(pending) + 1))
                answer = client.get(f"{api}/kpis", params={"start": start, "end": end, "grain": "second"})
                answer.raise_for_status()
                return {int(item["sum_value"]) for item in answer.json()["items"]}

            ours = _visibility(ctx, settings, visible)
    finally:
        stop_group(pipeline)
    (p50, p95), (floor50, floor95) = _percentiles(ours), _percentiles(floor)
    note = (
        f"{len(ours)} of {ctx.plan.freshness_readings} readings seen through `GET /kpis?grain=second` after "
        f"{ctx.plan.freshness_warmup} not measured (floor: "
        f"{len(floor)} through its Delta log); trigger {settings.trigger_interval}, API refresh "
        f"{settings.api_refresh_interval:g} s; {_batch_medians(report)}; {_rollups_batches(log)}"
    )
    floor_name = "Kafka → Delta append stream"
    ctx.figures.append(
        Figure(
            "freshness p50, produce to API", p50, "s", floor50, floor_name, "≤ 1.5x floor", p50 <= 1.5 * floor50, note
        )
    )
    ctx.figures.append(
        Figure("freshness p95, produce to API", p95, "s", floor95, floor_name, "≤ 1.5x floor", p95 <= 1.5 * floor95)
    )
    # No goal: what the goals above are worth, since no pipeline that keeps the contract's tables commits less.
    (least50, least95), name = _percentiles(minimum), f"{len(CONTRACT_TABLES)} appends per micro-batch"
    ctx.figures.append(
        Figure(
            "freshness p50 against the contract's minimum writes",
            p50,
            "s",
            least50,
            name,
            note=(
                f"{len(minimum)} readings seen through the first table's Delta log; that stream's own p50 is "
                f"{least50 / floor50:.2f}x the floor's, its p95 {least95 / floor95:.2f}x"
            ),
        )
    )
    ctx.figures.append(Figure("freshness p95 against the contract's minimum writes", p95, "s", least95, name))


# --------------------------------------------------------------------------------------------------- lookups


# The hot part's dashboard: the newest seconds and minutes of a few metrics, asked over and over.
_HOT_METRICS = 5
_HOT_SECONDS = 300
_HOT_MINUTES = 60
_HOT_COMMIT_EVERY_S = 2.0  # how often the hot part's writer commits new seconds to gold, as a stream does


def _lookup_lake(ctx: Context, paths: LakePaths, seconds: int, start: int, hot: list[str]) -> None:
    """Gold of `seconds` seconds of metric `value` (the cold lookups), and the newest seconds and minutes of the
    `hot` metrics in gold and the rollups (the dashboard's), written with Spark."""
    from lake.tables import Table
    from pipeline.stream.tables import create_tables

    spark = ctx.spark()
    create_tables(spark, paths)
    kpis = (
        "CAST(1 + id % 40 AS BIGINT) AS reading_count",
        "CAST(1 + id % 7 AS BIGINT) AS device_count",
        "CAST(50 + (id % 1000) / 10 AS DOUBLE) AS average_value",
        "CAST((id % 1000) / 10 AS DOUBLE) AS min_value",
        "CAST(100 + (id % 1000) / 10 AS DOUBLE) AS max_value",
        "CAST((1 + id % 40) * (50 + (id % 1000) / 10) AS DOUBLE) AS sum_value",
        "CAST(CASE WHEN id % 40 = 0 THEN NULL ELSE 3.5 END AS DOUBLE) AS stddev_value",
        "current_timestamp() AS updated_at",
    )
    spark.range(seconds).selectExpr(
        f"timestamp_seconds({start} + id) AS `timestamp`",
        *kpis,
        "'value' AS metric",  # the metric a request that names none asks for
    ).repartition(4).write.format("delta").mode("append").save(paths.table(Table.GOLD))
    names = ", ".join(f"'{name}'" for name in hot)
    end = start + seconds
    spark.range(end - _HOT_SECONDS, end).selectExpr(
        "timestamp_seconds(id) AS `timestamp`", *kpis, f"explode(array({names})) AS metric"
    ).coalesce(1).write.format("delta").mode("append").save(paths.table(Table.GOLD))
    first_minute = end // 60 * 60 - _HOT_MINUTES * 60
    spark.range(_HOT_MINUTES).selectExpr(
        "'minute' AS grain",
        "CAST(NULL AS STRING) AS device_id",
        f"timestamp_seconds({first_minute} + id * 60) AS `timestamp`",
        *kpis,
        "CAST(12.25 AS DOUBLE) AS m2_value",
        f"explode(array({names})) AS metric",
    ).coalesce(1).write.format("delta").mode("append").save(paths.table(Table.ROLLUPS))


class _GoldWriter(threading.Thread):
    """Commits a new second of each hot metric to gold every few seconds (delta-rs), as the pipeline's stream does
    while dashboards ask: each commit moves the API's snapshot on, and its kept answers with it."""

    def __init__(self, location: str, first_us: int, metrics: list[str]) -> None:
        super().__init__(name="bench-gold-writer", daemon=True)
        self.location, self.next_us, self.metrics = location, first_us, metrics
        self.commits = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        import pyarrow as pa
        from deltalake import DeltaTable, write_deltalake

        schema = pa.schema(DeltaTable(self.location).schema())
        while not self.stopping.wait(_HOT_COMMIT_EVERY_S):
            moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=self.next_us)
            row = {
                "timestamp": moment,
                "reading_count": 1,
                "device_count": 1,
                "average_value": 1.0,
                "min_value": 1.0,
                "max_value": 1.0,
                "sum_value": 1.0,
                "updated_at": datetime.now(UTC),
            }
            rows = [{name: (row | {"metric": metric}).get(name) for name in schema.names} for metric in self.metrics]
            write_deltalake(self.location, pa.Table.from_pylist(rows, schema=schema), mode="append")
            self.next_us += 1_000_000
            self.commits += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)


def bench_lookups(ctx: Context) -> None:
    from bench import loadgen
    from bench.tutorial import write_csv_batches
    from lake import duck
    from lake.tables import LakePaths, Table
    from lake.timestamps import format_utc
    from pipeline.kafka.synthetic import metric_names

    settings = ctx.part("lookups")
    paths = LakePaths.from_settings(settings)
    seconds = ctx.plan.lookup_seconds
    hot = metric_names(_HOT_METRICS)
    ctx.say(f"lookups: a gold table of {seconds:,} seconds, and the newest of {len(hot)} metrics")
    start = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
    _lookup_lake(ctx, paths, seconds, start, hot)

    csv_folder = ctx.folder / "lookups" / "tutorial-csv"
    lake = duck.connect(paths)
    gold = lake.sql(
        'SELECT strftime("timestamp", \'%Y-%m-%dT%H:%M:%SZ\') AS "timestamp", reading_count, '
        "device_count, average_value, min_value, max_value, sum_value, stddev_value FROM gold "
        "WHERE metric = 'value' ORDER BY \"timestamp\""
    )
    files = write_csv_batches(gold, csv_folder, seconds_per_batch=1000)
    stamps = [
        row[0]
        for row in lake.sql(
            "SELECT strftime(\"timestamp\", '%Y-%m-%dT%H:%M:%SZ') FROM gold WHERE metric = 'value'"
        ).fetchall()
    ]
    lake.close()

    end = start + seconds
    hot_paths = [
        f"/kpis/{format_utc(datetime.fromtimestamp(end - 1 - back, UTC))}?metric={metric}"
        for back in range(_HOT_SECONDS)
        for metric in hot
    ] + [
        f"/kpis/{format_utc(datetime.fromtimestamp(end // 60 * 60 - 60 * (1 + back), UTC))}?grain=minute&metric={metric}"
        for back in range(_HOT_MINUTES)
        for metric in hot
    ]
    port = free_port()
    with running_api(settings, ctx.folder / "lookups-api.log", port):
        paths_of = loadgen.random_paths("/kpis/", stamps)
        loadgen.sequential("127.0.0.1", port, paths_of, 200)  # warm-up
        lone = loadgen.sequential("127.0.0.1", port, paths_of, 300)
        ctx.say(f"lookups: cold, {ctx.plan.lookup_rate:.0f} requests/s for {ctx.plan.lookup_duration_s:.0f} s")
        ctx.figures.extend(
            _load_figures(ctx, port, paths_of, "cold ", f"random seconds of gold's {seconds:,}", 0.010, 0.35)
        )
        writer = _GoldWriter(paths.table(Table.GOLD), end * 1_000_000, hot)
        writer.start()
        try:
            ctx.say(f"lookups: hot, the newest {_HOT_SECONDS} s and {_HOT_MINUTES} min of {len(hot)} metrics")
            hot_of = random.Random(3).choice
            ctx.figures.extend(
                _load_figures(
                    ctx,
                    port,
                    lambda: hot_of(hot_paths),
                    "hot ",
                    f"{len(hot_paths):,} buckets; gold committed every {_HOT_COMMIT_EVERY_S:.0f} s",
                    0.005,
                    0.70,
                )
            )
        finally:
            writer.stop()
        ctx.figures[-1].note += f", {writer.commits} commits while it ran"

    port = free_port()
    with (ctx.folder / "tutorial-api.log").open("ab") as output:
        tutorial = subprocess.Popen(
            [sys.executable, "-m", "bench.tutorial", "--folder", str(csv_folder), "--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_port(port)
        replaced = loadgen.sequential(
            "127.0.0.1", port, loadgen.random_paths("/kpis/", stamps, seed=2), ctx.plan.tutorial_requests
        )
    finally:
        tutorial.terminate()
        tutorial.wait(timeout=30)

    speedup = replaced.median / lone.median
    ctx.figures.append(
        Figure(
            "lookup p50, one client",
            lone.median * 1000,
            "ms",
            replaced.median * 1000,
            f"Flask + pandas over {files:,} kpi_*.csv files",
            "≥ 100x faster",
            speedup >= 100,
            f"{speedup:,.0f}x faster",
        )
    )


# --------------------------------------------------------------------------------------------------- serving

# Each question of the serving goals: its name, its p99 goal in ms, and a grain and whether it names a device.
_QUESTIONS = (
    ("a second of the fleet", 5, "second", False),
    ("an hour of one device", 50, "hour", True),
    ("a day of the fleet", 50, "day", False),
    ("a minute of one device", 50, "minute", True),
)
_SERIES_BUCKETS = 1000
_API_MEMORY_BOUND = 1024 * MIB  # the default bound for one worker, whatever the history


def _serving_lake(ctx: Context) -> tuple[Path, LakeShape]:
    """The cached lake of the plan's size under the home folder (outside the work folder, which each run deletes),
    built first if it is not there."""
    from bench.serving_lake import LakeShape, build_lake, cached_folder, is_built

    shape = LakeShape.of(ctx.plan.serving_readings, ctx.plan.serving_devices)
    folder = cached_folder(ctx.settings.home, shape)
    if is_built(folder, shape):
        ctx.say(f"serving: reusing the lake of {shape.slots:,} device-seconds at {folder}")
        return folder, shape
    ctx.say(f"serving: building a lake of {shape.slots:,} device-seconds at {folder} (once; kept for later runs)")
    started = time.monotonic()
    build_lake(folder, shape.slots, shape.devices, ctx.spark())
    ctx.say(f"serving: built in {time.monotonic() - started:,.0f} s")
    ctx.stop_spark()  # its JVM would take memory and CPU from the API under test
    return folder, shape


def _question_path(shape: LakeShape, grain: str, device: bool, chooser: random.Random) -> str:
    from bench.serving_lake import START
    from lake.timestamps import format_utc

    instant = START + timedelta(seconds=chooser.randrange(shape.seconds), microseconds=chooser.randrange(1_000_000))
    query = f"grain={grain}" + (f"&device_id={shape.device_id(chooser.randrange(shape.devices))}" if device else "")
    return f"/kpis/{format_utc(instant)}?{query}"


def _series_path(shape: LakeShape, chooser: random.Random) -> str:
    from bench.serving_lake import START
    from lake.timestamps import format_utc

    minutes = max(1, shape.seconds // 60 - _SERIES_BUCKETS)
    start = START + timedelta(minutes=chooser.randrange(minutes))
    end = start + timedelta(minutes=_SERIES_BUCKETS)
    return f"/kpis?start={format_utc(start)}&end={format_utc(end)}&grain=minute&limit={_SERIES_BUCKETS}"


def _check_answers(base: str, shape: LakeShape, paths: list[str]) -> int:
    """Ask each path and compare its KPIs with the formula's; raises on the first wrong answers. Returns the
    buckets checked."""
    from urllib.parse import parse_qs, urlsplit

    import httpx

    from bench.serving_lake import differences, expected_kpis
    from lake.timestamps import Grain, format_utc, from_us, parse_timestamp_us

    wrong: list[str] = []
    checked = 0
    with httpx.Client(base_url=base, timeout=120) as client:
        for path in paths:
            answer = client.get(path)
            split = urlsplit(path)
            query = {name: values[0] for name, values in parse_qs(split.query).items()}
            grain = Grain(query.get("grain", "second"))
            device_id = query.get("device_id")
            if split.path == "/kpis":
                if answer.status_code != 200:
                    wrong.append(f"{path}: {answer.status_code} {answer.text[:300]}")
                    continue
                items = {item["timestamp"]: item for item in answer.json()["items"]}
                first_us = grain.bucket_start_us(parse_timestamp_us(query["start"]))
                starts = range(first_us, parse_timestamp_us(query["end"]), grain.micros)
            else:
                instant_us = parse_timestamp_us(split.path.removeprefix("/kpis/"))
                starts = range(grain.bucket_start_us(instant_us), grain.bucket_start_us(instant_us) + 1)
                items = {answer.json()["timestamp"]: answer.json()} if answer.status_code == 200 else {}
            for start_us in starts:
                bucket = from_us(start_us)
                want = expected_kpis(shape, bucket, from_us(start_us + grain.micros), device_id)
                got = items.pop(format_utc(bucket), None)
                checked += 1
                if want is None and got is not None:
                    wrong.append(f"{path}: an answer for {format_utc(bucket)}, which has no readings")
                elif want is not None and got is None:
                    wrong.append(f"{path}: no answer for {format_utc(bucket)} ({answer.status_code})")
                elif want is not None and got is not None:
                    wrong.extend(f"{path} at {format_utc(bucket)}: {d}" for d in differences(got, want))
            wrong.extend(f"{path}: an answer for {extra}, outside the range" for extra in items)
            if wrong:
                raise RuntimeError("the API answered wrongly:\n" + "\n".join(wrong[:20]))
    return checked


def _store_settings(settings: Settings, store: Path) -> tuple[Settings, dict[str, str], str]:
    """The API's settings with its serving store in `store`, and a note saying how it was set."""
    if "api_store_dir" in Settings.model_fields:
        return settings.model_copy(update={"api_store_dir": str(store)}), {}, ""
    note = "this version has no api_store_dir setting, so every start builds its store from the lake"
    return settings, {"LAKEHOUSE_API_STORE_DIR": str(store)}, note


def bench_serving(ctx: Context) -> None:
    from bench import loadgen
    from bench.processes import start_api, wait_until_served

    lake, shape = _serving_lake(ctx)
    plan = ctx.plan
    work = ctx.folder / "serving"
    work.mkdir(parents=True, exist_ok=True)
    store = work / "api-store"
    settings, env_extra, store_note = _store_settings(
        ctx.settings.model_copy(
            update={"lake_root": str(lake), "checkpoint_root": None, "api_kafka_timeout_seconds": 0.5}
        ),
        store,
    )
    chooser = random.Random(7)

    def checks() -> list[str]:
        paths: list[str] = []
        for _, _, grain, device in _QUESTIONS:
            # A day of the fleet is the whole fleet's day of readings to recompute in Python: two suffice.
            count = min(2, plan.serving_checks) if grain == "day" else plan.serving_checks
            paths.extend(_question_path(shape, grain, device, chooser) for _ in range(count))
        return [*paths, _series_path(shape, chooser)]

    def start(name: str) -> tuple[subprocess.Popen[bytes], str, float, PeakSampler]:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        api = start_api(settings, port, work / f"api-{name}.log", env_extra)
        # RSS alone (statm), twice a second: reading PSS walks the API's mappings under its memory-map lock.
        sampler = PeakSampler(api.pid, interval_s=0.5, rss_only=True).__enter__()
        if not wait_until_served(base, 600, alive=lambda: api.poll() is None):
            sampler.__exit__()
            stop_group(api)
            raise RuntimeError(f"the API did not serve the lake; see {work / f'api-{name}.log'}")
        return api, base, time.monotonic() - started, sampler

    peaks: list[int] = []
    # 1. A store that has never seen the lake: ready, then correct at once.
    shutil.rmtree(store, ignore_errors=True)
    ctx.say(f"serving: starting the API on a lake of {shape.slots:,} device-seconds it has never seen")
    started_at = time.monotonic()
    api, base, ready_unseen, sampler = start("unseen")
    try:
        checked = _check_answers(base, shape, checks())
        _settle(base)
        caught_up = time.monotonic() - started_at
    finally:
        sampler.__exit__()
        stop_group(api)
    peaks.append(sampler.tree_rss)

    # 2. The same store again: ready, questions one at a time, exactness, and point lookups under load.
    ctx.say("serving: starting the API again on the lake it has seen")
    api, base, ready_seen, sampler = start("seen")
    latencies: list[tuple[str, int, loadgen.LoadResult]] = []
    port = int(base.rsplit(":", 1)[1])
    try:
        for name, goal_ms, grain, device in _QUESTIONS:
            ctx.say(f"serving: {name}, {plan.serving_requests} requests")
            paths_of = functools.partial(_question_path, shape, grain, device, random.Random(name))
            loadgen.sequential("127.0.0.1", port, paths_of, 20)  # warm-up
            latencies.append((name, goal_ms, loadgen.sequential("127.0.0.1", port, paths_of, plan.serving_requests)))
        ctx.say(f"serving: a {_SERIES_BUCKETS:,}-bucket series at minute grain, {plan.serving_requests} requests")
        series_of = functools.partial(_series_path, shape, random.Random("series"))
        loadgen.sequential("127.0.0.1", port, series_of, 5)
        series = loadgen.sequential("127.0.0.1", port, series_of, plan.serving_requests)
        latencies.append((f"a {_SERIES_BUCKETS:,}-bucket series at minute grain", 100, series))
        checked += _check_answers(base, shape, checks())
        ctx.say(f"serving: point lookups at {plan.lookup_rate:.0f} requests/s for {plan.lookup_duration_s:.0f} s")
        seconds_of = functools.partial(_question_path, shape, "second", False, random.Random("load"))
        load = _load_figures(ctx, port, seconds_of, "serving: ", f"the serving lake of {shape.slots:,} device-seconds")
    finally:
        sampler.__exit__()
        stop_group(api)
    peaks.append(sampler.tree_rss)

    lake_note = f"{shape.devices:,} devices at 1 Hz for {shape.seconds:,} s ({shape.slots:,} device-seconds)"
    peak = max(peaks)
    ctx.figures.append(
        Figure(
            "serving: API peak RSS",
            peak / MIB,
            "MiB",
            goal=f"≤ {_API_MEMORY_BOUND / MIB:,.0f} MiB",
            met=peak <= _API_MEMORY_BOUND,
            note=f"{lake_note}; first start {peaks[0] / MIB:,.0f} MiB, second {peaks[1] / MIB:,.0f} MiB; RSS read "
            "twice a second",
        )
    )
    for title, took, note in (
        (
            "serving: ready on a lake never seen",
            ready_unseen,
            store_note or f"its store folder deleted first; answering from its store after {caught_up:,.1f} s",
        ),
        ("serving: ready on a lake seen before", ready_seen, "the store the first start left"),
    ):
        ctx.figures.append(Figure(title, took, "s", goal="≤ 5 s", met=took <= 5, note=f"from start to /health; {note}"))
    for name, goal_ms, result in latencies:
        p99 = result.percentile(0.99) * 1000
        ctx.figures.append(
            Figure(
                f"serving p99: {name}",
                p99,
                "ms",
                goal=f"≤ {goal_ms} ms",
                met=p99 <= goal_ms and not result.server_errors,
                note=f"p50 {result.median * 1000:.2f} ms over {result.requests} requests, one client; "
                f"statuses {result.statuses}",
            )
        )
    ctx.figures.extend(load)
    ctx.figures.append(
        Figure(
            "serving: answers equal to the formula",
            checked,
            "buckets",
            goal="all",
            met=True,
            note="each checked bucket recomputed in plain Python (bench/serving_lake.py); a wrong one stops the bench",
        )
    )


def _settle(base: str, timeout_s: float = 1800) -> None:
    """Wait until the API answers from its own store rather than from the lake while it builds the store (when its
    /health says where it answers from at all)."""
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        snapshot = httpx.get(f"{base}/health", timeout=10).json().get("snapshot") or {}
        if snapshot.get("served_from", "store") != "lake":
            return
        time.sleep(0.5)
    raise RuntimeError(f"the API still answered from the lake after {timeout_s:.0f} s, its store not built")


def _load_figures(
    ctx: Context,
    port: int,
    paths_of: Callable[[], str],
    prefix: str,
    lake: str,
    p99_goal_s: float = 0.005,
    share_goal: float = 0.5,
) -> list[Figure]:
    """Point lookups under load: open loop at the plan's rate (p99 from each request's scheduled start), then the
    peak throughput of lookups beside that of GET /livez on the same server; each notes how much of a core the load
    generator took from the server."""
    from bench import loadgen

    loaded = loadgen.open_loop("127.0.0.1", port, paths_of, ctx.plan.lookup_rate, ctx.plan.lookup_duration_s)
    kpi_peak = loadgen.closed_loop("127.0.0.1", port, paths_of, 5, connections=16)
    trivial_peak = loadgen.closed_loop("127.0.0.1", port, lambda: "/livez", 5, connections=16)
    ok = loaded.statuses.get(200, 0)
    return [
        Figure(
            f"{prefix}lookup p99 at {ctx.plan.lookup_rate:.0f} requests/s",
            loaded.percentile(0.99) * 1000,
            "ms",
            goal=f"≤ {p99_goal_s * 1000:.0f} ms",
            met=loaded.percentile(0.99) <= p99_goal_s,
            note=f"{lake}; {ok:,} of {loaded.requests:,} answered 200, "
            f"{loaded.server_errors} errors; p50 {loaded.median * 1000:.2f} ms; "
            f"the load generator took {loaded.cpu_share:.0%} of a core",
        ),
        Figure(
            f"{prefix}lookup throughput vs trivial route",
            kpi_peak.throughput,
            "requests/s",
            trivial_peak.throughput,
            "GET /livez on the same server",
            f"≥ {share_goal:.0%}",
            kpi_peak.throughput >= share_goal * trivial_peak.throughput,
            f"16 connections, 5 s; {kpi_peak.statuses.get(200, 0):,} answered 200; the load generator took "
            f"{kpi_peak.cpu_share:.0%} of a core (for /livez {trivial_peak.cpu_share:.0%})",
        ),
    ]


def _wait_for_port(port: int, timeout_s: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port}")


# ----------------------------------------------------------------------------------------------------- run

PARTS: dict[str, Callable[[Context], None]] = {
    "ingest": bench_ingest,
    "freshness": bench_freshness,
    "lookups": bench_lookups,
    "serving": bench_serving,
}
# Parts that need no Kafka broker: the run starts one only when another part is chosen.
WITHOUT_KAFKA = {"serving"}


def run(settings: Settings, plan: Plan, parts: list[str], folder: Path, say: Callable[[str], None]) -> list[Figure]:
    import logging

    from pipeline.kafka.broker import LocalBroker

    logging.getLogger("httpx").setLevel(logging.WARNING)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    broker = LocalBroker.from_settings(settings) if set(parts) - WITHOUT_KAFKA else None
    if broker is not None:
        broker.stop()
        shutil.rmtree(broker.folder, ignore_errors=True)
        say(f"starting a Kafka broker on {settings.kafka_bootstrap}")
        broker.start()
    ctx = Context(settings, folder, plan, say)
    try:
        for name in parts:
            PARTS[name](ctx)
    finally:
        ctx.stop_spark()
        if broker is not None:
            broker.stop()
    return ctx.figures


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def as_json(figures: list[Figure]) -> list[dict[str, object]]:
    return [asdict(f) | {"ratio": f.ratio} for f in figures]


def markdown(figures: list[Figure], command: str) -> str:
    lines = [
        "| figure | ours | reference | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        reference = f"{f.reference:,.2f} {f.unit} ({f.reference_name})" if f.reference is not None else ""
        ratio = f"{f.ratio:.3g}" if f.ratio is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[f.met]
        lines.append(f"| {f.name} | {f.ours:,.2f} {f.unit} | {reference} | {ratio} | {f.goal} | {met} |")
    notes = [f"- {f.name}: {f.note}" for f in figures if f.note]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([f"Measured {when} on {machine()} with `{command}`.", "", *lines, "", *notes, ""])
