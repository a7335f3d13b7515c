"""The HTTP API over a real Delta lake of several metrics: KPIs of each metric (`value` when none is named), every
metric of a bucket, the metrics' catalog, series, devices, freshness, ETags, lag, Prometheus metrics and hardening,
each answer checked against KPIs computed here in Python; and a lake written before metrics, upgraded at the API's
start, answering as before. The lakes here are written by tests.serve_lake, in the shapes each test needs;
tests/test_pipeline_lake.py asks the same of a lake the pipeline wrote from Kafka."""

from __future__ import annotations

import bisect
import json
import random
import threading
import time
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import httpx
import pytest
from litestar.testing import TestClient

from lake import deltalog, upgrade
from lake.kafka import Watermarks, lag
from lake.tables import METRIC_NAME, LakePaths, Table
from lake.timestamps import Grain, parse_timestamp_us
from serve import queries
from serve.app import create_app
from serve.snapshot import SnapshotStore
from tests.reference import EPOCH, Reference, assert_kpis_equal
from tests.reference import GRAINS as GRAIN_WIDTHS
from tests.serve_lake import (
    DEVICES,
    METRICS,
    START,
    LakeWriter,
    Reading,
    api_settings,
    iso,
    make_readings,
    serving,
)

pytestmark = pytest.mark.spark
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory) -> tuple[Path, list[Reading], LakeWriter]:  # type: ignore[no-untyped-def]
    """A lake whose silver holds the readings of three metrics in two commits, and whose gold holds their KPIs per
    metric and second."""
    root = tmp_path_factory.mktemp("served") / "lake"
    readings = make_readings()
    writer = LakeWriter(spark, LakePaths.from_settings(api_settings(root)))
    half = len(readings) // 2
    writer.append(readings[:half], readings[:half])
    writer.append(readings[half:], readings)
    writer.write_checkpoint(0, {0: 90, 1: 40})
    writer.write_checkpoint(1, {0: 120, 1: 41})
    return root, readings, writer


@pytest.fixture()
def client(lake) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(create_app(api_settings(lake[0]))) as test_client:
        yield test_client


def _history(spark, location: str) -> tuple[int, datetime]:  # type: ignore[no-untyped-def]
    """The newest version and its commit time, as Delta itself reports them."""
    row = spark.sql(f"DESCRIBE HISTORY delta.`{location}` LIMIT 1").first()
    return row["version"], row["timestamp"].replace(tzinfo=UTC)


def _all_pages(client: TestClient, params: dict) -> list[dict]:
    items, url, pages = [], "/kpis", 0
    answer = client.get(url, params=params)
    while True:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["metric"] == params.get("metric", "value")
        items += body["items"]
        pages += 1
        if body["next"] is None:
            return items
        assert len(body["items"]) == params["limit"]
        answer = client.get(body["next"])


@pytest.mark.parametrize("grain", ["second", "minute", "hour", "day"])
@pytest.mark.parametrize(
    ("device_id", "metric"), [(None, None), ("pump-1", None), (None, "pressure_bar"), ("meter-3", "temperature_c")]
)
def test_series_pages_equal_python_kpis(  # type: ignore[no-untyped-def]
    client: TestClient, lake, grain: str, device_id: str | None, metric: str | None
) -> None:
    """Every page of a series, of the fleet or of one device, of `value` when no metric is named or of the metric
    named (each `next` link keeps it), equals the reference's buckets of that metric."""
    readings = lake[1]
    expected = Reference.of(readings).buckets(grain, device_id, metric or "value")
    params: dict = {"start": "2024-07-30T11:59:59.5Z", "end": "2024-08-01T00:00:00Z", "grain": grain, "limit": 37}
    if grain == "second":
        params["end"] = "2024-07-31T00:00:01Z"  # under the range limit of a million seconds
    if device_id:
        params["device_id"] = device_id
    if metric:
        params["metric"] = metric
    items = _all_pages(client, params)
    end = datetime.fromisoformat(params["end"])
    expected = {k: v for k, v in expected.items() if k < end}
    assert [item["timestamp"] for item in items] == [iso(start) for start in expected]
    for item, kpis in zip(items, expected.values()):
        assert_kpis_equal(item, kpis, item["timestamp"])


def test_series_range_holds_the_buckets_of_start_and_end(client: TestClient, lake) -> None:  # type: ignore[no-untyped-def]
    expected = Reference.of(lake[1]).buckets("minute")
    body = client.get(
        "/kpis", params={"start": "2024-07-30T12:00:30Z", "end": "2024-07-30T12:01:00.5Z", "grain": "minute"}
    ).json()
    assert (body["start"], body["end"]) == ("2024-07-30T12:00:00Z", "2024-07-30T12:02:00Z")
    assert [i["timestamp"] for i in body["items"]] == ["2024-07-30T12:00:00Z", "2024-07-30T12:01:00Z"]
    assert_kpis_equal(body["items"][1], expected[START + timedelta(minutes=1)], "minute 12:01")


def test_point_lookup_carries_freshness_and_etag(client: TestClient, lake, spark) -> None:  # type: ignore[no-untyped-def]
    root, readings, _ = lake
    gold_version, gold_committed = _history(spark, str(root / "gold"))
    silver_version, _ = _history(spark, str(root / "silver"))
    second = START + timedelta(seconds=42)
    answer = client.get(f"/kpis/{iso(second + timedelta(milliseconds=250))}")
    assert answer.status_code == 200
    body = answer.json()
    assert body["metric"] == "value"  # the tutorial's request: the bare `value` of the readings
    assert_kpis_equal(body, Reference.of(readings).buckets("second")[second], "point lookup")
    freshness = body["freshness"]
    assert (freshness["gold_version"], freshness["silver_version"]) == (gold_version, silver_version)
    assert freshness["newest_event"] == iso(max(Reference.of(readings).buckets("second")))
    committed = datetime.fromisoformat(freshness["last_gold_commit"])
    assert abs(committed - gold_committed) < timedelta(seconds=1)
    etag = answer.headers["etag"]
    assert str(gold_version) in etag and str(silver_version) in etag
    again = client.get(f"/kpis/{iso(second)}", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert client.get(f"/kpis/{iso(second)}", headers={"If-None-Match": '"gold-0.silver-0"'}).status_code == 200
    series = client.get("/kpis", params={"start": iso(START), "end": iso(second)}, headers={"If-None-Match": etag})
    assert series.status_code == 304
    # A missing bucket is a 404 even when the ETag matches: there is no representation to keep.
    assert client.get("/kpis/2024-07-30T15:00:00Z", headers={"If-None-Match": etag}).status_code == 404


def test_devices_equal_python_summary(client: TestClient, lake) -> None:  # type: ignore[no-untyped-def]
    readings = lake[1]
    pages, answer = [], client.get("/devices", params={"limit": 2})
    while True:
        assert answer.status_code == 200
        pages.append(answer.json())
        if pages[-1]["next"] is None:
            break
        answer = client.get(pages[-1]["next"])
    items = [item for page in pages for item in page["items"]]
    assert [i["device_id"] for i in items] == sorted(DEVICES) and len(pages) == 2
    for item in items:
        own = [r.timestamp for r in readings if r.device_id == item["device_id"]]
        assert item["reading_count"] == len(own)
        assert datetime.fromisoformat(item["first_reading"]) == min(own)
        assert datetime.fromisoformat(item["last_reading"]) == max(own)
        assert item["metrics"] == sorted({r.metric for r in readings if r.device_id == item["device_id"]})
    assert items[0]["device_id"] == "meter-3" and "pressure_bar" not in items[0]["metrics"]

    # Only the devices that sent a metric, with that metric's reading times and count; its pages keep the metric.
    first = client.get("/devices", params={"metric": "pressure_bar", "limit": 1}).json()
    second = client.get(first["next"]).json()
    assert "metric=pressure_bar" in first["next"] and second["next"] is None
    for item in first["items"] + second["items"]:
        own = [r.timestamp for r in readings if r.device_id == item["device_id"] and r.metric == "pressure_bar"]
        assert (item["reading_count"], item["first_reading"], item["last_reading"]) == (
            len(own),
            _utc_text(min(own)),
            _utc_text(max(own)),
        )
    assert [i["device_id"] for i in first["items"] + second["items"]] == ["pump-1", "pump-2"]


def _bucket(instant: datetime, grain: str) -> datetime:
    width = GRAIN_WIDTHS[grain]
    return EPOCH + (instant - EPOCH) // width * width


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def test_a_metric_is_named_in_the_request_and_the_answer(client: TestClient, lake) -> None:  # type: ignore[no-untyped-def]
    """The same bucket answers each metric's own KPIs, of the fleet and of one device, at every grain."""
    reference = Reference.of(lake[1])
    instant = START + timedelta(seconds=42, milliseconds=250)
    for metric in METRICS:
        for grain in ("second", "minute", "hour", "day"):
            for device_id in (None, "pump-2"):
                params = {"metric": metric, "grain": grain} | ({"device_id": device_id} if device_id else {})
                answer = client.get(f"/kpis/{iso(instant)}", params=params)
                expected = reference.buckets(grain, device_id, metric).get(_bucket(instant, grain))
                if expected is None:  # no reading of the metric in that second
                    assert answer.status_code == 404 and answer.json()["title"] == "No readings", answer.text
                    continue
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert (body["metric"], body["grain"], body.get("device_id")) == (metric, grain, device_id)
                assert body["timestamp"] == iso(_bucket(instant, grain))
                assert_kpis_equal(body, expected, f"{metric} {params}")
    # Values of different metrics are never combined: the minute's readings of each add up to the minute's total.
    minute = {m: client.get(f"/kpis/{iso(START)}", params={"metric": m, "grain": "minute"}).json() for m in METRICS}
    in_minute = [r for r in lake[1] if START <= r.timestamp < START + timedelta(minutes=1)]
    assert sum(body["reading_count"] for body in minute.values()) == len(in_minute)
    assert minute["pressure_bar"]["max_value"] <= 4.0 < minute["value"]["max_value"]


def test_an_unknown_metric_is_404_naming_the_known_ones(client: TestClient, lake) -> None:  # type: ignore[no-untyped-def]
    known = sorted(METRICS)
    series = {"start": iso(START), "end": iso(START + timedelta(minutes=5)), "metric": "flow"}
    for path, params in (
        (f"/kpis/{iso(START)}", {"metric": "flow"}),
        (f"/kpis/{iso(START)}", {"metric": "Value", "grain": "minute", "device_id": "pump-1"}),  # case matters
        ("/kpis", series),
        ("/kpis", series | {"final": "true"}),
        ("/devices", {"metric": "flow"}),
    ):
        answer = client.get(path, params=params)
        assert answer.status_code == 404, (path, params, answer.text)
        assert answer.headers["content-type"].startswith(PROBLEM)
        problem = answer.json()
        assert problem["title"] == "Unknown metric" and problem["known_metrics"] == known
        assert repr(params["metric"]) in problem["detail"]
        assert all(name in problem["detail"] for name in known) and "/catalog/metrics" in problem["detail"]
    # A metric the lake knows, in a bucket without readings of it, is the bucket's 404, not the metric's.
    empty = client.get(f"/kpis/{iso(START + timedelta(hours=3))}", params={"metric": "pressure_bar"})
    assert empty.status_code == 404 and empty.json()["title"] == "No readings"
    assert "known_metrics" not in empty.json() and "pressure_bar" in empty.json()["detail"]
    # So is a range without readings: an empty page, not a 404.
    quiet = client.get(
        "/kpis", params={"start": "2024-07-29T00:00:00Z", "end": "2024-07-29T01:00:00Z", "metric": "pressure_bar"}
    )
    assert quiet.status_code == 200 and quiet.json()["items"] == [] and quiet.json()["metric"] == "pressure_bar"


def test_every_metric_of_a_bucket_in_one_answer(client: TestClient, lake) -> None:  # type: ignore[no-untyped-def]
    """GET /kpis/{timestamp}/metrics: each metric with readings in the bucket, by name, each as GET /kpis/{timestamp}
    answers it for that metric, all equal to the reference."""
    reference = Reference.of(lake[1])
    for grain in ("second", "minute", "hour", "day"):
        for device_id in (None, "meter-3", "pump-1"):
            # A bucket where the device has readings: the middle one of its `value` buckets.
            buckets = list(reference.buckets(grain, device_id))
            instant = buckets[len(buckets) // 2] + timedelta(milliseconds=250)
            params = {"grain": grain} | ({"device_id": device_id} if device_id else {})
            answer = client.get(f"/kpis/{iso(instant)}/metrics", params=params)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            bucket = _bucket(instant, grain)
            expected = {
                metric: found[bucket]
                for metric in sorted(METRICS)
                if bucket in (found := reference.buckets(grain, device_id, metric))
            }
            assert (body["timestamp"], body["grain"], body.get("device_id")) == (iso(bucket), grain, device_id)
            assert [item["metric"] for item in body["metrics"]] == list(expected), params
            if device_id == "meter-3":
                assert "pressure_bar" not in expected  # it sends none
            for item, kpis in zip(body["metrics"], expected.values(), strict=True):
                assert_kpis_equal(item, kpis, f"{item['metric']} in {params}")
                one = client.get(f"/kpis/{iso(instant)}", params=params | {"metric": item["metric"]}).json()
                assert item == {name: one[name] for name in item}
    assert body["freshness"]["gold_version"] >= 1
    empty = client.get(f"/kpis/{iso(START + timedelta(hours=3))}/metrics")
    assert empty.status_code == 404 and empty.headers["content-type"].startswith(PROBLEM)
    assert client.get("/kpis/yesterday/metrics").status_code == 400


def test_catalog_lists_each_metric_with_its_devices_and_readings(client: TestClient, lake) -> None:  # type: ignore[no-untyped-def]
    readings = lake[1]
    answer = client.get("/catalog/metrics")
    assert answer.status_code == 200 and "etag" in answer.headers
    items = answer.json()["items"]
    assert [item["metric"] for item in items] == sorted(METRICS)
    for item in items:
        own = [r for r in readings if r.metric == item["metric"]]
        assert item["device_count"] == len({r.device_id for r in own})
        assert item["reading_count"] == len(own)
        assert item["first_reading"] == _utc_text(min(r.timestamp for r in own))
        assert item["last_reading"] == _utc_text(max(r.timestamp for r in own))
    assert {item["metric"]: item["device_count"] for item in items}["pressure_bar"] == 2
    assert answer.json()["freshness"]["served_from"] in ("store", "lake")


@pytest.mark.parametrize(
    ("path", "detail_part"),
    [
        ("/kpis?start=2024-07-30T12:00:10Z&end=2024-07-30T12:00:00Z", "is after end"),
        ("/kpis?start=2024-01-01T00:00:00Z&end=2024-07-30T12:00:00Z", "use a coarser grain"),
        ("/kpis?start=0001-01-01T00:00:00Z&end=9999-12-31T23:59:59Z&grain=hour", "narrow it"),
        ("/kpis?start=yesterday&end=2024-07-30T12:00:00Z", "start"),
        ("/kpis?start=2024-07-30T12:00:00Z&end=2024-02-30T00:00:00Z", "end"),
        ("/kpis?start=2024-07-30T12:00:00Z&end=2024-07-30T12:01:00Z&limit=0", "limit"),
        ("/kpis?start=2024-07-30T12:00:00Z&end=2024-07-30T12:01:00Z&limit=10001", "limit"),
        ("/kpis?start=2024-07-30T12:00:00Z&end=2024-07-30T12:01:00Z&limit=ten", "limit"),
        ("/kpis?start=2024-07-30T12:00:00Z&end=2024-07-30T12:01:00Z&grain=week", "grain"),
        ("/kpis?start=2024-07-30T12:00:00Z&end=2024-07-30T12:01:00Z&device_id=", "device_id"),
        ("/kpis?end=2024-07-30T12:01:00Z", "start"),
        ("/kpis/" + "9" * 5000, "timestamp"),
        ("/kpis/2024-07-30T12:00:00Z?grain=week", "grain"),
        ("/devices?limit=-1", "limit"),
        ("/devices?after=", "after"),
        ("/kpis/2024-07-30T12:00:00Z?metric=", "metric"),
        ("/kpis/2024-07-30T12:00:00Z?metric=1st", "metric"),
        ("/kpis/2024-07-30T12:00:00Z?metric=temp%20c", "metric"),
        ("/kpis/2024-07-30T12:00:00Z?metric=" + "m" * 65, "metric"),
        ("/kpis?start=2024-07-30T12:00:00Z&end=2024-07-30T12:01:00Z&metric=a%7Cb", "metric"),
        ("/kpis?start=2024-07-30T12:00:00Z&end=2024-07-30T12:01:00Z&metric=%27%3B--", "metric"),
        ("/devices?metric=_flow", "metric"),
        ("/kpis/2024-07-30T12:00:00Z?metric=value%0A", "metric"),
        ("/kpis/2024-07-30T12:00:00Z/metrics?grain=week", "grain"),
    ],
)
def test_bad_input_is_400_problem_details(client: TestClient, path: str, detail_part: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    problem = answer.json()
    # The parameter at fault is named, in the detail or in the per-parameter `errors`.
    assert problem["status"] == 400 and detail_part in json.dumps(problem)
    assert len(problem["detail"]) < 500  # a long bad input is not echoed whole


def test_oversized_request_head_is_refused(client: TestClient) -> None:
    answer = client.get("/health", headers={"X-Padding": "a" * 20_000})
    assert answer.status_code == 431 and answer.headers["content-type"].startswith(PROBLEM)
    assert "over 16,384" in answer.json()["detail"]
    assert client.get("/health", headers={"X-Padding": "a" * 1000}).status_code == 200


def test_unknown_routes_and_methods_are_problem_details(client: TestClient) -> None:
    for method, path, status in [("GET", "/nothing-here", 404), ("POST", "/kpis", 405), ("DELETE", "/devices", 405)]:
        answer = client.request(method, path)
        assert answer.status_code == status and answer.headers["content-type"].startswith(PROBLEM)


def test_health_reports_checkpoint_offsets_and_commit_age(client: TestClient, lake, spark) -> None:  # type: ignore[no-untyped-def]
    _, gold_committed = _history(spark, str(lake[0] / "gold"))
    deadline = time.monotonic() + 10
    while "not asked yet" in (body := client.get("/health").json())["pipeline"]["kafka_error"]:
        assert time.monotonic() < deadline, "Kafka's offsets were never asked for"
        time.sleep(0.1)
    assert body["status"] == "ok" and body["tables"]["gold"] and body["tables"]["silver"]
    pipeline = body["pipeline"]
    assert pipeline["checkpoint_batch"] == 1
    assert [(p["partition"], p["processed_offset"]) for p in pipeline["partitions"]] == [(0, 120), (1, 41)]
    # No broker listens at the test's Kafka address: the lag is unknown, and /health says why instead of failing.
    assert pipeline["records_behind"] is None and "Kafka" in pipeline["kafka_error"]
    expected_age = (datetime.now(UTC) - gold_committed).total_seconds()
    assert abs(pipeline["seconds_since_gold_commit"] - expected_age) < 5


def test_lag_counts_records_between_processed_and_newest_offsets() -> None:
    rows = lag(
        {("t", 0): Watermarks(0, 130), ("t", 1): Watermarks(3, 41), ("t", 2): Watermarks(5, 5)},
        {("t", 0): 120, ("t", 1): 41},
    )
    assert [(r.partition, r.records_behind) for r in rows] == [(0, 10), (1, 0), (2, 5)]
    assert [r.records_behind for r in lag(None, {("t", 0): 120})] == [None]


def _sample(text: str, series: str) -> float:
    """The value of one series in Prometheus' text format (0 when absent)."""
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)


def test_metrics_expose_requests_latency_and_snapshot(client: TestClient, lake, spark) -> None:  # type: ignore[no-untyped-def]
    gold_version, _ = _history(spark, str(lake[0] / "gold"))
    # Counters live in the process, shared by every app the tests make: compare before and after.
    ok_lookups = (
        'kpi_lakehouse_requests_total{app_name="kpi_lakehouse",method="GET",path="/kpis/{timestamp}",status_code="200"}'
    )
    before = _sample(client.get("/metrics").text, ok_lookups)
    for _ in range(3):
        client.get(f"/kpis/{iso(START)}")
    text = client.get("/metrics").text
    # Requests are counted per route template, so timestamps in paths do not make a series each.
    assert _sample(text, ok_lookups) == before + 3
    assert _sample(text, 'kpi_lakehouse_snapshot_version{table="gold"}') == gold_version
    assert _sample(text, "kpi_lakehouse_snapshot_age_seconds") >= 0
    assert "kpi_lakehouse_snapshot_refresh_seconds_bucket" in text
    assert "kpi_lakehouse_request_duration_seconds_bucket" in text


GRAINS = (Grain.SECOND, Grain.MINUTE, Grain.HOUR, Grain.DAY)


def _store(root: Path | str, **overrides: object) -> SnapshotStore:
    return SnapshotStore.from_settings(api_settings(root, **overrides))


def _assert_every_grain(store: SnapshotStore, readings: list[Reading], where: str) -> None:
    """Every bucket of every metric and grain, of the fleet and of each device, as the store answers it now, against
    the reference; every metric of a bucket at once; also the devices' summary and the metrics' catalog."""
    reference = Reference.of(readings)
    first, stop = parse_timestamp_us("2024-07-30T00:00:00Z"), parse_timestamp_us("2024-08-01T00:00:00Z")
    with store.read() as (snapshot, cursor):
        source = queries.Source(cursor, snapshot, store.locations)
        for metric in (*reference.metrics(), "flow"):
            for grain in GRAINS:
                for device_id in (None, *DEVICES, "pump-9"):
                    expected = reference.buckets(grain.value, device_id, metric)
                    found = queries.kpi_series(source, first, stop, grain, device_id, limit=10_000, metric=metric)
                    label = f"{where}, {metric} by {grain.value} of {device_id or 'the fleet'}"
                    assert [row.bucket_start_us for row in found] == [
                        parse_timestamp_us(iso(start)) for start in expected
                    ], label
                    for row, kpis in zip(found, expected.values(), strict=True):
                        assert row.metric == metric, label
                        assert_kpis_equal({name: getattr(row, name) for name in kpis}, kpis, label)
                    one = next(iter(expected), None)
                    if one is not None:  # a point lookup at an instant inside the first bucket, and its metrics
                        instant_us = parse_timestamp_us(iso(one)) + 1
                        point = queries.kpis(source, instant_us, grain, device_id, metric)
                        assert point is not None and point.reading_count == expected[one]["reading_count"], label
                        every = queries.bucket_metrics(source, instant_us, grain, device_id)
                        assert [row.metric for row in every] == [
                            name
                            for name in reference.metrics()
                            if one in reference.buckets(grain.value, device_id, name)
                        ], label
        summary = {d.device_id: d for d in queries.devices(source, None, 100)}
        catalog = {m.metric: m for m in queries.metric_catalog(source)}
        assert queries.metric_names(source) == reference.metrics() and not queries.is_known(source, "flow")
    by_device: dict[str, list[datetime]] = {}
    for device_id, moment, _ in reference.readings:
        by_device.setdefault(device_id, []).append(moment)
    assert sorted(summary) == sorted(by_device), where
    for device_id, moments in by_device.items():
        got = summary[device_id]
        assert (got.reading_count, got.first_reading, got.last_reading) == (len(moments), min(moments), max(moments))
        assert got.metrics == tuple(sorted({m for d, _, m in reference.readings if d == device_id})), where
    assert sorted(catalog) == reference.metrics(), where
    for metric, got in catalog.items():
        own = [(device, moment) for device, moment, name in reference.readings if name == metric]
        assert (got.device_count, got.reading_count) == (len({device for device, _ in own}), len(own)), where
        assert (got.first_reading, got.last_reading) == (min(m for _, m in own), max(m for _, m in own)), where


def test_lake_and_store_answer_every_grain_exactly(lake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, readings, _ = lake
    store = _store(root, api_store_dir=tmp_path / "store")
    try:
        assert not store.current.from_store  # never seen: answers come from the lake while the file is built
        store.refresh()
        _assert_every_grain(store, readings, "from the lake")
        assert store.wait_built(60), store.build_error
        _assert_every_grain(store, readings, "from the store file")
        with store.read() as (snapshot, _):
            assert snapshot.from_store and snapshot.rollups_version is not None
    finally:
        store.close()


def test_new_commits_and_corrections_are_served_without_restart(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "lake"
    readings = make_readings(seed=5, seconds=20)
    writer = LakeWriter(spark, LakePaths.from_settings(api_settings(root)))
    writer.append(readings, readings)
    before = Reference.of(readings).buckets("second")[START]
    # A reader that began before the new commits, on a store of its own that the test refreshes by hand.
    store = _store(root, api_store_dir=tmp_path / "own-store")
    store.refresh()
    assert store.wait_built(60), store.build_error
    with TestClient(create_app(api_settings(root))) as client, store.read() as (old_snapshot, old_cursor):
        old_source = queries.Source(old_cursor, old_snapshot, store.locations)
        first = client.get(f"/kpis/{iso(START)}")
        assert first.status_code == 200
        etag = first.headers["etag"]
        assert client.get(f"/kpis/{iso(START + timedelta(seconds=30))}").status_code == 404
        # A late reading in a second that exists, a new second, a new device, and a correction of an old reading:
        # gold's and the rollups' rows are updated, others added.
        corrected = readings[3]
        late = [
            Reading("pump-9", START + timedelta(microseconds=5), 1000.0),
            Reading("pump-9", START + timedelta(seconds=30), 3.0),
            corrected._replace(value=corrected.value + 500.0),
            # A metric the lake has not seen before.
            Reading("pump-9", START + timedelta(seconds=30), 12.5, "flow_lpm"),
        ]
        readings += late
        writer.append(late, readings)
        # Silver, gold and the rollups commit one after the other (as the pipeline's do): wait for the rollups.
        rollups_version = first.json()["freshness"]["rollups_version"]
        deadline = time.monotonic() + 20
        while True:
            answer = client.get(f"/kpis/{iso(START)}", headers={"If-None-Match": etag})
            if answer.status_code == 200 and answer.json()["freshness"]["rollups_version"] > rollups_version:
                break
            assert time.monotonic() < deadline, "the new versions were not served"
            time.sleep(0.1)
        assert answer.headers["etag"] != etag and answer.json()["freshness"]["served_from"] == "store"
        expected = Reference.of(readings).buckets("second")
        assert_kpis_equal(answer.json(), expected[START], "updated second")
        assert_kpis_equal(
            client.get(f"/kpis/{iso(START + timedelta(seconds=30))}").json(),
            expected[START + timedelta(seconds=30)],
            "new second",
        )
        devices = {d["device_id"]: d for d in client.get("/devices").json()["items"]}
        assert devices["pump-9"]["reading_count"] == 3 and devices["pump-9"]["metrics"] == ["flow_lpm", "value"]
        flow = client.get(f"/kpis/{iso(START + timedelta(seconds=30))}", params={"metric": "flow_lpm"}).json()
        assert (flow["metric"], flow["reading_count"], flow["sum_value"]) == ("flow_lpm", 1, 12.5)
        catalog = {m["metric"]: m for m in client.get("/catalog/metrics").json()["items"]}
        assert catalog["flow_lpm"]["device_count"] == 1 and sorted(catalog) == ["flow_lpm", *sorted(METRICS)]
        assert_kpis_equal(
            client.get(f"/kpis/{iso(START)}?grain=minute").json(),
            Reference.of(readings).buckets("minute")[START],
            "updated minute",
        )

        # The reader that began earlier still sees its own version whole, while a new one sees the new version.
        report = store.refresh()
        assert report.changed and report.rows["silver"] >= len(late)
        old_row = queries.kpis(old_source, parse_timestamp_us(iso(START)))
        assert old_row is not None and old_row.reading_count == before["reading_count"]
        assert queries.kpis(old_source, parse_timestamp_us(iso(START + timedelta(seconds=30)))) is None
        with store.read() as (new_snapshot, new_cursor):
            assert new_snapshot.gold_version > old_snapshot.gold_version
            new_row = queries.kpis(
                queries.Source(new_cursor, new_snapshot, store.locations), parse_timestamp_us(iso(START))
            )
            assert new_row is not None and new_row.reading_count == expected[START]["reading_count"]
    # Caught up incrementally, the store answers every grain exactly, the devices' counts included.
    _assert_every_grain(store, readings, "after the refresh")
    store.close()


def test_no_answer_after_a_refresh_is_older_than_it(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Hot lookups of every grain run from several clients while a reading is corrected: each answer equals the
    reference of the versions it names, kept answers are among them, and no answer asked for after another was
    received names older versions than that one."""
    root = tmp_path / "lake"
    readings = make_readings(seed=7, seconds=20, stragglers=False)
    writer = LakeWriter(spark, LakePaths.from_settings(api_settings(root)))
    writer.append(readings, readings)
    target = next(r for r in readings if r.metric == "temperature_c" and r.device_id == "pump-1")
    corrected = target._replace(value=target.value + 500.0)
    asked = [(grain, device) for grain in ("second", "minute", "hour", "day") for device in (None, target.device_id)]
    paths = {
        (grain, device): f"/kpis/{iso(target.timestamp)}?metric={target.metric}&grain={grain}"
        + (f"&device_id={device}" if device else "")
        for grain, device in asked
    }
    # Which table's version an answer's KPIs follow: gold for a second of the fleet, silver for a device's second,
    # the rollups for the rest.
    table_of = {
        (grain, device): "gold" if (grain, device) == ("second", None) else "silver" if grain == "second" else "rollups"
        for grain, device in asked
    }
    answers: list[tuple[float, float, tuple[str, str | None], dict]] = []
    failures: list[str] = []
    stop = threading.Event()

    def ask(seed: int) -> None:
        order = list(paths.items())
        random.Random(seed).shuffle(order)
        with httpx.Client(base_url=base, timeout=30) as http:
            while not stop.is_set():
                for key, path in order:
                    sent = time.monotonic()
                    answer = http.get(path)
                    if answer.status_code != 200:
                        failures.append(f"{path}: {answer.status_code} {answer.text[:200]}")
                        return
                    answers.append((sent, time.monotonic(), key, answer.json()))

    with serving(api_settings(root)) as base:
        first = httpx.get(f"{base}{paths['second', None]}").json()["freshness"]
        while first["served_from"] != "store":
            time.sleep(0.1)
            first = httpx.get(f"{base}{paths['second', None]}").json()["freshness"]
        old = {table: first[f"{table}_version"] for table in ("gold", "silver", "rollups")}
        askers = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
        for asker in askers:
            asker.start()
        time.sleep(1.0)
        writer.append([corrected], [*readings, corrected])
        new = {table: deltalog.latest_version(writer.paths.table(Table(table))).version for table in old}
        deadline = time.monotonic() + 30
        while not any(a[3]["freshness"]["rollups_version"] == new["rollups"] for a in answers[-50:]):
            assert time.monotonic() < deadline and not failures, failures or "the new versions were not served"
            time.sleep(0.1)
        time.sleep(1.0)
        stop.set()
        for asker in askers:
            asker.join(timeout=30)
        metrics = httpx.get(f"{base}/metrics").text
    assert not failures, failures[:3]
    assert all(new[t] > old[t] for t in old), (old, new)

    references = {"old": Reference.of(readings), "new": Reference.of([*readings, corrected])}
    seen: dict[tuple[tuple[str, str | None], str], int] = {}
    for _, _, (grain, device), body in answers:
        version = body["freshness"][f"{table_of[grain, device]}_version"]
        state = "old" if version == old[table_of[grain, device]] else "new"
        assert version == {"old": old, "new": new}[state][table_of[grain, device]], (grain, device, version)
        bucket = references[state].buckets(grain, device, target.metric)[
            EPOCH + (target.timestamp - EPOCH) // GRAIN_WIDTHS[grain] * GRAIN_WIDTHS[grain]
        ]
        assert_kpis_equal(body, bucket, f"{grain} of {device or 'the fleet'}, {state} versions")
        seen[(grain, device), state] = seen.get(((grain, device), state), 0) + 1
    assert all(seen.get((key, state), 0) > 0 for key in paths for state in ("old", "new")), seen

    # Versions never go back: an answer asked for after another was received names versions at least as new.
    by_receipt = sorted(answers, key=lambda a: a[1])
    received = [a[1] for a in by_receipt]
    newest: list[tuple[int, int, int]] = []
    for a in by_receipt:
        versions = tuple(a[3]["freshness"][f"{t}_version"] for t in ("gold", "silver", "rollups"))
        newest.append(versions if not newest else tuple(map(max, newest[-1], versions)))  # type: ignore[arg-type]
    for sent, _, key, body in answers:
        before = bisect.bisect_left(received, sent)
        if before:
            versions = [body["freshness"][f"{t}_version"] for t in ("gold", "silver", "rollups")]
            assert all(v >= w for v, w in zip(versions, newest[before - 1])), (key, versions, newest[before - 1])
    # Most answers came from memory: the clients asked the same buckets again and again.
    kept = _sample(metrics, 'kpi_lakehouse_answers_total{by="kept"}')
    queried = _sample(metrics, 'kpi_lakehouse_answers_total{by="query"}')
    assert kept > queried > 0, (kept, queried)


def test_a_store_file_is_reopened_or_rebuilt(lake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, readings, _ = lake
    store_dir = tmp_path / "store"
    store = _store(root, api_store_dir=store_dir)
    store.refresh()
    assert store.wait_built(60), store.build_error
    built = store.current
    store.close()

    # Restarted on its own file: it serves at once, at the versions the file holds, and nothing changed since.
    reopened = _store(root, api_store_dir=store_dir)
    try:
        assert reopened.current.from_store and reopened.current == built and reopened.slot == 0
        assert not reopened.refresh().changed
        _assert_every_grain(reopened, readings, "reopened")
    finally:
        reopened.close()

    # A file written by another format, for another lake, or that saw a table at a higher version than the lake
    # now has (the lake was made anew) is dropped and built again.
    for change in ("format = 0", "lake_root = '/elsewhere/lake'", "gold_version = 999"):
        with duckdb.connect(str(store_dir / "slot-0.duckdb")) as edit:
            edit.execute(f"UPDATE store_meta SET {change}")
        rebuilt = _store(root, api_store_dir=store_dir)
        try:
            assert not rebuilt.current.from_store, change
            rebuilt.refresh()
            assert rebuilt.wait_built(60), rebuilt.build_error
            assert rebuilt.current.gold_version == built.gold_version, change
            _assert_every_grain(rebuilt, readings, f"rebuilt after {change}")
        finally:
            rebuilt.close()


def test_a_restarted_service_answers_what_the_lake_gained_while_it_was_down(  # type: ignore[no-untyped-def]
    spark, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service restarted on a store file that the lake has moved past answers its first request at the lake's
    newest versions, even when the catch-up is slow; past `api_catch_up_seconds` it answers at the file's own
    versions instead, and catches up in the background."""
    root = tmp_path / "lake"
    readings = make_readings(seed=7, seconds=10)
    writer = LakeWriter(spark, LakePaths.from_settings(api_settings(root)))
    writer.append(readings, readings)
    with TestClient(create_app(api_settings(root))) as client:  # builds the store file at these versions
        deadline = time.monotonic() + 60
        while client.get(f"/kpis/{iso(START)}").json()["freshness"]["served_from"] != "store":
            assert time.monotonic() < deadline, "the store file was not built"
            time.sleep(0.1)
    built = Reference.of(readings).buckets("second")[START]

    # While the service is down, a correction of a reading in the first second.
    at = next(i for i, r in enumerate(readings) if r.timestamp.replace(microsecond=0) == START and r.metric == "value")
    changed = readings[at]
    readings[at] = changed._replace(value=changed.value + 1000.0)
    writer.append([readings[at]], readings)
    now = Reference.of(readings).buckets("second")[START]
    assert now["sum_value"] != built["sum_value"]

    refresh = SnapshotStore.refresh

    def slow_refresh(store: SnapshotStore):  # type: ignore[no-untyped-def]
        time.sleep(1.5)  # a catch-up that takes its time, as on a loaded machine
        return refresh(store)

    monkeypatch.setattr(SnapshotStore, "refresh", slow_refresh)
    # No periodic refresh in the test's time: only the start's catch-up can bring the change in.
    with TestClient(create_app(api_settings(root, api_refresh_seconds=3600))) as client:
        first = client.get(f"/kpis/{iso(START)}").json()
    assert first["freshness"]["served_from"] == "store"
    assert_kpis_equal(first, now, "first answer after a restart")

    readings[at] = changed._replace(value=changed.value + 2000.0)
    writer.append([readings[at]], readings)
    later = Reference.of(readings).buckets("second")[START]
    settings = api_settings(root, api_refresh_seconds=3600, api_catch_up_seconds=0.1)
    with TestClient(create_app(settings)) as client:
        stale = client.get(f"/kpis/{iso(START)}").json()
        assert_kpis_equal(stale, now, "answered at the file's versions during a long catch-up")
        deadline = time.monotonic() + 30
        while (answer := client.get(f"/kpis/{iso(START)}").json())["sum_value"] == stale["sum_value"]:
            assert time.monotonic() < deadline, "the background catch-up never came"
            time.sleep(0.1)
        assert_kpis_equal(answer, later, "after the background catch-up")


def test_each_store_in_a_process_claims_its_own_slot(lake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first, second = _store(lake[0], api_store_dir=tmp_path), _store(lake[0], api_store_dir=tmp_path)
    try:
        assert (first.slot, second.slot) == (0, 1) and first.file != second.file
    finally:
        first.close()
        second.close()
    again = _store(lake[0], api_store_dir=tmp_path)
    assert again.slot == 0  # a closed store frees its slot
    again.close()


def test_service_duckdb_cannot_reach_outside_the_lake(lake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "secret.csv"
    outside.write_text("a\n1\n")
    store = _store(lake[0], api_store_dir=tmp_path / "store")
    try:
        store.refresh()
        assert store.wait_built(60)
        with store.read() as (snapshot, cursor):
            assert snapshot.ready
            with pytest.raises(duckdb.PermissionException):
                cursor.execute(f"SELECT * FROM read_csv('{outside}')")
            with pytest.raises(duckdb.Error):
                cursor.execute("SET enable_external_access = true")
        with store.read() as (_, cursor):  # the lake itself is readable: a device's seconds come from silver
            assert cursor.execute(f"SELECT count(*) FROM read_parquet('{lake[0]}/gold/*.parquet')").fetchone()[0] > 0
    finally:
        store.close()


def test_rate_limit_and_cors_follow_settings(lake) -> None:  # type: ignore[no-untyped-def]
    with TestClient(create_app(api_settings(lake[0], api_rate_limit=5))) as client:
        statuses = [client.get(f"/kpis/{iso(START)}").status_code for _ in range(7)]
        assert statuses[:5] == [200] * 5 and statuses[5:] == [429, 429]
        limited = client.get(f"/kpis/{iso(START)}")
        assert limited.headers["content-type"].startswith(PROBLEM)
        assert client.get("/health").status_code == 200  # probes are not limited
        assert (
            "access-control-allow-origin" not in client.get("/health", headers={"Origin": "https://x.example"}).headers
        )
    with TestClient(create_app(api_settings(lake[0], api_cors_origins="https://dash.example"))) as client:
        allowed = client.get("/health", headers={"Origin": "https://dash.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://dash.example"


def test_file_uri_lake_root_is_served(lake) -> None:  # type: ignore[no-untyped-def]
    with TestClient(create_app(api_settings(f"file://{lake[0]}"))) as client:
        answer = client.get(f"/kpis/{iso(START)}")
        assert answer.status_code == 200
        assert_kpis_equal(answer.json(), Reference.of(lake[1]).buckets("second")[START], "file:// lake")


def test_object_store_lake_without_credentials_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(BaseException) as raised, TestClient(create_app(api_settings("s3a://bucket/lake"))):
        pass
    told = "".join(traceback.format_exception(raised.value))
    assert "no AWS credentials for the s3a:// lake: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in told


def test_openapi_describes_every_route(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "ok"}
    paths = client.get("/schema/openapi.json").json()["paths"]
    routes = {"/kpis/{timestamp}", "/kpis/{timestamp}/metrics", "/kpis", "/catalog/metrics", "/devices", "/health"}
    assert routes | {"/livez"} <= set(paths)
    assert httpx.codes.NOT_MODIFIED.value == 304 and "304" in paths["/kpis"]["get"]["responses"]
    # The metric a KPI request names: its default, the name rule, and the 404 of a metric the lake does not know.
    for route in ("/kpis/{timestamp}", "/kpis"):
        metric = next(p for p in paths[route]["get"]["parameters"] if p["name"] == "metric")
        assert metric["required"] is False and metric["schema"]["default"] == "value"
        assert metric["schema"]["pattern"] == f"^{METRIC_NAME.pattern}$" and metric["schema"]["maxLength"] == 64
        assert "known_metrics" in paths[route]["get"]["responses"]["404"]["description"]


def test_a_lake_written_before_metrics_is_upgraded_at_start_and_answers_as_before(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The tutorial's lake, written by a release before metrics: the API's start upgrades it in place, and every
    answer is what it was, now naming metric `value`, the one metric the catalog lists."""
    root = tmp_path / "lake"
    readings = make_readings(seed=13, seconds=20, metrics=("value",))
    paths = LakePaths.from_settings(api_settings(root))
    writer = LakeWriter(spark, paths, before_metrics=True)
    half = len(readings) // 2
    writer.append(readings[:half], readings[:half])
    writer.append(readings[half:], readings)
    assert upgrade.needs_upgrade(paths)
    reference = Reference.of(readings)
    with TestClient(create_app(api_settings(root))) as client:
        assert not upgrade.needs_upgrade(paths)
        for grain in ("second", "minute"):
            for device_id in (None, "pump-2"):
                params = {"grain": grain} | ({"device_id": device_id} if device_id else {})
                for bucket, kpis in reference.buckets(grain, device_id).items():
                    answer = client.get(f"/kpis/{iso(bucket)}", params=params)
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["metric"] == "value"
                    assert_kpis_equal(answer.json(), kpis, f"{grain} {iso(bucket)} of {device_id or 'the fleet'}")
        series = client.get("/kpis", params={"start": iso(START), "end": iso(START + timedelta(minutes=1))}).json()
        in_minute = [second for second in reference.buckets("second") if second < START + timedelta(minutes=1)]
        assert series["metric"] == "value" and [i["timestamp"] for i in series["items"]] == [iso(s) for s in in_minute]
        catalog = client.get("/catalog/metrics").json()["items"]
        assert [(m["metric"], m["reading_count"]) for m in catalog] == [("value", len(readings))]
        assert {tuple(d["metrics"]) for d in client.get("/devices").json()["items"]} == {("value",)}
        every = client.get(f"/kpis/{iso(START)}/metrics").json()["metrics"]
        assert [m["metric"] for m in every] == ["value"]
        assert client.get(f"/kpis/{iso(START)}", params={"metric": "pressure_bar"}).json()["known_metrics"] == ["value"]
