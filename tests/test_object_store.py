"""A lake on S3 (issue 15), against a real S3 API server (S3Proxy) with the real broker and Spark: the pipeline writes
every table and checkpoint to s3a://, `sql`, `audit`, `replay`, `maintain`, `doctor` and the API read the same lake
through DuckDB and delta-rs, a kill -9 still leaves exact tables, and a missing credential or bucket is named."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from bench.processes import lakehouse, running_api, start_lakehouse
from lake.settings import Settings
from lake.tables import LakePaths
from tests.conftest import running_s3
from tests.reference import Reference, assert_kpis_equal, assert_rollups_equal, expected_rollups, gold_kpis, rollup_kpis
from tests.stream import Stream, dumps, few_devices

pytestmark = [pytest.mark.kafka, pytest.mark.spark]

T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)
BUCKET = "telemetry"
DAY_FIRST = "%d/%m/%Y %H:%M:%S"


@pytest.fixture(scope="module")
def s3() -> Iterator:  # type: ignore[type-arg]
    with running_s3(BUCKET) as server:
        yield server


def s3_settings(lake_settings: Settings, tmp_path: Path, root: str) -> Settings:
    return lake_settings.model_copy(
        update={"lake_root": f"s3a://{BUCKET}/{root}", "api_store_dir": tmp_path / "api-store"}
    )


def build_stream(messages: int = 150) -> Stream:
    """A few devices' singles, batches and a correction, a broken message, and a day-first timestamp that the rules
    accept only after a change (for `replay`)."""
    stream = few_devices(T0, messages)
    stream.send(b"{broken", quarantined=[("not_json", None)])
    stream.send(
        dumps({"device_id": "eu-1", "timestamp": "30/07/2024 12:00:07", "value": 7.5}),
        quarantined=[("bad_timestamp", 0)],
    )
    return stream


def assert_lake_matches(settings: Settings, reference: Reference) -> None:
    from lake.duck import connect

    lake = connect(LakePaths.from_settings(settings))
    gold, expected = gold_kpis(lake), reference.buckets()
    assert set(gold) == set(expected)
    for second, want in expected.items():
        assert_kpis_equal(gold[second], want, f"gold {second}")
    assert_rollups_equal(rollup_kpis(lake), expected_rollups(reference))
    lake.close()


def last_line(result: object) -> str:
    line = result.stderr.strip().splitlines()[-1]  # type: ignore[attr-defined]
    assert line.startswith("error: "), result.stderr[-3000:]  # type: ignore[attr-defined]
    return line


def test_every_part_works_on_an_s3a_lake_through_a_kill_9(
    s3, lake_settings: Settings, topic: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from pyarrow.fs import FileSelector

    from lake import objectstore
    from lake.duck import connect

    settings = s3_settings(lake_settings, tmp_path, "lake").model_copy(update={"max_offsets_per_trigger": 60})
    stream = build_stream()
    reference, expected_quarantine = stream.reference(), stream.quarantine()
    sent = lakehouse(settings, "produce", str(stream.write(tmp_path / "messages.ndjson")))
    assert sent.returncode == 0, sent.stderr

    # Killed right after gold's commit of the first micro-batch, before Spark's checkpoint commit; then run again.
    log = tmp_path / "pipeline.log"
    crash = {"LAKEHOUSE_TEST_CRASH_AFTER": "gold:0"}
    crashed = start_lakehouse(settings, "pipeline", "--available-now", log=log, env_extra=crash)
    assert crashed.wait(timeout=600) == -signal.SIGKILL, log.read_text()[-3000:]
    ran = lakehouse(settings, "pipeline", "--available-now")
    assert ran.returncode == 0, ran.stderr[-3000:]

    stored = objectstore.filesystem().get_file_info(FileSelector(f"{BUCKET}/lake"))
    assert sorted(info.base_name for info in stored) == [
        "_checkpoints",
        "bronze",
        "gold",
        "metrics",
        "quarantine",
        "rollups",
        "silver",
    ]
    lake = connect(LakePaths.from_settings(settings))
    total, distinct = lake.sql('SELECT count(*), count(DISTINCT (topic, "partition", "offset")) FROM bronze').fetchone()
    assert total == distinct == len(stream.messages)
    silver = lake.sql('SELECT device_id, "timestamp", value FROM silver').fetchall()
    assert {(d, t.astimezone(UTC), "value"): v for d, t, v in silver} == reference.readings
    assert Counter(lake.sql("SELECT reason_code, reading_index FROM quarantine").fetchall()) == expected_quarantine
    lake.close()
    assert_lake_matches(settings, reference)

    counted = lakehouse(settings, "sql", "--output", "csv", "SELECT count(*) AS readings FROM silver")
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout.splitlines() == ["readings", str(len(reference.readings))]

    audited = lakehouse(settings, "audit", "--json")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert json.loads(audited.stdout)["totals"]["bronze_records"] == len(stream.messages)

    doctor = lakehouse(settings, "doctor", "--json")
    findings = {f["check"]: f for f in json.loads(doctor.stdout)}
    assert findings["object store"]["status"] == "ok", findings
    assert "wrote, listed and deleted" in findings["object store write"]["detail"]
    assert "single writer" in findings["Delta log store"]["detail"]
    assert findings["checkpoint"]["status"] == "ok", findings  # read from the checkpoint on S3
    assert not [f for f in findings.values() if f["status"] == "fail"], findings

    with running_api(settings) as base:
        for second in sorted(reference.buckets())[::10]:
            answer = httpx.get(f"{base}/kpis/{second.strftime('%Y-%m-%dT%H:%M:%SZ')}", timeout=10)
            assert answer.status_code == 200, answer.text
            assert_kpis_equal(answer.json(), reference.buckets()[second], f"API {second}")
        assert httpx.get(f"{base}/kpis/2024-07-30T13:00:00Z", timeout=10).status_code == 404
        minute = httpx.get(f"{base}/kpis/2024-07-30T12:00:30Z?grain=minute", timeout=10)
        assert minute.status_code == 200
        assert minute.json()["reading_count"] == sum(
            1 for _, t, _ in reference.readings if t < T0 + timedelta(minutes=1)
        )

    stores = refresh_cost_before_replay(s3, settings, tmp_path)

    # A rule change makes the day-first reading valid: replay moves it through silver, gold and the rollups.
    new_rules = settings.model_copy(update={"extra_timestamp_formats": [DAY_FIRST]})
    replayed = lakehouse(new_rules, "replay", "--reason", "bad_timestamp")
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert "1 readings now valid" in replayed.stderr
    reference.add("eu-1", T0 + timedelta(seconds=7), 7.5)
    assert_lake_matches(settings, reference)
    refresh_cost_after_replay(s3, stores, tmp_path)

    maintained = lakehouse(settings, "maintain")
    assert maintained.returncode == 0, maintained.stderr[-3000:]
    assert_lake_matches(settings, reference)
    after = lakehouse(new_rules, "audit", "--json")
    assert after.returncode == 0, after.stdout + after.stderr


def refresh_cost_before_replay(s3, settings: Settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The API's refresh of an unchanged lake: one HEAD per served table on S3; the same lake copied to local disk
    for comparison (a few file lookups there). Returns both stores, to measure a refresh that loads a change."""
    from serve.snapshot import SnapshotStore

    on_s3 = SnapshotStore.from_settings(settings)
    on_s3.refresh()  # the file `serve` built is caught up, or built anew
    assert on_s3.wait_built(120)
    s3_requests, s3_ms = measure_refreshes(s3, on_s3)
    assert s3_requests <= 3, f"{s3_requests} S3 requests per refresh of an unchanged lake"

    local_copy(tmp_path)
    local = settings.model_copy(update={"lake_root": str(tmp_path / "copy"), "api_store_dir": tmp_path / "local-store"})
    on_disk = SnapshotStore.from_settings(local)
    on_disk.refresh()
    assert on_disk.wait_built(120)
    _, local_ms = measure_refreshes(s3, on_disk)
    print(
        f"\nAPI refresh of an unchanged lake: S3 {s3_requests:.1f} requests {s3_ms:.1f} ms; local disk {local_ms:.2f} ms"
    )
    return on_s3, on_disk


def refresh_cost_after_replay(s3, stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The refresh that loads replay's new gold, silver and rollups versions, on S3 and on a local copy."""
    on_s3, on_disk = stores
    before, started = s3.requests_served(), time.perf_counter()
    report = on_s3.refresh()
    requests, ms = s3.requests_served() - before, (time.perf_counter() - started) * 1000
    assert report.changed and report.rows.get("gold", 0) >= 1, report
    with on_s3.read() as (_, cursor):
        loaded = cursor.execute(
            'SELECT reading_count FROM gold WHERE "timestamp" = $t', {"t": T0 + timedelta(seconds=7)}
        )
        assert loaded.fetchone() is not None
    on_s3.close()
    local_copy(tmp_path)
    started = time.perf_counter()
    assert on_disk.refresh().changed
    local_ms = (time.perf_counter() - started) * 1000
    on_disk.close()
    print(
        f"API refresh that loads replay's new gold, silver and rollups versions: S3 {requests} requests {ms:.0f} ms; "
        f"local disk {local_ms:.0f} ms"
    )


def local_copy(tmp_path: Path) -> None:
    """The S3 lake copied (again) to tmp_path/copy."""
    from pyarrow.fs import LocalFileSystem, copy_files

    from lake import objectstore

    copy_files(f"{BUCKET}/lake", str(tmp_path / "copy"), objectstore.filesystem(), LocalFileSystem())


def measure_refreshes(s3, store, rounds: int = 20) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """S3 requests and milliseconds per refresh of an unchanged lake."""
    requests, started = s3.requests_served(), time.perf_counter()
    for _ in range(rounds):
        assert not store.refresh().changed
    return (s3.requests_served() - requests) / rounds, (time.perf_counter() - started) * 1000 / rounds


def test_a_missing_credential_or_bucket_is_named(s3, lake_settings: Settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = s3_settings(lake_settings, tmp_path, "lake")
    no_aws_files = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}

    missing = lakehouse(
        settings, "sql", "SELECT 1", env_extra={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", **no_aws_files}
    )
    assert missing.returncode == 1
    assert "no AWS credentials" in last_line(missing) and "AWS_ACCESS_KEY_ID" in last_line(missing)
    assert "Traceback" not in missing.stderr

    half = lakehouse(settings, "maintain", env_extra={"AWS_SECRET_ACCESS_KEY": ""})
    assert half.returncode == 1
    assert "AWS_SECRET_ACCESS_KEY is not" in last_line(half)

    refused = lakehouse(settings, "audit", env_extra={"AWS_SECRET_ACCESS_KEY": "wrong"})
    assert refused.returncode == 1
    assert "refused access to bucket 'telemetry'" in last_line(refused)

    no_bucket = settings.model_copy(update={"lake_root": "s3a://no-such-bucket/lake"})
    for command in (["pipeline", "--available-now"], ["serve"]):
        failed = lakehouse(no_bucket, *command, timeout=120)
        assert failed.returncode == 1, failed.stderr[-3000:]
        assert "bucket 'no-such-bucket' does not exist" in last_line(failed)
        assert "Traceback" not in failed.stderr
