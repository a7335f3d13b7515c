"""The lake the pipeline wrote from a real topic (conftest's `pipeline_lake`: a fleet day of temperatures that
cancel around 0 and a meter at 1e8 +- 1), read back through DuckDB and through the API: every bucket of every grain,
of the fleet and of each device, equals tests.reference's recomputation within contract section 4's tolerance;
and the API's 404s, 400s and ETags on it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from lake.duck import connect
from lake.tables import LakePaths
from lake.timestamps import Grain, parse_timestamp_us
from serve import queries
from serve.app import create_app
from serve.snapshot import SnapshotStore
from tests.conftest import PipelineLake
from tests.reference import (
    GRAINS,
    KPI_FIELDS,
    ROUNDED_FIELDS,
    Kpis,
    expected_rollups,
    gold_kpis,
    kpi_error,
    rollup_kpis,
)
from tests.serve_lake import api_settings, iso
from tests.stream import FLEET_DAY, METER, THERMOMETERS

pytestmark = [pytest.mark.kafka, pytest.mark.spark]
PROBLEM = "application/problem+json"
SCOPES = (None, *THERMOMETERS, METER)  # the fleet, then each device


def _misses(found: Mapping[Any, Mapping[str, object]], expected: Mapping[Any, Kpis], label: str) -> list[str]:
    """Every bucket missing, extra or out of tolerance, and per rounded field the worst error as a share of its
    tolerance (so that a failure says how far off each grain is, not only the first bucket that is)."""
    misses = []
    if set(found) != set(expected):
        misses.append(f"{label}: buckets {sorted(map(str, set(found) ^ set(expected)))[:5]} are not both sides'")
    worst: dict[str, tuple[float, object]] = {}
    for key, want in expected.items():
        got = found.get(key)
        if got is None:
            continue
        for name in want:
            error = kpi_error(got, want, name)
            if name in ROUNDED_FIELDS and want[name] is not None:
                worst[name] = max(worst.get(name, (0.0, key)), (error, key), key=lambda pair: pair[0])
            elif error:
                misses.append(f"{label} {key}: {name} is {got[name]!r}, expected {want[name]!r}")
    misses += [
        f"{label}: {name} up to {share:.3g} times its tolerance (at {key})"
        for name, (share, key) in worst.items()
        if not share <= 1.0
    ]
    return misses


def test_gold_and_rollups_equal_the_reference_at_every_grain(pipeline_lake: PipelineLake) -> None:
    reference = pipeline_lake.reference
    lake = connect(LakePaths.from_settings(pipeline_lake.settings))
    silver = lake.sql("SELECT count(*) FROM silver").fetchone()
    assert silver == (len(reference.readings),)
    # Every metric on its own: the pumps' metrics never mix with each other or with the thermometers' `value`.
    assert reference.metrics() == ["battery_pct", "flow_m3h", "pressure_bar", "temperature_c", "value"]
    assert sorted(row[0] for row in lake.sql("SELECT DISTINCT metric FROM gold").fetchall()) == reference.metrics()
    misses = []
    for metric in reference.metrics():
        misses += _misses(gold_kpis(lake, metric), reference.buckets(metric=metric), f"gold {metric}")
        stored, want = rollup_kpis(lake, metric), expected_rollups(reference, metric)
        devices = sorted({device for device, _, name in reference.readings if name == metric})
        assert metric != "value" or devices == sorted((*THERMOMETERS, METER))
        for grain in ("minute", "hour", "day"):
            for scope in (None, *devices):
                label = f"rollups {metric} {grain} of {scope or 'the fleet'}"
                misses += _misses(
                    {k: v for k, v in stored.items() if k[:2] == (grain, scope)},
                    {k: v for k, v in want.items() if k[:2] == (grain, scope)},
                    label,
                )
    assert not misses, "\n".join(misses)
    # device_count counts the devices that reported the metric: the day's pressure comes from two pumps.
    day = FLEET_DAY
    assert reference.buckets("day", metric="pressure_bar")[day]["device_count"] == 2
    assert rollup_kpis(lake, "pressure_bar")[("day", None, day)]["device_count"] == 2


def test_the_day_holds_what_makes_it_hard(pipeline_lake: PipelineLake) -> None:
    """The lake is the adversary it is meant to be: sums that cancel to near nothing against large magnitudes, and
    a meter whose spread is a hundred-millionth of its values, at every grain."""
    reference = pipeline_lake.reference
    for grain in GRAINS:
        cancelling = [
            k for k in reference.buckets(grain, "thermo-0").values() if abs(k["sum_value"]) < 1e-6 * k.magnitude_sum
        ]
        assert cancelling, grain
        for scope in (METER, None):  # the meter's buckets, and the fleet's where the meter reads alone
            far = [
                k
                for k in reference.buckets(grain, scope).values()
                if k["stddev_value"] is not None and k["stddev_value"] < 1e-7 * k["average_value"]  # type: ignore[operator]
            ]
            assert far or (scope is None and grain in ("hour", "day")), (grain, scope)
        # Where the meter does not read (the afternoon), the fleet's buckets cancel too.
        afternoon = [k for s, k in reference.buckets(grain).items() if s >= FLEET_DAY + timedelta(hours=12)]
        assert grain == "day" or any(abs(k["sum_value"]) < 1e-6 * k.magnitude_sum for k in afternoon), grain  # type: ignore[arg-type]
    assert reference.buckets("hour")[FLEET_DAY + timedelta(hours=15)]["device_count"] == len(THERMOMETERS)


@pytest.fixture()
def client(pipeline_lake: PipelineLake, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings(pipeline_lake.root, api_store_dir=tmp_path / "store"))) as test_client:
        yield test_client


def _series(
    client: TestClient, grain: str, device_id: str | None, metric: str | None = None
) -> dict[datetime, dict[str, object]]:
    """Every bucket of the day at `grain` (of `metric`, the API's default `value` when None) as the API's series
    pages give it."""
    params: dict[str, object] = {
        "start": iso(FLEET_DAY),
        "end": iso(FLEET_DAY + timedelta(days=1)),
        "grain": grain,
        "limit": 500,
    }
    if metric is not None:
        params["metric"] = metric
    if device_id is not None:
        params["device_id"] = device_id
    items: list[dict[str, object]] = []
    answer = client.get("/kpis", params=params)
    while True:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        items += body["items"]
        if body["next"] is None:
            break
        answer = client.get(body["next"])
    found = {datetime.fromisoformat(str(item["timestamp"])): item for item in items}
    assert len(found) == len(items)
    assert body["metric"] == (metric or "value")
    return found


def test_api_answers_every_grain_of_the_fleet_and_each_device(client: TestClient, pipeline_lake: PipelineLake) -> None:
    reference = pipeline_lake.reference
    misses: list[str] = []
    for grain in GRAINS:
        for scope in SCOPES:
            expected = reference.buckets(grain, scope)
            label = f"API {grain} of {scope or 'the fleet'}"
            misses += _misses(_series(client, grain, scope), expected, label)
            # Point lookups at an instant inside the first, a middle and the last bucket.
            starts = list(expected)
            for start in {starts[0], starts[len(starts) // 2], starts[-1]}:
                params = {"grain": grain} | ({"device_id": scope} if scope else {})
                instant = (start + GRAINS[grain] / 2).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                answer = client.get(f"/kpis/{instant}", params=params)
                assert answer.status_code == 200, f"{label} at {instant}: {answer.text}"
                body = answer.json()
                assert (body["timestamp"], body["grain"], body.get("device_id")) == (iso(start), grain, scope)
                misses += _misses({start: body}, {start: expected[start]}, f"{label}, point lookup")
    # The pumps' metrics, each on its own, for the fleet and each pump that sends it.
    for metric in reference.metrics():
        if metric == "value":
            continue
        pumps = sorted({device for device, _, name in reference.readings if name == metric})
        for grain in GRAINS:
            for scope in (None, *pumps):
                label = f"API {metric} {grain} of {scope or 'the fleet'}"
                misses += _misses(_series(client, grain, scope, metric), reference.buckets(grain, scope, metric), label)
    assert not misses, "\n".join(misses)


def test_one_request_answers_every_metric_of_a_bucket(client: TestClient, pipeline_lake: PipelineLake) -> None:
    reference = pipeline_lake.reference
    hour = FLEET_DAY + timedelta(hours=3)
    answer = client.get(f"/kpis/{iso(hour)}/metrics", params={"grain": "hour"})
    assert answer.status_code == 200, answer.text
    rows = {row["metric"]: row for row in answer.json()["metrics"]}
    assert sorted(rows) == reference.metrics()
    misses = []
    for metric, row in rows.items():
        misses += _misses({hour: row}, {hour: reference.buckets("hour", None, metric)[hour]}, f"hour {metric}")
    assert not misses, "\n".join(misses)


def test_lake_and_store_file_answer_alike(pipeline_lake: PipelineLake, tmp_path: Path) -> None:
    """The same buckets from the lake's Delta tables (before the store file is built) and from the store file."""
    reference = pipeline_lake.reference
    store = SnapshotStore.from_settings(api_settings(pipeline_lake.root, api_store_dir=tmp_path / "store"))
    first, stop = parse_timestamp_us(iso(FLEET_DAY)), parse_timestamp_us(iso(FLEET_DAY + timedelta(days=1)))

    def every_grain(where: str) -> list[str]:
        misses: list[str] = []
        with store.read() as (snapshot, cursor):
            source = queries.Source(cursor, snapshot, store.locations)
            for grain in (Grain.SECOND, Grain.MINUTE, Grain.HOUR, Grain.DAY):
                for scope in SCOPES:
                    rows = queries.kpi_series(source, first, stop, grain, scope, limit=100_000)
                    found = {
                        FLEET_DAY + timedelta(microseconds=row.bucket_start_us - first): {
                            name: getattr(row, name) for name in KPI_FIELDS
                        }
                        for row in rows
                    }
                    misses += _misses(
                        found, reference.buckets(grain.value, scope), f"{where}: {grain.value} of {scope}"
                    )
        return misses

    try:
        assert not store.current.from_store
        store.refresh()
        misses = every_grain("from the lake")
        assert store.wait_built(60), store.build_error
        misses += every_grain("from the store file")
    finally:
        store.close()
    assert not misses, "\n".join(misses)


def _newest_version(table: Path) -> int:
    return max(int(log.stem) for log in (table / "_delta_log").glob("*.json"))


def test_etag_follows_the_tables_versions(client: TestClient, pipeline_lake: PipelineLake) -> None:
    root = pipeline_lake.root
    gold, silver = _newest_version(root / "gold"), _newest_version(root / "silver")
    second = next(iter(pipeline_lake.reference.buckets()))
    answer = client.get(f"/kpis/{iso(second)}")
    assert answer.status_code == 200
    freshness = answer.json()["freshness"]
    assert (freshness["gold_version"], freshness["silver_version"]) == (gold, silver)
    etag = answer.headers["etag"]
    assert f"gold-{gold}" in etag and f"silver-{silver}" in etag
    again = client.get(f"/kpis/{iso(second)}", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert client.get(f"/kpis/{iso(second)}", headers={"If-None-Match": '"gold-0.silver-0"'}).status_code == 200
    series = {"start": iso(FLEET_DAY), "end": iso(second), "grain": "minute"}
    assert client.get("/kpis", params=series, headers={"If-None-Match": etag}).status_code == 304
    # A bucket without readings is a 404 whatever the ETag: there is no representation to keep.
    empty = client.get(f"/kpis/{iso(FLEET_DAY + timedelta(days=2))}", headers={"If-None-Match": etag})
    assert empty.status_code == 404


def test_missing_buckets_are_404_and_bad_input_400(client: TestClient, pipeline_lake: PipelineLake) -> None:
    reference = pipeline_lake.reference
    seconds = reference.buckets()
    # A second of the day without readings.
    quiet = next(moment for s in range(86_400) if (moment := FLEET_DAY + timedelta(seconds=s)) not in seconds)
    afternoon = FLEET_DAY + timedelta(hours=15)
    for path in [
        f"/kpis/{iso(quiet)}",
        f"/kpis/{iso(FLEET_DAY - timedelta(days=1))}?grain=day",
        f"/kpis/{iso(afternoon)}?grain=hour&device_id={METER}",  # the meter reads in the morning only
        f"/kpis/{iso(afternoon)}?grain=day&device_id=nobody",
        "/kpis/9999-12-31T23:59:59Z?grain=day",
    ]:
        answer = client.get(path)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"].startswith(PROBLEM), path
    for path in [
        "/kpis/not-a-time",
        "/kpis/2024-02-30T00:00:00Z",
        f"/kpis/{iso(afternoon)}?grain=week",
        f"/kpis/{iso(afternoon)}?device_id=",
        f"/kpis?start={iso(afternoon)}&end={iso(FLEET_DAY)}",
        "/kpis?start=2024-01-01T00:00:00Z&end=2024-07-30T12:00:00Z",
    ]:
        answer = client.get(path)
        assert answer.status_code == 400, path
        assert answer.headers["content-type"].startswith(PROBLEM) and answer.json()["status"] == 400, path
