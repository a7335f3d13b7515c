"""End to end with the real parts: `lakehouse produce` -> Kafka -> `lakehouse pipeline` (Spark + Delta) ->
`lakehouse serve` (Litestar + DuckDB) and `lakehouse sql`, checked against an independent reference."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from lake.settings import Settings
from tests.helpers import dumps, lakehouse, running_api
from tests.reference import Reference, assert_kpis_equal

pytestmark = [pytest.mark.kafka, pytest.mark.spark]

T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)


def build_messages() -> tuple[list[bytes], Reference, Counter[tuple[str, int | None]]]:
    """The mix the product must handle, with the reference of what must come out of it."""
    reference = Reference()
    messages: list[bytes] = []
    quarantine: Counter[tuple[str, int | None]] = Counter()

    # Single readings in the timestamp formats of contract section 1.
    formats = [
        ("dev-1", "2024-07-30T12:00:00Z", T0),
        ("dev-2", "2024-07-30T14:00:00.250+02:00", T0 + timedelta(milliseconds=250)),
        ("dev-3", "2024-07-30T12:00:00.5", T0 + timedelta(milliseconds=500)),
        ("dev-1", "2024-07-30 12:00:01.123456789Z", T0 + timedelta(seconds=1, microseconds=123456)),
        ("dev-4", "2024-07-30T06:30:02-05:30", T0 + timedelta(seconds=2)),
        ("dev-5", "2024-07-30T12:00:02.000001z", T0 + timedelta(seconds=2, microseconds=1)),
    ]
    for i, (device, text, moment) in enumerate(formats):
        value = 10.0 + i * 1.5
        messages.append(dumps({"device_id": device, "timestamp": text, "value": value, "fw": "2.1"}))
        reference.add(device, moment, value)

    # A batch of over 4 MiB, under the 5 MiB limit: one device, 60 seconds.
    rng = random.Random(11)
    big, size = [], 0
    for i in range(200_000):
        moment = T0 + timedelta(minutes=1, microseconds=i * 250)  # 4,000 readings a second
        reading = {"timestamp": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "value": round(rng.gauss(50, 12), 6)}
        size += len(dumps(reading)) + 1
        if size > 5 * 1024 * 1024 - 1000:
            break
        big.append(reading)
        reference.add("big-1", moment, reading["value"])
    batch = dumps({"device_id": "big-1", "site": "plant-3", "readings": big})
    assert 4 * 1024 * 1024 < len(batch) <= 5 * 1024 * 1024
    messages.append(batch)

    # A JSON array of readings, each with its own device.
    array = [{"device_id": f"arr-{i}", "timestamp": f"2024-07-30T12:00:0{i}Z", "value": -1.0 * i} for i in range(4)]
    messages.append(dumps(array))
    for item in array:
        reference.add(item["device_id"], T0 + timedelta(seconds=int(item["timestamp"][18])), item["value"])

    # An exact duplicate, sent again later: changes nothing.
    messages.append(messages[0])

    # A correction of dev-2's reading, later in the same partition (same key): the new value wins.
    messages.append(dumps({"device_id": "dev-2", "timestamp": "2024-07-30T12:00:00.25Z", "value": 99.5}))
    reference.add("dev-2", T0 + timedelta(milliseconds=250), 99.5)

    # A batch that corrects itself (the later index wins) and holds an invalid reading among valid ones.
    messages.append(dumps({"device_id": "dev-6", "readings": [
        {"timestamp": "2024-07-30T12:00:03Z", "value": 1.0},
        {"timestamp": "2024-07-30T12:00:03Z", "value": "high"},
        {"timestamp": "2024-07-30T12:00:03Z", "value": 3.0},
        {"timestamp": "2024-07-30T12:00:04Z", "value": 4.0},
    ]}))  # fmt: skip
    reference.add("dev-6", T0 + timedelta(seconds=3), 3.0)
    reference.add("dev-6", T0 + timedelta(seconds=4), 4.0)
    quarantine[("bad_value", 1)] += 1

    # Malformed messages: each lands in quarantine, none stops the stream.
    for payload, reason, index in [
        (b"this is not json", "not_json", None),
        (b'{"device_id": "dev-7", "timestamp": "2024-07-30T12:00:05Z", "value": 1', "not_json", None),
        (b"\xff\xfe\x00garbage", "not_utf8", None),
        (b"null", "bad_shape", None),
        (b'{"timestamp": "2024-07-30T12:00:05Z", "value": 5}', "missing_device_id", 0),
        (b'{"device_id": "dev-8", "timestamp": "tomorrow", "value": 5}', "bad_timestamp", 0),
    ]:
        messages.append(payload)
        quarantine[(reason, index)] += 1
    return messages, reference, quarantine


@pytest.fixture()
def api(lake_settings: Settings) -> Iterator[str]:
    with running_api(lake_settings) as base:
        yield base


def parse_sql_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_end_to_end(lake_settings: Settings, topic: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    messages, reference, expected_quarantine = build_messages()
    ndjson = tmp_path / "messages.ndjson"
    ndjson.write_bytes(b"".join(m + b"\n" for m in messages))

    sent = lakehouse(lake_settings, "produce", str(ndjson))
    assert sent.returncode == 0, sent.stderr
    assert f"sent {len(messages):,} messages" in sent.stderr

    started = time.monotonic()
    run = lakehouse(lake_settings, "pipeline", "--available-now")
    assert run.returncode == 0, run.stderr[-5000:]
    print(f"pipeline --available-now took {time.monotonic() - started:.1f} s")

    # Through `lakehouse sql`: every table is readable by DuckDB and holds what it must.
    def sql(query: str) -> list[dict[str, object]]:
        result = lakehouse(lake_settings, "sql", "--output", "json", query)
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    bronze = sql('SELECT count(*) AS n, count(DISTINCT ("partition", "offset")) AS distinct_n, sum(octet_length(value)) AS bytes FROM bronze')[0]
    assert bronze == {"n": len(messages), "distinct_n": len(messages), "bytes": sum(len(m) for m in messages)}

    silver = sql("SELECT count(*) AS n FROM silver")[0]
    assert silver["n"] == len(reference.readings)

    per_second = reference.buckets()
    gold = {parse_sql_time(row["timestamp"]): row for row in sql("SELECT * FROM gold")}
    assert set(gold) == set(per_second)
    for second, want in per_second.items():
        assert_kpis_equal(gold[second], want, f"gold {second}")

    quarantined = Counter((row["reason_code"], row["reading_index"]) for row in sql("SELECT * FROM quarantine"))
    assert quarantined == expected_quarantine
    raw = {row["reason_code"]: row["raw"] for row in sql("SELECT reason_code, raw, reason FROM quarantine")}
    assert raw["not_json"] in {"this is not json", '{"device_id": "dev-7", "timestamp": "2024-07-30T12:00:05Z", "value": 1'}
    assert json.loads(raw["bad_value"]) == {"timestamp": "2024-07-30T12:00:03Z", "value": "high"}

    # Through the HTTP API.
    base = request.getfixturevalue("api")
    for second, want in per_second.items():
        answer = httpx.get(f"{base}/kpis/{second.strftime('%Y-%m-%dT%H:%M:%SZ')}")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["timestamp"] == second.strftime("%Y-%m-%dT%H:%M:%SZ") and body["grain"] == "second"
        assert_kpis_equal(body, want, f"API {second}")

    # Other spellings of an instant land in the same bucket.
    for spelling in ["2024-07-30T14:00:00.7%2B02:00", "2024-07-30T12:00:00.999999999", "2024-07-30 12:00:00Z"]:
        body = httpx.get(f"{base}/kpis/{spelling}").json()
        assert body["timestamp"] == "2024-07-30T12:00:00Z"
        assert_kpis_equal(body, per_second[T0], spelling)

    # Coarser grains and one device, each over the deduplicated readings.
    for grain, width in [("minute", timedelta(minutes=1)), ("hour", timedelta(hours=1)), ("day", timedelta(days=1))]:
        for start, want in reference.buckets(width).items():
            body = httpx.get(f"{base}/kpis/{start.strftime('%Y-%m-%dT%H:%M:%SZ')}", params={"grain": grain}).json()
            assert_kpis_equal(body, want, f"API {grain} {start}")
    for device in ["dev-2", "big-1", "dev-6"]:
        for start, want in reference.buckets(timedelta(minutes=1), device_id=device).items():
            answer = httpx.get(f"{base}/kpis/{start.strftime('%Y-%m-%dT%H:%M:%SZ')}",
                               params={"grain": "minute", "device_id": device})  # fmt: skip
            assert answer.json()["device_id"] == device
            assert_kpis_equal(answer.json(), want, f"API {device} {start}")

    # Errors are problem details, never a 500.
    for empty in ["/kpis/2024-07-30T13:00:00Z", "/kpis/9999-12-31T23:59:59Z?grain=day", "/kpis/0001-01-01T00:00:00Z?grain=hour",
                  "/kpis/2024-07-30T12:00:00Z?device_id=nobody"]:  # fmt: skip
        missing = httpx.get(f"{base}{empty}")
        assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/problem+json")
    for bad in ["/kpis/not-a-time", "/kpis/2024-02-30T00:00:00Z", "/kpis/2024-07-30T12:00:00Z?grain=week",
                "/kpis/0001-01-01T00:00:00%2B01:00", "/kpis/2024-07-30T12:00:00Z?device_id=", "/kpis/" + "9" * 5000]:  # fmt: skip
        answer = httpx.get(f"{base}{bad}")
        assert answer.status_code == 400, bad
        assert answer.json()["status"] == 400
    assert httpx.get(f"{base}/schema/openapi.json").json()["paths"]["/kpis/{timestamp}"]
