"""The independent side of every KPI check: contract section 4 recomputed in plain Python from the readings a test
sends (never from the pipeline's or the API's code), and the one comparison of an answer with it."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

KPI_FIELDS = ("reading_count", "device_count", "average_value", "min_value", "max_value", "sum_value", "stddev_value")
GRAINS = {
    "second": timedelta(seconds=1),
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Contract section 4: the KPIs "equal an independent recomputation from the produced data (relative tolerance
# 1e-9)". Averages, sums and standard deviations are compared within it, relative to the larger magnitude and
# with no absolute floor; counts, minimum and maximum are exact, and a null standard deviation must be null.
REL_TOL = 1e-9
ROUNDED_FIELDS = frozenset({"average_value", "sum_value", "stddev_value"})


@dataclass
class Reference:
    """Valid readings by identity; a later `add` of the same identity is a correction and replaces the value."""

    readings: dict[tuple[str, datetime], float] = field(default_factory=dict)

    @classmethod
    def of(cls, readings: Iterable[tuple[str, datetime, float]]) -> Reference:
        """The reference of (device_id, timestamp, value) readings taken in this order."""
        reference = cls()
        for device_id, moment, value in readings:
            reference.add(device_id, moment, value)
        return reference

    def add(self, device_id: str, moment: datetime, value: float) -> None:
        self.readings[(device_id, moment.astimezone(UTC))] = value

    def buckets(self, grain: str = "second", device_id: str | None = None) -> dict[datetime, dict[str, object]]:
        """KPIs per bucket of `grain` (of one device with `device_id`), by bucket start, in time order."""
        width = GRAINS[grain]
        grouped: dict[datetime, tuple[list[float], set[str]]] = {}
        for (device, moment), value in self.readings.items():
            if device_id is None or device == device_id:
                values, devices = grouped.setdefault(EPOCH + (moment - EPOCH) // width * width, ([], set()))
                values.append(value)
                devices.add(device)
        return {start: kpis(*grouped[start]) for start in sorted(grouped)}


def kpis(values: Sequence[float], devices: Collection[object]) -> dict[str, object]:
    """The contract's fields over one bucket's values and distinct devices, in gold's column order; sums are exact
    (math.fsum) before their one rounding, and the deviation is taken from the mean in a second pass."""
    count = len(values)
    total = math.fsum(values)
    mean = total / count
    return {
        "reading_count": count,
        "device_count": len(devices),
        "average_value": mean,
        "min_value": min(values),
        "max_value": max(values),
        "sum_value": total,
        "stddev_value": math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (count - 1)) if count > 1 else None,
    }


def assert_kpis_equal(got: dict[str, object], expected: dict[str, object], where: str) -> None:
    """`got` (a gold row, an API answer) holds `expected`'s KPIs within REL_TOL."""
    for name, want in expected.items():
        have = got[name]
        if want is not None and name in ROUNDED_FIELDS:
            assert isinstance(have, float) and math.isclose(have, want, rel_tol=REL_TOL), (  # type: ignore[arg-type]
                f"{where}: {name} is {have}, expected {want} (relative tolerance {REL_TOL})"
            )
        else:
            assert have == want, f"{where}: {name} is {have}, expected {want}"


def gold_kpis(lake: object) -> dict[datetime, dict[str, object]]:
    """Gold as DuckDB reads it, by second, with the fields of contract section 4."""
    rows = lake.sql(f'SELECT "timestamp", {", ".join(KPI_FIELDS)} FROM gold').fetchall()  # type: ignore[attr-defined]
    return {row[0].astimezone(UTC): dict(zip(KPI_FIELDS, row[1:], strict=True)) for row in rows}


RollupKey = tuple[str, str | None, datetime]  # grain, device (None: the fleet), bucket start


def expected_rollups(reference: Reference) -> dict[RollupKey, dict[str, object]]:
    """Every bucket the rollups table should hold: per device and of the fleet, per minute, hour and day."""
    devices = sorted({device for device, _ in reference.readings})
    found: dict[RollupKey, dict[str, object]] = {}
    for grain in ("minute", "hour", "day"):
        for device in [None, *devices]:
            for start, values in reference.buckets(grain, device).items():
                found[(grain, device, start)] = values
    return found


def rollup_kpis(lake: object) -> dict[RollupKey, dict[str, object]]:
    """The rollups table as DuckDB reads it, by grain, device and bucket start."""
    rows = lake.sql(f'SELECT grain, device_id, "timestamp", {", ".join(KPI_FIELDS)} FROM rollups').fetchall()  # type: ignore[attr-defined]
    return {(row[0], row[1], row[2].astimezone(UTC)): dict(zip(KPI_FIELDS, row[3:], strict=True)) for row in rows}


def assert_rollups_equal(got: dict[RollupKey, dict[str, object]], want: dict[RollupKey, dict[str, object]]) -> None:
    assert sorted(got, key=str) == sorted(want, key=str), "the rollups hold other buckets than the readings make"
    for key, values in want.items():
        assert_kpis_equal(got[key], values, f"rollup {key}")


HistoryKey = tuple[str, str | None, datetime]  # grain, device (None: the fleet), bucket start


@dataclass
class History:
    """Each bucket's revision and late readings, and the watermark, as the README's "Late data" defines them,
    replayed batch by batch from the readings each micro-batch carried (broker times later than every reading)."""

    lateness: timedelta
    watermark: datetime | None = None
    reference: Reference = field(default_factory=Reference)
    revision: dict[HistoryKey, int] = field(default_factory=dict)
    late: dict[HistoryKey, int] = field(default_factory=dict)

    def batch(self, readings: Sequence[tuple[str, datetime, float]]) -> None:
        latest = Reference.of(readings).readings
        changed = {k: v for k, v in latest.items() if self.reference.readings.get(k) != v}
        held = {key for device, moment in self.reference.readings for key in _keys(device, moment)}
        revised: set[HistoryKey] = set()
        for device, moment in changed:
            for key in _keys(device, moment):
                if key in held:
                    revised.add(key)
                if self.watermark is not None and key[2] + GRAINS[key[0]] <= self.watermark:
                    self.late[key] = self.late.get(key, 0) + 1
        for key in revised:
            self.revision[key] = self.revision.get(key, 0) + 1
        for (device, moment), value in changed.items():
            self.reference.add(device, moment, value)
        if readings:
            candidate = max(moment for _, moment, _ in readings) - self.lateness
            self.watermark = candidate if self.watermark is None else max(self.watermark, candidate)

    def state(self, grain: str, device: str | None, start: datetime) -> dict[str, object]:
        """What the API says of a bucket beside its KPIs."""
        key = (grain, device, start)
        final = self.watermark is not None and start + GRAINS[grain] <= self.watermark
        return {"final": final, "revision": self.revision.get(key, 0), "late_readings": self.late.get(key, 0)}


def _keys(device: str, moment: datetime) -> list[HistoryKey]:
    keys = []
    for grain, width in GRAINS.items():
        start = EPOCH + (moment - EPOCH) // width * width
        keys += [(grain, None, start), (grain, device, start)]
    return keys
