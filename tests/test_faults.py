"""Exactly once and nothing lost under failure (contract sections 3 and 5), with the real broker and Spark:
the pipeline is killed with SIGKILL inside micro-batches and at random moments, the broker is restarted under it,
and Kafka's retention deletes offsets it had not read. A reader queries the API all along."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from bench.processes import lakehouse, running_api, start_lakehouse, stop_group
from lake.settings import Settings
from lake.tables import LakePaths, Table
from tests.reference import assert_kpis_equal, assert_rollups_equal, expected_rollups, gold_kpis, rollup_kpis
from tests.stream import Message, Stream, dumps, stamp

pytestmark = [pytest.mark.kafka, pytest.mark.spark, pytest.mark.faults]

T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)
# Kills at random moments of a running stream, each after new data arrived (beside the six at crash points).
RANDOM_KILLS = 2


def build_stream(rng: random.Random) -> Stream:
    """Over 20,000 readings: singles, batches of one metric and of several (the `metrics` form), exact duplicates,
    corrections (of a whole reading, and of one metric alone) and invalid input, shuffled."""
    stream = Stream()
    devices = [f"dev-{i:02d}" for i in range(30)]

    def moment() -> datetime:
        return T0 + timedelta(microseconds=rng.randrange(120_000_000))

    singles: list[Message] = []
    for _ in range(600):
        device, at = rng.choice(devices), moment()
        singles.append(stream.single(device, at, round(rng.uniform(0, 100), 3)))
    for number in range(80):
        device = rng.choice(devices)
        if number % 2:  # a pump's pressure, flow and temperature at each instant
            named = [
                (
                    moment(),
                    {
                        "pressure_bar": round(rng.uniform(1, 6), 3),
                        "flow_m3h": round(rng.gauss(20, 4), 3),
                        "temperature_c": round(rng.gauss(60, 8), 2),
                    },
                )
                for _ in range(100)
            ]
            pumped = stream.metrics_batch(device, named)
            device_id, at, value, metric = pumped.readings[0]  # type: ignore[misc]
            stream.send(  # one metric corrected alone: the instant's other metrics stay
                dumps({"device_id": device_id, "timestamp": stamp(at), "metric": metric, "value": value + 1.0}),
                [(device_id, at, value + 1.0, metric)],
            )
            continue
        readings = []
        for _ in range(250):
            at = moment()
            readings.append((at, round(rng.gauss(50, 10), 4)))
        stream.batch(device, readings)
    for _ in range(50):  # exact duplicates of earlier messages
        stream.repeat(rng.choice(stream.sent))
    for single in rng.sample(singles, 50):  # corrections: same device (same key, same partition), new value
        device, at, _ = single.readings[0]
        stream.single(device, at, round(rng.uniform(100, 200), 3))
    for i in range(20):
        stream.send(b"{broken json " + str(i).encode(), quarantined=[("not_json", None)])
        stream.send(
            dumps({"device_id": "dev-00", "readings": [stream.item(T0, "n/a")]}), quarantined=[("bad_value", 0)]
        )
    stream.shuffle(rng)  # the reference follows the send order
    assert len(stream.reference().readings) > 20_000
    return stream


class ApiReader(threading.Thread):
    """Queries the API until stopped; keeps every status and each bucket's reading counts in order."""

    def __init__(self, base: str, targets: list[str]) -> None:
        super().__init__(daemon=True)
        self.base, self.targets = base, targets
        self.stop_event = threading.Event()
        self.statuses: Counter[int] = Counter()
        self.counts: dict[str, list[int]] = {t: [] for t in targets}

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while not self.stop_event.is_set():
                for target in self.targets:
                    try:
                        answer = client.get(target)
                    except httpx.TransportError:
                        self.statuses[-1] += 1
                        continue
                    self.statuses[answer.status_code] += 1
                    self.counts[target].append(answer.json()["reading_count"] if answer.status_code == 200 else 0)
                time.sleep(0.5)


def commits(paths: LakePaths, table: Table) -> int:
    return len(list((Path(paths.table(table)) / "_delta_log").glob("*.json")))


def wait_for_new_commit(
    paths: LakePaths, table: Table, process: subprocess.Popen[bytes], timeout_s: float = 240
) -> None:
    before, deadline = commits(paths, table), time.monotonic() + timeout_s
    while commits(paths, table) == before:
        assert process.poll() is None, f"the pipeline exited with {process.returncode}"
        assert time.monotonic() < deadline, "the pipeline made no progress"
        time.sleep(0.2)


def test_crashes_and_broker_restart_change_nothing(broker, lake_settings: Settings, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(2024)
    settings = lake_settings.model_copy(update={"max_offsets_per_trigger": 40, "trigger_interval": "500 milliseconds"})
    paths = LakePaths.from_settings(settings)
    stream = build_stream(rng)
    messages, reference, expected_quarantine = stream.messages, stream.reference(), stream.quarantine()
    log = tmp_path / "pipeline.log"
    half = len(messages) // 2
    step = -(-(len(messages) - half) // (RANDOM_KILLS + 1))
    # Contiguous slices, sent in order: the reference was built in this order.
    chunks = [messages[:half]] + [messages[half + i * step : half + (i + 1) * step] for i in range(RANDOM_KILLS + 1)]
    assert sum(len(c) for c in chunks) == len(messages)

    def produce(chunk: list[bytes]) -> None:
        path = tmp_path / "chunk.ndjson"
        path.write_bytes(b"".join(m + b"\n" for m in chunk))
        assert lakehouse(settings, "produce", str(path)).returncode == 0

    produce(chunks[0])
    running: list[subprocess.Popen[bytes]] = []
    cleanup, reader = ExitStack(), None
    kills, rode_through = 0, False
    try:
        # Crashes inside micro-batches: right after a Delta commit, before Spark's checkpoint commit. Gold commits
        # before silver: "gold:3" cuts batch 3 between the two, "silver:*" cuts its re-run after silver's commit,
        # and the next run finds the batch's readings in silver and changes nothing; the rollups query's first
        # commit of its run, whatever its batch id.
        for crash_after in ["bronze:0", "quarantine:1", "silver:2", "gold:3", "silver:*", "rollups:*"]:
            crash = {"LAKEHOUSE_TEST_CRASH_AFTER": crash_after}
            running.append(start_lakehouse(settings, "pipeline", log=log, env_extra=crash))
            assert running[-1].wait(timeout=600) == -signal.SIGKILL, log.read_text()[-3000:]
            kills += 1

        base = cleanup.enter_context(running_api(settings))
        seconds = sorted(reference.buckets())[::15]
        targets = [f"/kpis/{s.strftime('%Y-%m-%dT%H:%M:%SZ')}" for s in seconds]
        targets += [
            "/kpis/2024-07-30T12:00:30Z?grain=minute",
            "/kpis/2024-07-30T12:01:30Z?grain=minute&device_id=dev-03",
        ]
        reader = ApiReader(base, targets)
        reader.start()

        # SIGKILL at random moments of a running stream, with new data arriving before each run.
        for chunk in chunks[1:-1]:
            produce(chunk)
            running.append(start_lakehouse(settings, "pipeline", log=log))
            wait_for_new_commit(paths, Table.BRONZE, running[-1])
            time.sleep(rng.uniform(0, 8))
            stop_group(running[-1], signal.SIGKILL)
            kills += 1

        # The broker stops and comes back while the stream runs.
        produce(chunks[-1])
        running.append(start_lakehouse(settings, "pipeline", log=log))
        wait_for_new_commit(paths, Table.BRONZE, running[-1])
        broker.stop()
        time.sleep(8)
        broker.start()
        time.sleep(15)
        # The broker went away for 8 s and came back: the stream rides through it (the Kafka client retries) or
        # stops with an error that says which query stopped and why (README, "After a crash"); never a silent exit.
        exited = running[-1].poll()
        rode_through = exited is None
        if not rode_through:
            tail = log.read_text(errors="replace")[-5000:]
            assert exited != 0 and "query stopped" in tail, f"exit {exited} without saying why:\n{tail}"
        stop_group(running[-1], signal.SIGKILL)

        # The rest at the default batch size: the batch the last kill cut runs again with the offsets its plan
        # recorded, the batches after it with the new bound.
        finished = lakehouse(lake_settings, "pipeline", "--available-now")
        assert finished.returncode == 0, finished.stderr[-3000:]
    finally:
        for process in running:
            if process.poll() is None:
                stop_group(process, signal.SIGKILL)
        if reader is not None:
            reader.stop_event.set()
            reader.join(timeout=30)
        cleanup.close()

    from lake.duck import connect

    lake = connect(paths)
    total, distinct = lake.sql('SELECT count(*), count(DISTINCT (topic, "partition", "offset")) FROM bronze').fetchone()
    assert total == distinct == len(messages)
    silver = {
        (d, t.astimezone(UTC), m): v
        for d, t, v, m in lake.sql('SELECT device_id, "timestamp", value, metric FROM silver').fetchall()
    }
    assert silver == reference.readings
    assert reference.metrics() == ["flow_m3h", "pressure_bar", "temperature_c", "value"]
    for metric in reference.metrics():
        gold = gold_kpis(lake, metric)
        expected = reference.buckets(metric=metric)
        assert set(gold) == set(expected), metric
        for second, want in expected.items():
            assert_kpis_equal(gold[second], want, f"gold {metric} {second}")
        assert_rollups_equal(rollup_kpis(lake, metric), expected_rollups(reference, metric))
    quarantine = lake.sql('SELECT reason_code, reading_index, "partition", "offset" FROM quarantine').fetchall()
    assert Counter((code, index) for code, index, _, _ in quarantine) == expected_quarantine
    assert len({(p, o, i) for _, i, p, o in quarantine}) == len(quarantine)

    assert reader.statuses[500] == 0 and not any(code >= 500 for code in reader.statuses)
    assert reader.statuses[200] > 0
    for target, counts in reader.counts.items():
        assert counts == sorted(counts), f"{target}: reading_count went down: {counts}"
    print(
        f"kills survived: {kills}; broker restart: {'rode through' if rode_through else 'stopped, saying why'}; "
        f"records: {total}; readings: {len(silver)}; gold seconds: {len(gold)} and the rollups, all equal to the reference; "
        f"API answers: {dict(reader.statuses)}"
    )


def test_retention_loss_stops_then_is_recorded(broker, lake_settings: Settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    from pipeline.kafka.broker import ensure_topic

    settings = lake_settings.model_copy(update={"topic_partitions": 1})
    ensure_topic(settings)

    def send(first: int, count: int) -> None:
        lines = [
            dumps({"device_id": "d", "timestamp": stamp(T0 + timedelta(seconds=i)), "value": float(i)})
            for i in range(first, first + count)
        ]
        path = tmp_path / f"{first}.ndjson"
        path.write_bytes(b"\n".join(lines) + b"\n")
        assert lakehouse(settings, "produce", str(path)).returncode == 0

    send(0, 50)
    assert lakehouse(settings, "pipeline", "--available-now").returncode == 0
    send(50, 50)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for future in admin.delete_records([TopicPartition(settings.topic, 0, 80)]).values():
        future.result(timeout=30)  # retention: offsets 50..79 are gone before the pipeline read them

    stopped = lakehouse(settings, "pipeline", "--available-now")
    assert stopped.returncode == 1
    assert "no longer holds offsets" in stopped.stderr and "--no-fail-on-data-loss" in stopped.stderr

    went_on = lakehouse(settings.model_copy(update={"fail_on_data_loss": False}), "pipeline", "--available-now")
    assert went_on.returncode == 0, went_on.stderr[-3000:]
    from lake.duck import connect

    lake = connect(LakePaths.from_settings(settings))
    assert lake.sql('SELECT count(*), min("offset"), max("offset") FROM bronze').fetchone() == (70, 0, 99)
    assert lake.sql("SELECT count(*) FROM silver").fetchone() == (70,)
    gaps = lake.sql(
        'SELECT "partition", "offset", reason FROM quarantine WHERE reason_code = \'offsets_lost\''
    ).fetchall()
    assert len(gaps) == 1 and gaps[0][:2] == (0, 50)
    assert "offsets 50..79" in gaps[0][2] and "(30 records)" in gaps[0][2]
