"""A big lake for the serving benchmark and its scaled-down test, written once and cached.

Readings come from a formula of (device, second), so that any bucket can be recomputed in plain Python without
reading the lake: device `d` reads once in each second `s` after START, at a fractional instant, unless one of a
few gaps (a second, a minute, an hour, a whole day) leaves it out, so that device counts vary at every grain.

The tables are the pipeline's own (`pipeline.stream.tables.create_tables`), written a UTC day at a time: silver
from `spark.range`, gold from `pipeline.stream.kpi.kpis_per_second` and the rollups from
`pipeline.stream.rollups.from_readings` over that day's readings. No bucket of any grain spans two days, so each
day's rollups are complete and exact; and each day's files hold that day only, so the tables are clustered by time.
A marker file holds the parameters of a finished build; building again with the same ones does nothing.
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
from lake.tables import LakePaths, Table

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from rich.progress import Progress, TaskID

START = datetime(2030, 1, 1, tzinfo=UTC)  # a UTC midnight: day chunks are whole days
DAY = 86_400
MARKER = "serving-lake.json"
# Bump when the formula or the layout changes, so that a cached lake of the old kind is built again.
FORMAT = 2  # 2: silver records arrival_watermark; gold and the rollups their history columns
# The build's Delta writes carry this app id with the day's index as the version: a build resumed after a crash
# skips the writes of a day that had committed, as the pipeline's micro-batches do.
TXN_APP_ID = "kpi-lakehouse-serving-lake"
# Whole days are written together up to about this many readings: each write has a fixed cost in Spark jobs.
CHUNK_READINGS = 10_000_000


@dataclass(frozen=True)
class LakeShape:
    """`devices` at 1 Hz for `seconds` seconds from START (before the gaps)."""

    devices: int
    seconds: int

    @classmethod
    def of(cls, readings: int, devices: int) -> LakeShape:
        return cls(devices, max(1, readings // devices))

    @property
    def slots(self) -> int:
        """Device-seconds, each a reading unless a gap leaves it out."""
        return self.devices * self.seconds

    @property
    def days(self) -> int:
        return math.ceil(self.seconds / DAY)

    def device_id(self, device: int) -> str:
        return f"dev-{device:04d}"

    @property
    def end(self) -> datetime:
        return START + timedelta(seconds=self.seconds)


# ------------------------------------------------------------------------------------------------ the formula
# The same arithmetic twice: as Spark SQL over columns `d` (device) and `s` (second after START), and in Python.
# Values are integers divided by 100, so Spark's double division and Python's int / int round alike.

_PRESENT_SQL = (
    "(s * 13 + d * 7) % 97 != 0"  # a missed second
    " AND ((s DIV 60) * 31 + d * 17) % 23 != 0"  # a missed minute
    " AND ((s DIV 3600) * 7 + d) % 29 != 0"  # a missed hour
    f" AND NOT (d % 5 = 4 AND ((s DIV {DAY}) + d) % 3 = 0)"  # one device in five is off one day in three
)
_MICROS_SQL = "(d * 7919 + s * 104729) % 1000000"
_VALUE_SQL = "CAST((d * 1000003 + s * 7919) % 200003 - 100000 AS DOUBLE) / CAST(100 AS DOUBLE)"


def present(device: int, second: int) -> bool:
    return (
        (second * 13 + device * 7) % 97 != 0
        and ((second // 60) * 31 + device * 17) % 23 != 0
        and ((second // 3600) * 7 + device) % 29 != 0
        and not (device % 5 == 4 and (second // DAY + device) % 3 == 0)
    )


def micros(device: int, second: int) -> int:
    return (device * 7919 + second * 104729) % 1_000_000


def value(device: int, second: int) -> float:
    return ((device * 1_000_003 + second * 7919) % 200_003 - 100_000) / 100


def readings(
    shape: LakeShape, start: datetime, end: datetime, device_id: str | None = None
) -> Iterator[tuple[str, datetime, float]]:
    """The readings (device_id, timestamp, value) with a timestamp in [start, end), of one device or all."""
    first = max(0, math.floor((start - START).total_seconds()))
    last = min(shape.seconds, math.ceil((end - START).total_seconds()))
    devices = _device_numbers(shape, device_id)
    for second in range(first, last):
        base = START + timedelta(seconds=second)
        for device in devices:
            if present(device, second):
                moment = base + timedelta(microseconds=micros(device, second))
                if start <= moment < end:
                    yield shape.device_id(device), moment, value(device, second)


def _device_numbers(shape: LakeShape, device_id: str | None) -> range:
    if device_id is None:
        return range(shape.devices)
    for device in range(shape.devices):
        if shape.device_id(device) == device_id:
            return range(device, device + 1)
    return range(0)


def expected_kpis(
    shape: LakeShape, start: datetime, end: datetime, device_id: str | None = None
) -> dict[str, object] | None:
    """Contract section 4's KPIs over the readings of whole seconds [start, end) (None when there are none), from
    the formula alone: exact sums (math.fsum) and the deviation from the mean in a second pass."""
    first = max(0, math.floor((start - START).total_seconds()))
    last = min(shape.seconds, math.ceil((end - START).total_seconds()))
    devices = _device_numbers(shape, device_id)
    values: list[float] = []
    seen: set[int] = set()
    for second in range(first, last):
        for device in devices:
            if present(device, second):
                values.append(value(device, second))
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
    per core here), each in time order, so that each file holds a span of time."""
    first, last = first_day * DAY, min(shape.seconds, end_day * DAY)
    partitions = max(2, end_day - first_day)
    start_s = int(START.timestamp())
    return (
        spark.range(first * shape.devices, last * shape.devices, 1, partitions)
        .selectExpr("id", f"id DIV {shape.devices} AS s", f"id % {shape.devices} AS d")
        .where(_PRESENT_SQL)
        .selectExpr(
            "format_string('dev-%04d', CAST(d AS INT)) AS device_id",
            f"timestamp_micros(({start_s} + s) * 1000000 + {_MICROS_SQL}) AS `timestamp`",
            f"{_VALUE_SQL} AS value",
            "'device-data' AS topic",
            "CAST(d % 4 AS INT) AS `partition`",
            "id AS `offset`",
            "0 AS reading_index",
            "CAST(NULL AS TIMESTAMP) AS kafka_timestamp",
            "current_timestamp() AS updated_at",
            "CAST(NULL AS TIMESTAMP) AS arrival_watermark",
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

    def same_lake(self, other: Marker) -> bool:
        return (self.format, self.devices, self.seconds, self.start) == (
            other.format,
            other.devices,
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
    return Path(home).resolve() / "bench" / f"serving-{shape.devices}x{shape.seconds}"


def is_built(folder: Path, shape: LakeShape) -> bool:
    marker = _read_marker(folder)
    return marker is not None and marker.complete and marker.same_lake(_marker(shape, 0, False))


def _marker(shape: LakeShape, days_done: int, complete: bool, build_seconds: float = 0.0) -> Marker:
    return Marker(FORMAT, shape.devices, shape.seconds, START.isoformat(), days_done, complete, build_seconds)


def build_lake(
    folder: Path,
    readings: int,
    devices: int,
    spark: SparkSession,
    on_day: Callable[[int, int], None] | None = None,
) -> LakeShape:
    """The lake of `devices` at 1 Hz over `readings` // `devices` seconds, at `folder` (the lake root), built unless
    a finished build with the same parameters is there; a build interrupted part-way resumes at its next day.
    Shows a progress bar, or with `on_day`, calls it with (days done, days) instead."""
    from pyspark import StorageLevel

    from pipeline.stream import rollups
    from pipeline.stream.kpi import kpis_per_second
    from pipeline.stream.tables import create_tables

    shape = LakeShape.of(readings, devices)
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

    per_chunk = max(1, CHUNK_READINGS // (shape.devices * DAY))
    with _progress(shape, on_day) as advance:
        advance(found.days_done)
        for first in range(found.days_done, shape.days, per_chunk):
            last = min(shape.days, first + per_chunk)
            # Kept while gold and the rollups are computed from it: generating it is cheap, but three times is not.
            silver = day_readings(spark, shape, first, last).persist(StorageLevel.MEMORY_AND_DISK)
            write(silver, Table.SILVER, first)
            chunk = silver.select("device_id", "timestamp", "value", "arrival_watermark")
            write(kpis_per_second(chunk).coalesce(1).sortWithinPartitions("timestamp"), Table.GOLD, first)
            rollup_rows = rollups.from_readings(chunk).repartition("grain")
            write(rollup_rows.sortWithinPartitions("grain", "device_id", "timestamp"), Table.ROLLUPS, first)
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
                TextColumn(f"building a lake of {self.shape.slots:,} device-seconds, day"),
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
