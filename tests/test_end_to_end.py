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

from bench.processes import lakehouse, running_api
from lake.settings import Settings
from tests.reference import assert_kpis_equal
from tests.stream import Stream, dumps

pytestmark = [pytest.mark.kafka, pytest.mark.spark]

T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)


def build_stream() -> Stream:
    """The mix the product must handle, each message with what must come out of it."""
    stream = Stream()

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
        stream.single(device, moment, 10.0 + i * 1.5, timestamp=text, fw="2.1")
    first = stream.sent[0]

    # A batch of over 4 MiB, under the 5 MiB limit: one device, 60 seconds.
    rng = random.Random(11)
    big: list[tuple[datetime, float]] = []
    size = 0
    for i in range(200_000):
        moment = T0 + timedelta(minutes=1, microseconds=i * 250)  # 4,000 readings a second
        value = round(rng.gauss(50, 12), 6)
        size += len(dumps(stream.item(moment, value))) + 1
        if size > 5 * 1024 * 1024 - 1000:
            break
        big.append((moment, value))
    batch = stream.batch("big-1", big, site="plant-3")
    assert 4 * 1024 * 1024 < len(batch.payload) <= 5 * 1024 * 1024

    # A JSON array of readings, each with its own device.
    array = [(f"arr-{i}", T0 + timedelta(seconds=i), -1.0 * i) for i in range(4)]
    stream.send(
        dumps(
            [
                {"device_id": device, "timestamp": f"2024-07-30T12:00:0{at.second}Z", "value": value}
                for device, at, value in array
            ]
        ),
        array,
    )

    # An exact duplicate, sent again later: changes nothing.
    stream.repeat(first)

    # A correction of dev-2's reading, later in the same partition (same key): the new value wins.
    stream.single("dev-2", T0 + timedelta(milliseconds=250), 99.5, timestamp="2024-07-30T12:00:00.25Z")

    # A batch that corrects itself (the later index wins) and holds an invalid reading among valid ones.
    stream.send(
        dumps(
            {
                "device_id": "dev-6",
                "readings": [
                    {"timestamp": "2024-07-30T12:00:03Z", "value": 1.0},
                    {"timestamp": "2024-07-30T12:00:03Z", "value": "high"},
                    {"timestamp": "2024-07-30T12:00:03Z", "value": 3.0},
                    {"timestamp": "2024-07-30T12:00:04Z", "value": 4.0},
                ],
            }
        ),
        [
            ("dev-6", T0 + timedelta(seconds=3), 1.0),
            ("dev-6", T0 + timedelta(seconds=3), 3.0),
            ("dev-6", T0 + timedelta(seconds=4), 4.0),
        ],
        [("bad_value", 1)],
    )

    # Malformed messages: each lands in quarantine, none stops the stream.
    for payload, reason, index in [
        (b"this is not json", "not_json", None),
        (b'{"device_id": "dev-7", "timestamp": "2024-07-30T12:00:05Z", "value": 1', "not_json", None),
        (b"\xff\xfe\x00garbage", "not_utf8", None),
        (b"null", "bad_shape", None),
        (b'{"timestamp": "2024-07-30T12:00:05Z", "value": 5}', "missing_device_id", 0),
        (b'{"device_id": "dev-8", "timestamp": "tomorrow", "value": 5}', "bad_timestamp", 0),
    ]:
        stream.send(payload, quarantined=[(reason, index)])
    return stream


@pytest.fixture()
def api(lake_settings: Settings) -> Iterator[str]:
    with running_api(lake_settings) as base:
        yield base


def parse_sql_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_end_to_end(lake_settings: Settings, topic: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    stream = build_stream()
    messages, reference, expected_quarantine = stream.messages, stream.reference(), stream.quarantine()
    ndjson = stream.write(tmp_path / "messages.ndjson")

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

    bronze = sql(
        'SELECT count(*) AS n, count(DISTINCT ("partition", "offset")) AS distinct_n, sum(octet_length(value)) AS bytes FROM bronze'
    )[0]
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
    assert raw["not_json"] in {
        "this is not json",
        '{"device_id": "dev-7", "timestamp": "2024-07-30T12:00:05Z", "value": 1',
    }
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
    for grain in ["minute", "hour", "day"]:
        for start, want in reference.buckets(grain).items():
            body = httpx.get(f"{base}/kpis/{start.strftime('%Y-%m-%dT%H:%M:%SZ')}", params={"grain": grain}).json()
            assert_kpis_equal(body, want, f"API {grain} {start}")
    for device in ["dev-2", "big-1", "dev-6"]:
        for start, want in reference.buckets("minute", device_id=device).items():
            answer = httpx.get(
                f"{base}/kpis/{start.strftime('%Y-%m-%dT%H:%M:%SZ')}", params={"grain": "minute", "device_id": device}
            )
            assert answer.json()["device_id"] == device
            assert_kpis_equal(answer.json(), want, f"API {device} {start}")

    # Errors are problem details, never a 500.
    for empty in [
        "/kpis/2024-07-30T13:00:00Z",
        "/kpis/9999-12-31T23:59:59Z?grain=day",
        "/kpis/0001-01-01T00:00:00Z?grain=hour",
        "/kpis/2024-07-30T12:00:00Z?device_id=nobody",
    ]:
        missing = httpx.get(f"{base}{empty}")
        assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/problem+json")
    for bad in [
        "/kpis/not-a-time",
        "/kpis/2024-02-30T00:00:00Z",
        "/kpis/2024-07-30T12:00:00Z?grain=week",
        "/kpis/0001-01-01T00:00:00%2B01:00",
        "/kpis/2024-07-30T12:00:00Z?device_id=",
        "/kpis/" + "9" * 5000,
    ]:
        answer = httpx.get(f"{base}{bad}")
        assert answer.status_code == 400, bad
        assert answer.json()["status"] == 400
    assert httpx.get(f"{base}/schema/openapi.json").json()["paths"]["/kpis/{timestamp}"]
