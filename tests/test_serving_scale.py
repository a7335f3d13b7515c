"""The serving benchmark scaled down (`lakehouse bench --part serving` at full size): a lake of a few million
readings, 8 metrics of 1,000 devices, written through the pipeline's tables, `lakehouse serve` as a real process
under a small memory bound, its resident memory sampled throughout, and answers of every metric at every grain, every
metric of a bucket and the metrics' catalog checked against tests.reference recomputing them from the lake's formula.
It asserts the bound and exact answers, not timings."""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from bench.memory import MIB, PeakSampler
from bench.processes import free_port, start_api, stop_group, wait_until_served
from bench.run import Plan
from bench.serving_lake import START, LakeShape, build_lake, cached_folder, present, readings
from tests.conftest import HOME
from tests.reference import EPOCH, GRAINS, Reference, assert_kpis_equal, kpis
from tests.serve_lake import api_settings, iso

pytestmark = pytest.mark.spark

# 1,000 devices measuring 8 metrics at 1 Hz, less the formula's gaps. The history shrinks to keep the readings of
# the bench's smoke run (2.8 million slots): 345 seconds, from three minutes before a midnight, so that minutes, hours
# and days each have buckets on both sides of a boundary. The lake is kept under the home folder; the bench's smoke
# run (tests/test_bench.py) builds the same one when its plan has as many devices.
DEVICES = 1000
METRICS = 8
READINGS = Plan.quick().serving_readings
# DuckDB's bound in the API, and what the whole process must stay under: the bound plus room for the interpreter and
# its libraries (DuckDB, Litestar, pyarrow). It peaked at 282-284 MiB here with 16 devices and one metric.
MEMORY_LIMIT = "256MB"
RSS_BOUND = 512 * MIB


@pytest.fixture(scope="module")
def scale_lake(spark) -> tuple[Path, LakeShape]:  # type: ignore[no-untyped-def]
    """The lake, read and never written by the test (the API's store goes to the test's own folder)."""
    folder = cached_folder(HOME, LakeShape.of(READINGS, DEVICES, METRICS))
    return folder, build_lake(folder, READINGS, DEVICES, spark, on_day=lambda done, days: None, metrics=METRICS)


def _expected(
    shape: LakeShape, start: datetime, grain: str, device_id: str | None, metric: str
) -> dict[str, object] | None:
    """The bucket's KPIs of one metric recomputed from the formula's readings (None when it has none)."""
    values, devices = [], set()
    for device, _, value, _ in readings(shape, start, start + GRAINS[grain], device_id, metric):
        values.append(value)
        devices.add(device)
    return kpis(values, devices) if values else None


def test_serving_a_few_million_readings_within_the_bound_and_exactly(scale_lake, tmp_path: Path) -> None:
    folder, shape = scale_lake
    assert (shape.devices, shape.metrics) == (DEVICES, METRICS)
    settings = api_settings(folder)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = {"LAKEHOUSE_API_MEMORY_LIMIT": MEMORY_LIMIT, "LAKEHOUSE_API_STORE_DIR": str(tmp_path / "store")}
    log = tmp_path / "api.log"
    server = start_api(settings, port, log, extra)
    rng = random.Random(13)
    try:
        with PeakSampler(server.pid, interval_s=0.1, rss_only=True) as memory:
            assert wait_until_served(base, 120, alive=lambda: server.poll() is None), log.read_text()[-3000:]
            with httpx.Client(base_url=base, timeout=60) as client:
                # At once, while the API may still be building its store from the lake, then from the store.
                _ask_every_grain(client, shape, rng)
                _wait_for_store(client)
                _ask_every_grain(client, shape, rng)
                _check_catalog(client, shape)
            assert server.poll() is None, log.read_text()[-3000:]
    finally:
        stop_group(server)
    print(memory.describe())
    assert memory.samples > 0
    assert memory.tree_rss <= RSS_BOUND, (
        f"the API's peak RSS was {memory.tree_rss / MIB:,.0f} MiB, over the {RSS_BOUND / MIB:,.0f} MiB bound "
        f"(LAKEHOUSE_API_MEMORY_LIMIT={MEMORY_LIMIT}) on {shape.slots:,} device-metric-seconds"
    )


def _wait_for_store(client: httpx.Client, timeout_s: float = 300) -> None:
    """Until /health says the API answers from its own store (served_from), when it says where it answers from."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snapshot = client.get("/health").json().get("snapshot") or {}
        if snapshot.get("served_from", "store") == "store":
            return
        time.sleep(0.5)
    raise AssertionError(f"the API still answered from the lake after {timeout_s:.0f} s")


def _ask_every_grain(client: httpx.Client, shape: LakeShape, rng: random.Random) -> None:
    """Buckets of every grain, of the fleet and of a device, each of a metric drawn at random (or of `value`, named
    by no parameter), every metric of a bucket, and series, each compared with the reference."""
    for grain in ("second", "minute", "hour", "day"):
        for device_id in (None, shape.device_id(rng.randrange(DEVICES))):
            for _ in range(2 if grain == "day" else 6):
                instant = START + timedelta(seconds=rng.randrange(shape.seconds), microseconds=1)
                metric = rng.choice(shape.metric_names)
                params = {"grain": grain} | ({"device_id": device_id} if device_id else {})
                if metric != "value" or rng.random() < 0.5:
                    params["metric"] = metric
                answer = client.get(f"/kpis/{iso(instant)}", params=params)
                bucket = _bucket(instant, grain)
                want = _expected(shape, bucket, grain, device_id, metric)
                where = f"{metric} by {grain} {iso(bucket)} of {device_id or 'the fleet'}"
                if want is None:
                    assert answer.status_code == 404, f"{where}: {answer.status_code} {answer.text}"
                else:
                    assert answer.status_code == 200, f"{where}: {answer.status_code} {answer.text}"
                    assert (answer.json()["timestamp"], answer.json()["metric"]) == (iso(bucket), metric)
                    assert_kpis_equal(answer.json(), want, where)
            # Every metric of one bucket in one answer.
            instant = START + timedelta(seconds=rng.randrange(shape.seconds))
            params = {"grain": grain} | ({"device_id": device_id} if device_id else {})
            answer = client.get(f"/kpis/{iso(instant)}/metrics", params=params)
            bucket = _bucket(instant, grain)
            wanted = {m: _expected(shape, bucket, grain, device_id, m) for m in sorted(shape.metric_names)}
            wanted = {m: kpis for m, kpis in wanted.items() if kpis is not None}
            where = f"every metric by {grain} {iso(bucket)} of {device_id or 'the fleet'}"
            assert answer.status_code == (200 if wanted else 404), f"{where}: {answer.text}"
            got = answer.json()["metrics"] if wanted else []
            assert [item["metric"] for item in got] == list(wanted), where
            for item, want in zip(got, wanted.values(), strict=True):
                assert_kpis_equal(item, want, f"{where}: {item['metric']}")
    # A device-minute of a metric the formula leaves out entirely is no answer, not zeros; a metric the lake has
    # not is a 404 that names those it has.
    device, minute, metric = next(
        (device, START + timedelta(minutes=minute), metric)
        for minute in range(shape.seconds // 60)
        for device in range(DEVICES)
        for metric in shape.metric_names[1:]
        if _expected(shape, START + timedelta(minutes=minute), "minute", shape.device_id(device), metric) is None
    )
    missing = client.get(
        f"/kpis/{iso(minute)}", params={"grain": "minute", "device_id": shape.device_id(device), "metric": metric}
    )
    assert missing.status_code == 404 and missing.json()["title"] == "No readings", missing.text
    unknown = client.get(f"/kpis/{iso(START)}", params={"metric": "rainfall_mm"})
    assert unknown.status_code == 404 and unknown.json()["known_metrics"] == sorted(shape.metric_names)

    # Series of a metric: the whole lake of one device and of the fleet by minute, five minutes of a device by
    # second.
    for grain, device_id, span in (
        ("minute", shape.device_id(3), timedelta(seconds=shape.seconds)),
        ("minute", None, timedelta(seconds=shape.seconds)),
        ("second", shape.device_id(5), timedelta(minutes=5)),
    ):
        _check_series(client, shape, grain, device_id, rng.choice(shape.metric_names), START, START + span)
    # Every hour and day of the fleet, of one metric.
    for grain in ("hour", "day"):
        metric = rng.choice(shape.metric_names)
        params = {"start": iso(START), "end": iso(shape.end), "grain": grain, "metric": metric, "limit": 100}
        answer = client.get("/kpis", params=params)
        assert answer.status_code == 200, answer.text
        items = answer.json()["items"]
        assert [item["timestamp"] for item in items] == [iso(_bucket(START, grain)), iso(_bucket(shape.end, grain))]
        for item in items:
            want = _expected(shape, datetime.fromisoformat(item["timestamp"]), grain, None, metric)
            assert want is not None
            assert_kpis_equal(item, want, f"{metric} by {grain} {item['timestamp']} in the series")


def _bucket(instant: datetime, grain: str) -> datetime:
    width = GRAINS[grain]
    return EPOCH + (instant - EPOCH) // width * width


def _check_series(
    client: httpx.Client,
    shape: LakeShape,
    grain: str,
    device_id: str | None,
    metric: str,
    start: datetime,
    end: datetime,
) -> None:
    params = {"start": iso(start), "end": iso(end), "grain": grain, "metric": metric, "limit": 10_000}
    if device_id:
        params["device_id"] = device_id
    answer = client.get("/kpis", params=params)
    assert answer.status_code == 200, answer.text
    # Whole buckets: the range's first and last bucket reach past its ends.
    whole = readings(shape, _bucket(start, grain), _bucket(end, grain) + GRAINS[grain], device_id, metric)
    expected = {
        bucket: kpis for bucket, kpis in Reference.of(whole).buckets(grain, device_id, metric).items() if bucket < end
    }
    items = answer.json()["items"]
    where = f"{metric} by {grain} of {device_id or 'the fleet'} from {iso(start)}"
    assert answer.json()["metric"] == metric, where
    assert [item["timestamp"] for item in items] == [iso(bucket) for bucket in expected], where
    for item, want in zip(items, expected.values(), strict=True):
        assert_kpis_equal(item, want, f"{where}, bucket {item['timestamp']}")


def _check_catalog(client: httpx.Client, shape: LakeShape) -> None:
    """GET /catalog/metrics against the formula: per metric, the devices that measure it and its readings."""
    items = client.get("/catalog/metrics").json()["items"]
    assert [item["metric"] for item in items] == sorted(shape.metric_names)
    for item in items:
        number = shape.metric_names.index(item["metric"])
        count, devices = 0, set()
        for second in range(shape.seconds):
            for device in range(shape.devices):
                if present(device, second, number):
                    count += 1
                    devices.add(device)
        assert (item["reading_count"], item["device_count"]) == (count, len(devices)), item
    assert len({item["device_count"] for item in items}) > 1  # not every device measures every metric
