"""The independent side of every KPI check: contract section 4 recomputed in plain Python from the readings a test
sends (never from the pipeline's or the API's code), and the one comparison of an answer with it."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction

KPI_FIELDS = ("reading_count", "device_count", "average_value", "min_value", "max_value", "sum_value", "stddev_value")
GRAINS = {
    "second": timedelta(seconds=1),
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Contract section 4: counts, minimum and maximum equal the recomputation exactly, and a null standard deviation
# must be null; the others are within a relative 1e-9: a sum relative to the sum of the values' magnitudes (a day of
# readings around 0 cancels to near nothing, and no floating-point sum promises more than that), an average relative
# to the same bound on the sum it divides (the mean of the magnitudes), and a standard deviation relative to itself,
# also when the values sit far from zero (a meter at 1e8 +- 1).
REL_TOL = 1e-9
ROUNDED_FIELDS = frozenset({"average_value", "sum_value", "stddev_value"})


DEFAULT_METRIC = "value"


@dataclass
class Reference:
    """Valid readings by identity (device, time, metric); a later `add` of the same identity is a correction and
    replaces the value. A reading of the tutorial's form is metric `value`."""

    readings: dict[tuple[str, datetime, str], float] = field(default_factory=dict)

    @classmethod
    def of(cls, readings: Iterable[tuple[str, datetime, float] | tuple[str, datetime, float, str]]) -> Reference:
        """The reference of (device_id, timestamp, value[, metric]) readings taken in this order."""
        reference = cls()
        for reading in readings:
            reference.add(*reading)
        return reference

    def add(self, device_id: str, moment: datetime, value: float, metric: str = DEFAULT_METRIC) -> None:
        self.readings[(device_id, moment.astimezone(UTC), metric)] = value

    def value(self, device_id: str, moment: datetime, metric: str = DEFAULT_METRIC) -> float | None:
        return self.readings.get((device_id, moment.astimezone(UTC), metric))

    def metrics(self) -> list[str]:
        return sorted({metric for _, _, metric in self.readings})

    def buckets(
        self, grain: str = "second", device_id: str | None = None, metric: str = DEFAULT_METRIC
    ) -> dict[datetime, Kpis]:
        """KPIs of one metric per bucket of `grain` (of one device with `device_id`), by bucket start, in time
        order."""
        width = GRAINS[grain]
        grouped: dict[datetime, tuple[list[float], set[str]]] = {}
        for (device, moment, name), value in self.readings.items():
            if name == metric and (device_id is None or device == device_id):
                values, devices = grouped.setdefault(EPOCH + (moment - EPOCH) // width * width, ([], set()))
                values.append(value)
                devices.add(device)
        return {start: kpis(*grouped[start]) for start in sorted(grouped)}


class Kpis(dict[str, object]):
    """One bucket's contract fields, in gold's column order, and beside them (not a field) the sum of the values'
    magnitudes that bounds the error of the sum and the average."""

    magnitude_sum: float


def kpis(values: Sequence[float], devices: Collection[object]) -> Kpis:
    """The contract's fields over one bucket's values and distinct devices, computed exactly (integer arithmetic on
    the values' binary fractions) and rounded once to a double: sum, mean and the variance's sum of squared
    deviations alike, so the reference carries no rounding error of its own to forgive."""
    count = len(values)
    # Every double is an integer over a power of two: on the largest denominator they are all integers, and sums of
    # them and of their squares are exact.
    ratios = [value.as_integer_ratio() for value in values]
    scale = max(denominator for _, denominator in ratios)
    scaled = [numerator * (scale // denominator) for numerator, denominator in ratios]
    total, squares = sum(scaled), sum(x * x for x in scaled)
    # n * sum of squared deviations = n * sum(x^2) - (sum x)^2, exactly, on the scale squared.
    spread = count * squares - total * total
    result = Kpis(
        reading_count=count,
        device_count=len(devices),
        average_value=float(Fraction(total, count * scale)),
        min_value=min(values),
        max_value=max(values),
        sum_value=float(Fraction(total, scale)),
        stddev_value=math.sqrt(Fraction(spread, count * (count - 1) * scale * scale)) if count > 1 else None,
    )
    result.magnitude_sum = math.fsum(abs(value) for value in values)
    return result


def tolerance(name: str, expected: Mapping[str, object]) -> float:
    """How far an answer's `name` may lie from the reference's (contract section 4); 0 for the exact fields."""
    if name not in ROUNDED_FIELDS or expected[name] is None:
        return 0.0
    if name == "stddev_value":
        return REL_TOL * abs(expected[name])  # type: ignore[arg-type]
    magnitude = getattr(expected, "magnitude_sum", None)
    if magnitude is None:  # a bucket built by hand: its own value stands for the magnitude
        magnitude = abs(expected["sum_value"])  # type: ignore[arg-type]
    bound = REL_TOL * magnitude
    return bound / expected["reading_count"] if name == "average_value" else bound  # type: ignore[operator]


def kpi_error(got: Mapping[str, object], expected: Mapping[str, object], name: str) -> float:
    """How far `got`'s `name` lies from the reference's, as a share of its tolerance (above 1: out of it)."""
    have, want = got[name], expected[name]
    allowed = tolerance(name, expected)
    if want is None or have is None or allowed == 0.0:
        return 0.0 if have == want else math.inf
    error = abs(have - want)  # type: ignore[operator]
    return error / allowed if error else 0.0


def assert_kpis_equal(got: dict[str, object], expected: dict[str, object], where: str) -> None:
    """`got` (a gold or rollups row, an API answer) holds `expected`'s KPIs within the contract's tolerance."""
    for name, want in expected.items():
        have = got[name]
        if want is not None and name in ROUNDED_FIELDS:
            assert isinstance(have, float) and kpi_error(got, expected, name) <= 1.0, (
                f"{where}: {name} is {have!r}, expected {want!r}: off by {abs(have - want):.3g} "  # type: ignore[operator]
                f"where {tolerance(name, expected):.3g} is allowed"
            )
        else:
            assert have == want, f"{where}: {name} is {have}, expected {want}"


def gold_kpis(lake: object, metric: str = DEFAULT_METRIC) -> dict[datetime, dict[str, object]]:
    """Gold as DuckDB reads it, one metric's rows by second, with the fields of contract section 4."""
    query = f'SELECT "timestamp", {", ".join(KPI_FIELDS)} FROM gold WHERE metric = $metric'
    rows = lake.execute(query, {"metric": metric}).fetchall()  # type: ignore[attr-defined]
    return {row[0].astimezone(UTC): dict(zip(KPI_FIELDS, row[1:], strict=True)) for row in rows}


RollupKey = tuple[str, str | None, datetime]  # grain, device (None: the fleet), bucket start


def expected_rollups(reference: Reference, metric: str = DEFAULT_METRIC) -> dict[RollupKey, dict[str, object]]:
    """Every bucket of one metric the rollups table should hold: per device and of the fleet, per minute, hour and
    day."""
    devices = sorted({device for device, _, name in reference.readings if name == metric})
    found: dict[RollupKey, dict[str, object]] = {}
    for grain in ("minute", "hour", "day"):
        for device in [None, *devices]:
            for start, values in reference.buckets(grain, device, metric).items():
                found[(grain, device, start)] = values
    return found


def rollup_kpis(lake: object, metric: str = DEFAULT_METRIC) -> dict[RollupKey, dict[str, object]]:
    """One metric's rows of the rollups table as DuckDB reads them, by grain, device and bucket start."""
    query = f'SELECT grain, device_id, "timestamp", {", ".join(KPI_FIELDS)} FROM rollups WHERE metric = $metric'
    rows = lake.execute(query, {"metric": metric}).fetchall()  # type: ignore[attr-defined]
    return {(row[0], row[1], row[2].astimezone(UTC)): dict(zip(KPI_FIELDS, row[3:], strict=True)) for row in rows}


def assert_rollups_equal(got: dict[RollupKey, dict[str, object]], want: dict[RollupKey, dict[str, object]]) -> None:
    assert sorted(got, key=str) == sorted(want, key=str), "the rollups hold other buckets than the readings make"
    for key, values in want.items():
        assert_kpis_equal(got[key], values, f"rollup {key}")


HistoryKey = tuple[str, str | None, datetime, str]  # grain, device (None: the fleet), bucket start, metric


@dataclass
class History:
    """Each bucket's revision and late readings, and the watermark, as the README's "Late data" defines them,
    replayed batch by batch from the readings each micro-batch carried (broker times later than every reading)."""

    lateness: timedelta
    watermark: datetime | None = None
    reference: Reference = field(default_factory=Reference)
    revision: dict[HistoryKey, int] = field(default_factory=dict)
    late: dict[HistoryKey, int] = field(default_factory=dict)

    def batch(self, readings: Sequence[tuple[str, datetime, float] | tuple[str, datetime, float, str]]) -> None:
        """One micro-batch of readings: (device, time, value[, metric])."""
        latest = Reference.of(readings).readings
        changed = {k: v for k, v in latest.items() if self.reference.readings.get(k) != v}
        held = {key for device, moment, metric in self.reference.readings for key in _keys(device, moment, metric)}
        revised: set[HistoryKey] = set()
        for device, moment, metric in changed:
            for key in _keys(device, moment, metric):
                if key in held:
                    revised.add(key)
                if self.watermark is not None and key[2] + GRAINS[key[0]] <= self.watermark:
                    self.late[key] = self.late.get(key, 0) + 1
        for key in revised:
            self.revision[key] = self.revision.get(key, 0) + 1
        for (device, moment, metric), value in changed.items():
            self.reference.add(device, moment, value, metric)
        if readings:
            candidate = max(reading[1] for reading in readings) - self.lateness
            self.watermark = candidate if self.watermark is None else max(self.watermark, candidate)

    def state(self, grain: str, device: str | None, start: datetime, metric: str = DEFAULT_METRIC) -> dict[str, object]:
        """What the API says of a bucket of one metric beside its KPIs."""
        key = (grain, device, start, metric)
        final = self.watermark is not None and start + GRAINS[grain] <= self.watermark
        return {"final": final, "revision": self.revision.get(key, 0), "late_readings": self.late.get(key, 0)}


def _keys(device: str, moment: datetime, metric: str) -> list[HistoryKey]:
    keys = []
    for grain, width in GRAINS.items():
        start = EPOCH + (moment - EPOCH) // width * width
        keys += [(grain, None, start, metric), (grain, device, start, metric)]
    return keys
