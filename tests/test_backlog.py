"""A backlog of 5 MiB messages produced before the pipeline starts: every layer lets them through, each
micro-batch is bounded by LAKEHOUSE_MAX_OFFSETS_PER_TRIGGER, and the pipeline's memory stays bounded."""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench.memory import PeakSampler
from bench.processes import lakehouse, start_lakehouse
from lake import duck
from lake.settings import MIB, Settings
from lake.tables import LakePaths
from tests.reference import assert_kpis_equal, gold_kpis, kpis

pytestmark = [pytest.mark.kafka, pytest.mark.spark]

T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)
MESSAGES = 42  # 42 x 5 MiB = 210 MiB
PER_TRIGGER = 12
DRIVER_HEAP = "1g"
READINGS_PER_SECOND = 4000  # per device


def value_of(device: int, index: int) -> float:
    return ((device * 7919 + index * 104729) % 1_000_003) / 100


def backlog(path: Path, limit: int) -> dict[datetime, tuple[list[float], set[int]]]:
    """Writes MESSAGES batches of at most `limit` bytes (one device each) to NDJSON; returns values and devices
    per second."""
    per_second: dict[datetime, tuple[list[float], set[int]]] = defaultdict(lambda: ([], set()))
    with path.open("wb") as out:
        for device in range(MESSAGES):
            head = f'{{"device_id": "bulk-{device:02d}", "readings": ['.encode()
            parts, size, index = [], len(head) + 2, 0
            while True:
                micros = index * (1_000_000 // READINGS_PER_SECOND)
                moment = T0 + timedelta(microseconds=micros)
                value = value_of(device, index)
                part = f'{{"timestamp": "{moment:%Y-%m-%dT%H:%M:%S.%f}Z", "value": {value!r}}}'.encode()
                if size + len(part) + 1 > limit:
                    break
                parts.append(part)
                size += len(part) + 1
                values, devices = per_second[moment.replace(microsecond=0)]
                values.append(value)
                devices.add(device)
                index += 1
            message = head + b",".join(parts) + b"]}"
            assert limit - 200 < len(message) <= limit
            out.write(message + b"\n")
    return per_second


def test_a_210_mib_backlog_of_5_mib_messages(lake_settings: Settings, topic: str, tmp_path: Path) -> None:
    # Java's default JIT (tiered): a backlog is what it compiles for, and the memory bound is the default's.
    settings = lake_settings.model_copy(
        update={
            "max_offsets_per_trigger": PER_TRIGGER,
            "spark_driver_memory": DRIVER_HEAP,
            "spark_driver_java_options": "",
        }
    )
    ndjson = tmp_path / "backlog.ndjson"
    per_second = backlog(ndjson, settings.max_message_bytes)
    assert ndjson.stat().st_size >= 200 * MIB
    sent = lakehouse(settings, "produce", str(ndjson))
    assert sent.returncode == 0, sent.stderr
    assert f"sent {MESSAGES} messages" in sent.stderr

    report, log = tmp_path / "batches.jsonl", tmp_path / "pipeline.log"
    started = time.monotonic()
    # Native Memory Tracking (a few % of CPU) lets the test say where the JVM's memory beyond its heap went.
    nmt = {"JDK_JAVA_OPTIONS": f"{os.environ.get('JDK_JAVA_OPTIONS', '')} -XX:NativeMemoryTracking=summary"}
    pipeline = start_lakehouse(settings, "pipeline", "--available-now", "--report", str(report), log=log, env_extra=nmt)
    with PeakSampler(pipeline.pid, native_every_s=5) as memory:
        pipeline.wait()
    seconds = time.monotonic() - started
    assert pipeline.returncode == 0, log.read_text(errors="replace")[-5000:]
    # Spark asks again for a page that Java's heap could not give (an OutOfMemoryError it catches and logs): a near
    # miss, which the next run may not survive. None is allowed.
    near_misses = log.read_text(errors="replace").count("Failed to allocate a page")
    assert near_misses == 0, f"{near_misses} heap allocations failed and were retried"
    reports = [json.loads(line) for line in report.read_text().splitlines()]
    batches = len(reports)
    readings = sum(len(values) for values, _ in per_second.values())
    print(
        f"\n{MESSAGES} messages ({ndjson.stat().st_size / MIB:.0f} MiB, {readings:,} readings) in {batches} "
        f"micro-batches, {seconds:.0f} s ({ndjson.stat().st_size / MIB / seconds:.1f} MiB/s end to end), "
        f"driver heap {DRIVER_HEAP}; {memory.describe()}"
    )

    # Each micro-batch took at most PER_TRIGGER records.
    assert max(r["records"] for r in reports) <= PER_TRIGGER, reports
    assert sum(r["records"] for r in reports) == MESSAGES and sum(r["readings"] for r in reports) == readings
    assert batches >= math.ceil(MESSAGES / PER_TRIGGER)
    # Bounded by the settings: the JVM stays near its heap plus Spark's and Java's own overhead (< 1.5 GiB
    # here), and the tree (JVM, the Python driver, two Python workers with Arrow batches of at most 32 MiB)
    # under 4 GiB, while 210 MiB of messages expand to ~8x as many bytes of parsed rows.
    assert memory.samples > 0
    assert memory.jvm_rss < 1024 * MIB + 1536 * MIB
    assert memory.tree_pss < 4096 * MIB

    lake = duck.connect(LakePaths.from_settings(settings))
    assert lake.sql("SELECT count(*), sum(octet_length(value)) FROM bronze").fetchone() == (
        MESSAGES,
        ndjson.stat().st_size - MESSAGES,
    )
    assert lake.sql("SELECT count(*) FROM silver").fetchone() == (readings,)
    assert lake.sql("SELECT count(*) FROM quarantine").fetchone() == (0,)
    gold = gold_kpis(lake)
    assert set(gold) == set(per_second)
    for second, (values, devices) in per_second.items():
        assert_kpis_equal(gold[second], kpis(values, devices), f"gold {second}")
