"""A big lake for the serving benchmark and its scaled-down test, written once and cached.

Readings come from a formula of (device, second, metric), so that any bucket can be recomputed in plain Python
without reading the lake: device `d` measures its metrics once in each second `s` after START, all at one fractional
instant (as a reading with several metrics does), unless one of a few gaps (a second, a minute, an hour, a whole
day) leaves it out; a device also misses some minutes of one metric alone, and does not measure some metrics at
all, so that device counts vary at every grain and differ between metrics.

The tables are the pipeline's own (`pipeline.stream.tables.create_tables`), written a UTC day at a time: silver
from `spark.range`, gold from `pipeline.stream.kpi.kpis_per_second` and the rollups from
`pipeline.stream.rollups.from_readings` over that day's readings. No bucket of any grain spans two UTC days, so each
day's rollups are complete and exact; and each day's files hold that day only, so the tables are clustered by time.
START is three minutes before a midnight, so that even a lake of a few minutes has buckets of every grain that
begin before it and end after it. A marker file holds the parameters of a finished build; building again with the
same ones does nothing.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from lake.settings import Settings
from lake.tables import DEFAULT_METRIC, LakePaths, Table

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from rich.progress import Progress, TaskID

START = datetime(2030, 1, 1, 23, 57, tzinfo=UTC)  # the build's chunks are UTC days all the same
DAY = 86_400
# START's second of its UTC day: the build's day `n` is the UTC day n days after START's.
_START_OF_DAY = START.hour * 3600 + START.minute * 60 + START.second
MARKER = "serving-lake.json"
# Bump when the formula or the layout changes, so that a cached lake of the old kind is built again.
# 2: silver records arrival_watermark; gold and the rollups their history columns; 3: metrics, START before midnight.
FORMAT = 3
# The metrics of the lake, the reading's bare `value` (a request that names no metric) first; a lake of n metrics
# has the first n.
METRIC_NAMES = (
    DEFAULT_METRIC,
    "pressure_bar",
    "temperature_c",
    "flow_lpm",
    "motor.rpm",
    "vibration_mm-s",
    "power_kw",
    "humidity_pct",
)
METRICS = len(METRIC_NAMES)
# The build's Delta writes carry this app id with the day's index as the version: a build resumed after a crash
# skips the writes of a day that had committed, as the pipeline's micro-batches do.
TXN_APP_ID = "kpi-lakehouse-serving-lake"
# Whole days are written together up to about this many readings: each write has a fixed cost in Spark jobs.
CHUNK_READINGS = 10_000_000


@dataclass(frozen=True)
class LakeShape:
    """`devices` measuring `metrics` metrics at 1 Hz for `seconds` seconds from START (before the gaps)."""

    devices: int
    seconds: int
    metrics: int = METRICS

    def __post_init__(self) -> None:
        if not 1 <= self.metrics <= METRICS:
            raise ValueError(f"a serving lake has 1 to {METRICS} metrics, not {self.metrics}")

    @classmethod
    def of(cls, readings: int, devices: int, metrics: int = METRICS) -> LakeShape:
        """The shape of about `readings` slots (device-metric-seconds): its history shrinks as its devices and
        metrics grow."""
        return cls(devices, max(1, readings // (devices * metrics)), metrics)

    @property
    def slots(self) -> int:
        """Device-metric-seconds, each a reading unless a gap leaves it out."""
        return self.devices * self.metrics * self.seconds

    @property
    def days(self) -> int:
        """The UTC days the lake's readings fall on: the build writes a day at a time."""
        return math.ceil((_START_OF_DAY + self.seconds) / DAY)

    def device_id(self, device: int) -> str:
        return f"dev-{device:04d}"

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRIC_NAMES[: self.metrics]

    def day_seconds(self, first_day: int, end_day: int) -> tuple[int, int]:
        """The seconds after START, [first, last), of the build's UTC days [first_day, end_day)."""
        first = max(0, first_day * DAY - _START_OF_DAY)
        return first, max(first, min(self.seconds, end_day * DAY - _START_OF_DAY))

    @property
    def end(self) -> datetime:
        return START + timedelta(seconds=self.seconds)


# ------------------------------------------------------------------------------------------------ the formula
# The same arithmetic twice: as Spark SQL over columns `d` (device), `s` (second after START) and `k` (the metric's
# index in METRIC_NAMES), and in Python. Values are integers divided by 100, so Spark's double division and
# Python's int / int round alike.

_PRESENT_SQL = (
    "(s * 13 + d * 7) % 97 != 0"  # a missed second
    " AND ((s DIV 60) * 31 + d * 17) % 23 != 0"  # a missed minute
    " AND ((s DIV 3600) * 7 + d) % 29 != 0"  # a missed hour
    f" AND NOT (d % 5 = 4 AND ((s DIV {DAY}) + d) % 3 = 0)"  # one device in five is off one day in three
    " AND NOT (k > 0 AND (d + 2 * k) % 9 = 0)"  # a metric the device does not measure (each but `value`)
    " AND ((s DIV 60) * 11 + d * 5 + k * 3) % 37 != 0"  # a minute without one metric
)
_MICROS_SQL = "(d * 7919 + s * 104729) % 1000000"
_VALUE_SQL = "CAST((d * 1000003 + s * 7919 + k * 15485863) % 200003 - 100000 AS DOUBLE) / CAST(100 AS DOUBLE)"


def present(device: int, second: int, metric: int = 0) -> bool:
    """Whether device `device` measured metric number `metric` (of METRIC_NAMES) in second `second`."""
    return (
        (second * 13 + device * 7) % 97 != 0
        and ((second // 60) * 31 + device * 17) % 23 != 0
        and ((second // 3600) * 7 + device) % 29 != 0
        and not (device % 5 == 4 and (second // DAY + device) % 3 == 0)
        and not (metric > 0 and (device + 2 * metric) % 9 == 0)
        and ((second // 60) * 11 + device * 5 + metric * 3) % 37 != 0
    )


def micros(device: int, second: int) -> int:
    return (device * 7919 + second * 104729) % 1_000_000


def value(device: int, second: int, metric: int = 0) -> float:
    return ((device * 1_000_003 + second * 7919 + metric * 15_485_863) % 200_003 - 100_000) / 100


def metric_number(shape: LakeShape, metric: str) -> int | None:
    """The metric's index in METRIC_NAMES, or None when the lake of this shape has no such metric."""
    return shape.metric_names.index(metric) if metric in shape.metric_names else None


def readings(
    shape: LakeShape, start: datetime, end: datetime, device_id: str | None = None, metric: str = DEFAULT_METRIC
) -> Iterator[tuple[str, datetime, float, str]]:
    """The readings (device_id, timestamp, value, metric) of one metric with a timestamp in [start, end), of one
    device or all."""
    number = metric_number(shape, metric)
    if number is None:
        return
    first = max(0, math.floor((start - START).total_seconds()))
    last = min(shape.seconds, math.ceil((end - START).total_seconds()))
    devices = _device_numbers(shape, device_id)
    for second in range(first, last):
        base = START + timedelta(seconds=second)
        for device in devices:
            if present(device, second, number):
                moment = base + timedelta(microseconds=micros(device, second))
                if start <= moment < end:
                    yield shape.device_id(device), moment, value(device, second, number), metric


def _device_numbers(shape: LakeShape, device_id: str | None) -> range:
    if device_id is None:
        return range(shape.devices)
    for device in range(shape.devices):
        if shape.device_id(device) == device_id:
            return range(device, device + 1)
    return range(0)


def expected_kpis(
    shape: LakeShape, start: datetime, end: datetime, device_id: str | None = None, metric: str = DEFAULT_METRIC
) -> dict[str, object] | None:
    """Contract section 4's KPIs of one metric over the readings of whole seconds [start, end) (None when there are
    none), from the formula alone: exact sums (math.fsum) and the deviation from the mean in a second pass."""
    number = metric_number(shape, metric)
    first = max(0, math.floor((start - START).total_seconds()))
    last = min(shape.seconds, math.ceil((end - START).total_seconds()))
    devices = _device_numbers(shape, device_id) if number is not None else range(0)
    values: list[float] = []
    seen: set[int] = set()
    for second in range(first, last):
        for device in devices:
            if present(device, second, number or 0):
                values.append(value(device, second, number or 0))
                seen.add(device)
    if not values:
        return None
    count, total = len(values), math.fsum(values)
    mean = total / count
    spread = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (count - 1)) if count > 1 else None
    return {
        "reading_count": count,
        "device_count": len(seen),
        "average_value": mean,
        "min_value": min(values),
        "max_value": max(values),
        "sum_value": total,
        "stddev_value": spread,
    }


def differences(got: dict[str, object], expected: dict[str, object], rel_tol: float = 1e-9) -> list[str]:
    """Fields of an answer that differ from the expected KPIs: counts, minimum and maximum exactly, the rest within
    `rel_tol` (contract section 4), a null deviation only as null."""
    wrong = []
    for name, want in expected.items():
        have = got.get(name)
        if isinstance(want, float) and name not in ("min_value", "max_value"):
            close = isinstance(have, float) and math.isclose(have, want, rel_tol=rel_tol)
        else:
            close = have == want
        if not close:
            wrong.append(f"{name} is {have}, expected {want}")
    return wrong


# -------------------------------------------------------------------------------------------------- the build


def day_readings(spark: SparkSession, shape: LakeShape, first_day: int, end_day: int) -> DataFrame:
    """Silver's rows of UTC days [first_day, end_day) in silver's columns: about a part per day (two at least, one
    per core here), each in time order, so that each file holds a span of time. A reading's offset is its slot
    (its metrics' readings share the record of a reading with several metrics, as `reading_index` 0)."""
    first, last = shape.day_seconds(first_day, end_day)
    per_second = shape.devices * shape.metrics
    partitions = max(2, end_day - first_day)
    start_s = int(START.timestamp())
    names = ", ".join(f"'{name}'" for name in shape.metric_names)
    return (
        spark.range(first * per_second, last * per_second, 1, partitions)
        .selectExpr(
            "id",
            f"id DIV {per_second} AS s",
            f"(id % {per_second}) DIV {shape.metrics} AS d",
            f"id % {shape.metrics} AS k",
        )
        .where(_PRESENT_SQL)
        .selectExpr(
            "format_string('dev-%04d', CAST(d AS INT)) AS device_id",
            f"timestamp_micros(({start_s} + s) * 1000000 + {_MICROS_SQL}) AS `timestamp`",
            f"{_VALUE_SQL} AS value",
            "'device-data' AS topic",
            "CAST(d % 4 AS INT) AS `partition`",
            f"id DIV {shape.metrics} AS `offset`",
            "0 AS reading_index",
            "CAST(NULL AS TIMESTAMP) AS kafka_timestamp",
            "current_timestamp() AS updated_at",
            "CAST(NULL AS TIMESTAMP) AS arrival_watermark",
            f"element_at(array({names}), CAST(k AS INT) + 1) AS metric",
        )
    )


@dataclass(frozen=True)
class Marker:
    format: int
    devices: int
    seconds: int
    start: str
    days_done: int
    complete: bool
    build_seconds: float = 0.0
    metrics: int = 1

    def same_lake(self, other: Marker) -> bool:
        return (self.format, self.devices, self.metrics, self.seconds, self.start) == (
            other.format,
            other.devices,
            other.metrics,
            other.seconds,
            other.start,
        )


def _read_marker(folder: Path) -> Marker | None:
    try:
        return Marker(**json.loads((folder / MARKER).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_marker(folder: Path, marker: Marker) -> None:
    partial = folder / f"{MARKER}.tmp"
    partial.write_text(json.dumps(asdict(marker), indent=2))
    partial.replace(folder / MARKER)


def cached_folder(home: Path | str, shape: LakeShape) -> Path:
    """Where a lake of this shape is kept under the home folder, for every later run that asks for it: the bench's
    runs, and the scaled-down test, which has the shape of the bench's smoke run (`Plan.quick`)."""
    return Path(home).resolve() / "bench" / f"serving-{shape.devices}x{shape.metrics}x{shape.seconds}"


def is_built(folder: Path, shape: LakeShape) -> bool:
    marker = _read_marker(folder)
    return marker is not None and marker.complete and marker.same_lake(_marker(shape, 0, False))


def _marker(shape: LakeShape, days_done: int, complete: bool, build_seconds: float = 0.0) -> Marker:
    return Marker(
        FORMAT, shape.devices, shape.seconds, START.isoformat(), days_done, complete, build_seconds, shape.metrics
    )


def build_lake(
    folder: Path,
    readings: int,
    devices: int,
    spark: SparkSession,
    on_day: Callable[[int, int], None] | None = None,
    metrics: int = METRICS,
) -> LakeShape:
    """The lake of `devices` measuring `metrics` metrics at 1 Hz over `readings` // (`devices` * `metrics`)
    seconds, at `folder` (the lake root), built unless a finished build with the same parameters is there; a build
    interrupted part-way resumes at its next day. Shows a progress bar, or with `on_day`, calls it with (days done,
    days) instead."""
    from pyspark import StorageLevel

    from pipeline.stream import rollups
    from pipeline.stream.kpi import kpis_per_second
    from pipeline.stream.tables import create_tables

    shape = LakeShape.of(readings, devices, metrics)
    wanted = _marker(shape, 0, False)
    found = _read_marker(folder)
    if found is not None and found.complete and found.same_lake(wanted):
        return shape
    if found is None and folder.is_dir() and any(folder.iterdir()):
        # Never delete what this module did not write: it could be a real lake.
        raise FileExistsError(f"{folder} holds files but no {MARKER}; build the serving lake in an empty folder")
    if found is None or not found.same_lake(wanted):
        shutil.rmtree(folder, ignore_errors=True)
        found = wanted
    folder.mkdir(parents=True, exist_ok=True)
    _write_marker(folder, found)  # before the first table, so that a build stopped early is known as ours
    paths = LakePaths.from_settings(Settings(lake_root=str(folder)))
    create_tables(spark, paths)
    began = time.monotonic() - found.build_seconds

    def write(frame: DataFrame, table: Table, day: int) -> None:
        (
            frame.write.format("delta")
            .mode("append")
            .option("txnAppId", f"{TXN_APP_ID}-{table.value}")
            .option("txnVersion", day)
            .save(paths.table(table))
        )

    per_chunk = max(1, CHUNK_READINGS // (shape.devices * shape.metrics * DAY))
    with _progress(shape, on_day) as advance:
        advance(found.days_done)
        for first in range(found.days_done, shape.days, per_chunk):
            last = min(shape.days, first + per_chunk)
            # Kept while gold and the rollups are computed from it: generating it is cheap, but three times is not.
            silver = day_readings(spark, shape, first, last).persist(StorageLevel.MEMORY_AND_DISK)
            write(silver, Table.SILVER, first)
            chunk = silver.select("device_id", "metric", "timestamp", "value", "arrival_watermark")
            write(kpis_per_second(chunk).coalesce(1).sortWithinPartitions("timestamp"), Table.GOLD, first)
            rollup_rows = rollups.from_readings(chunk).repartition("grain")
            write(rollup_rows.sortWithinPartitions("grain", "metric", "device_id", "timestamp"), Table.ROLLUPS, first)
            silver.unpersist()
            _write_marker(folder, _marker(shape, last, False, time.monotonic() - began))
            advance(last)
    # A checkpoint per table, so that a reader replays one file instead of every day's commit.
    _checkpoint(paths)
    _write_marker(folder, _marker(shape, shape.days, True, time.monotonic() - began))
    return shape


def _checkpoint(paths: LakePaths) -> None:
    """A Delta checkpoint of each table the build wrote (delta-rs, as `lakehouse maintain` writes them)."""
    from deltalake import DeltaTable as RustTable

    for table in (Table.SILVER, Table.GOLD, Table.ROLLUPS):
        RustTable(paths.table(table)).create_checkpoint()


class _progress:
    """A rich progress bar of days built, or `on_day` calls when given."""

    def __init__(self, shape: LakeShape, on_day: Callable[[int, int], None] | None) -> None:
        self.shape, self.on_day = shape, on_day
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> Callable[[int], None]:
        if self.on_day is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn(f"building a lake of {self.shape.slots:,} device-metric-seconds, day"),
                MofNCompleteColumn(),
                BarColumn(),
                TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task("days", total=self.shape.days)
        return self._advance

    def _advance(self, done: int) -> None:
        if self.on_day is not None:
            self.on_day(done, self.shape.days)
        elif self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done)

    def __exit__(self, *_: object) -> None:
        if self._bar is not None:
            self._bar.stop()
