"""The serving benchmark scaled down (`lakehouse bench --part serving` at full size): a lake of a few million
readings written through the pipeline's tables, `lakehouse serve` as a real process under a small memory bound,
its resident memory sampled throughout, and answers at every grain checked against tests.reference recomputing
them from the lake's formula. It asserts the bound and exact answers, not timings."""

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
from bench.serving_lake import START, LakeShape, build_lake, cached_folder, readings
from tests.conftest import HOME
from tests.reference import GRAINS, Reference, assert_kpis_equal, kpis
from tests.serve_lake import api_settings, iso

pytestmark = pytest.mark.spark

# Two UTC days of 16 devices at 1 Hz, less the formula's gaps: the lake of the bench's smoke run (tests/test_bench.py),
# kept under the home folder, so that whichever of the two runs first builds it for both.
DEVICES = Plan.quick().serving_devices
READINGS = Plan.quick().serving_readings
# DuckDB's bound in the API, and what the whole process must stay under: the bound plus room for the interpreter and
# its libraries (DuckDB, Litestar, pyarrow). It peaked at 282-284 MiB here.
MEMORY_LIMIT = "256MB"
RSS_BOUND = 512 * MIB


@pytest.fixture(scope="module")
def scale_lake(spark) -> tuple[Path, LakeShape]:  # type: ignore[no-untyped-def]
    """The lake, read and never written by the test (the API's store goes to the test's own folder)."""
    folder = cached_folder(HOME, LakeShape.of(READINGS, DEVICES))
    return folder, build_lake(folder, READINGS, DEVICES, spark, on_day=lambda done, days: None)


def _expected(shape: LakeShape, start: datetime, grain: str, device_id: str | None) -> dict[str, object] | None:
    """The bucket's KPIs recomputed from the formula's readings (None when it has none)."""
    values, devices = [], set()
    for device, _, value in readings(shape, start, start + GRAINS[grain], device_id):
        values.append(value)
        devices.add(device)
    return kpis(values, devices) if values else None


def test_serving_a_few_million_readings_within_the_bound_and_exactly(scale_lake, tmp_path: Path) -> None:
    folder, shape = scale_lake
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
            assert server.poll() is None, log.read_text()[-3000:]
    finally:
        stop_group(server)
    print(memory.describe())
    assert memory.samples > 0
    assert memory.tree_rss <= RSS_BOUND, (
        f"the API's peak RSS was {memory.tree_rss / MIB:,.0f} MiB, over the {RSS_BOUND / MIB:,.0f} MiB bound "
        f"(LAKEHOUSE_API_MEMORY_LIMIT={MEMORY_LIMIT}) on {shape.slots:,} device-seconds"
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
    """Buckets of every grain, of the fleet and of a device, and series, each compared with the reference."""
    for grain in ("second", "minute", "hour", "day"):
        for device_id in (None, shape.device_id(rng.randrange(DEVICES))):
            for _ in range(2 if grain == "day" else 6):
                instant = START + timedelta(seconds=rng.randrange(shape.seconds), microseconds=1)
                params = {"grain": grain} | ({"device_id": device_id} if device_id else {})
                answer = client.get(f"/kpis/{iso(instant)}", params=params)
                bucket = _bucket(instant, grain)
                want = _expected(shape, bucket, grain, device_id)
                where = f"{grain} {iso(bucket)} of {device_id or 'the fleet'}"
                if want is None:
                    assert answer.status_code == 404, f"{where}: {answer.status_code} {answer.text}"
                else:
                    assert answer.status_code == 200, f"{where}: {answer.status_code} {answer.text}"
                    assert answer.json()["timestamp"] == iso(bucket)
                    assert_kpis_equal(answer.json(), want, where)
    # A device-minute the formula leaves out entirely is no answer, not zeros.
    device, minute = next(
        (device, START + timedelta(minutes=minute))
        for minute in range(60)
        for device in range(DEVICES)
        if _expected(shape, START + timedelta(minutes=minute), "minute", shape.device_id(device)) is None
    )
    missing = client.get(f"/kpis/{iso(minute)}", params={"grain": "minute", "device_id": shape.device_id(device)})
    assert missing.status_code == 404, missing.text

    # Series: 1,000 minutes of one device, two hours of the fleet by minute, ten minutes of a device by second.
    for grain, device_id, span in (
        ("minute", shape.device_id(3), timedelta(minutes=1000)),
        ("minute", None, timedelta(hours=2)),
        ("second", shape.device_id(5), timedelta(minutes=10)),
    ):
        start = START + timedelta(hours=rng.randrange(20))
        _check_series(client, shape, grain, device_id, start, start + span)
    # Every hour of the fleet.
    hours = client.get("/kpis", params={"start": iso(START), "end": iso(shape.end), "grain": "hour", "limit": 100})
    assert hours.status_code == 200, hours.text
    items = hours.json()["items"]
    assert len(items) == shape.seconds // 3600
    for item in rng.sample(items, 3):
        bucket = datetime.fromisoformat(item["timestamp"])
        want = _expected(shape, bucket, "hour", None)
        assert want is not None
        assert_kpis_equal(item, want, f"hour {item['timestamp']} in the hourly series")


def _bucket(instant: datetime, grain: str) -> datetime:
    width = GRAINS[grain]
    return START + (instant - START) // width * width


def _check_series(
    client: httpx.Client, shape: LakeShape, grain: str, device_id: str | None, start: datetime, end: datetime
) -> None:
    params = {"start": iso(start), "end": iso(end), "grain": grain, "limit": 10_000}
    if device_id:
        params["device_id"] = device_id
    answer = client.get("/kpis", params=params)
    assert answer.status_code == 200, answer.text
    expected = Reference.of(readings(shape, start, end, device_id)).buckets(grain, device_id)
    items = answer.json()["items"]
    where = f"{grain} series of {device_id or 'the fleet'} from {iso(start)}"
    assert [item["timestamp"] for item in items] == [iso(bucket) for bucket in expected], where
    for item, want in zip(items, expected.values(), strict=True):
        assert_kpis_equal(item, want, f"{where}, bucket {item['timestamp']}")
