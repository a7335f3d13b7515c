"""An independent reference for KPIs: built from the readings a test sends, not from the pipeline's code."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


@dataclass
class Reference:
    """Valid readings by identity; a later `add` of the same identity is a correction and replaces the value."""

    readings: dict[tuple[str, datetime], float] = field(default_factory=dict)

    def add(self, device_id: str, moment: datetime, value: float) -> None:
        self.readings[(device_id, moment.astimezone(UTC))] = value

    def buckets(self, width: timedelta = timedelta(seconds=1), device_id: str | None = None) -> dict[datetime, dict[str, object]]:
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        grouped: dict[datetime, list[tuple[str, float]]] = {}
        for (device, moment), value in self.readings.items():
            if device_id is not None and device != device_id:
                continue
            start = epoch + ((moment - epoch) // width) * width
            grouped.setdefault(start, []).append((device, value))
        return {start: kpis(items) for start, items in grouped.items()}


def kpis(items: list[tuple[str, float]]) -> dict[str, object]:
    values = [v for _, v in items]
    return {
        "reading_count": len(values),
        "device_count": len({d for d, _ in items}),
        "average_value": statistics.fmean(values),
        "min_value": min(values),
        "max_value": max(values),
        "sum_value": math.fsum(values),
        "stddev_value": statistics.stdev(values) if len(values) > 1 else None,
    }


def assert_kpis_equal(got: dict[str, object], expected: dict[str, object], where: str) -> None:
    for name, want in expected.items():
        have = got[name]
        if want is None or isinstance(want, int):
            assert have == want, f"{where}: {name} is {have}, expected {want}"
        else:
            assert isinstance(have, float) and math.isclose(have, want, rel_tol=1e-9, abs_tol=1e-12), (
                f"{where}: {name} is {have}, expected {want}"
            )


def gold_kpis(lake: object) -> dict[datetime, dict[str, object]]:
    """Gold as DuckDB reads it, by second, with the fields of contract section 4."""
    fields = ["reading_count", "device_count", "average_value", "min_value", "max_value", "sum_value", "stddev_value"]
    rows = lake.sql(f'SELECT "timestamp", {", ".join(fields)} FROM gold').fetchall()  # type: ignore[attr-defined]
    return {row[0].astimezone(UTC): dict(zip(fields, row[1:], strict=True)) for row in rows}
