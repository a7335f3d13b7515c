"""Beyond one machine: `lakehouse pipeline` on a Spark standalone cluster, reading a 3-broker Kafka cluster that
loses a broker mid-stream, writing a lake named by a file:// URI; the KPIs must equal the independent reference."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from bench.processes import LAKEHOUSE, env_for, lakehouse, start_lakehouse, stop_group
from lake.settings import Settings
from lake.tables import LakePaths
from tests.conftest import HOME
from tests.reference import assert_kpis_equal, gold_kpis
from tests.stream import Stream

pytestmark = [pytest.mark.cluster, pytest.mark.kafka, pytest.mark.spark]

KAFKA_BASE_PORT = 19300  # brokers on 19300, 19302, 19304; their controllers on the next port of each
SPARK_MASTER_PORT, SPARK_MASTER_UI_PORT, SPARK_WORKER_PORT, SPARK_WORKER_UI_PORT = 19310, 19311, 19312, 19313
T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def kafka_cluster() -> Iterator[object]:
    """Three KRaft brokers (each also a controller) on loopback with fresh storage and small heaps."""
    from pipeline.kafka.broker import LocalCluster

    limit = Settings().kafka_limit_bytes
    cluster = LocalCluster(HOME, "localhost", KAFKA_BASE_PORT, size=3, max_bytes=limit, heap="384m")
    cluster.stop()
    shutil.rmtree(cluster.folder, ignore_errors=True)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def spark_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Spark standalone master and one worker (2 cores, 2 GiB) started from the pyspark installation."""
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    folder = tmp_path_factory.mktemp("spark-standalone")
    env = os.environ | {
        "SPARK_HOME": str(spark_home),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_DAEMON_MEMORY": "256m",  # the master's and worker's own heap; executors get theirs from the job
        "SPARK_LOG_DIR": str(folder),
    }
    url = f"spark://127.0.0.1:{SPARK_MASTER_PORT}"
    daemons = {
        "master": [
            "org.apache.spark.deploy.master.Master",
            "--host",
            "127.0.0.1",
            "--port",
            str(SPARK_MASTER_PORT),
            "--webui-port",
            str(SPARK_MASTER_UI_PORT),
        ],
        "worker": [
            "org.apache.spark.deploy.worker.Worker",
            "--host",
            "127.0.0.1",
            "--port",
            str(SPARK_WORKER_PORT),
            "--webui-port",
            str(SPARK_WORKER_UI_PORT),
            "--cores",
            "2",
            "--memory",
            "2g",
            "--work-dir",
            str(folder / "work"),
            url,
        ],
    }
    started: list[subprocess.Popen[bytes]] = []
    try:
        spark_class = str(spark_home / "bin" / "spark-class")
        for name, arguments in daemons.items():
            with open(folder / f"{name}.log", "ab") as log:
                daemon = subprocess.Popen(
                    [spark_class, *arguments], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            started.append(daemon)
        deadline = time.monotonic() + 90
        while not _alive_workers():
            for daemon in started:
                assert daemon.poll() is None, f"a Spark daemon exited; see the logs in {folder}"
            assert time.monotonic() < deadline, f"no Spark worker registered with {url}; see the logs in {folder}"
            time.sleep(0.5)
        yield url
    finally:
        for daemon in reversed(started):
            stop_group(daemon)


def _master_state() -> dict[str, object]:
    try:
        return httpx.get(f"http://127.0.0.1:{SPARK_MASTER_UI_PORT}/json/", timeout=2).json()
    except (httpx.TransportError, ValueError):
        return {}


def _alive_workers() -> int:
    return sum(1 for worker in _master_state().get("workers", []) if worker["state"] == "ALIVE")  # type: ignore[union-attr]


def build_stream(rng: random.Random, messages: int) -> Stream:
    """Single readings, small batches, corrections and one 2 MiB batch, each with what must come out of it."""
    stream = Stream(spell=datetime.isoformat)
    devices = [f"pump-{n}" for n in range(12)]
    sent: dict[str, list[datetime]] = {}
    for index in range(messages):
        device = rng.choice(devices)
        if index % 20 == 7 and sent.get(device):
            # A correction: a reading this device sent before, with another value; same key, so a later offset.
            moment, value = rng.choice(sent[device]), round(rng.uniform(-50, 50), 3)
            stream.single(device, moment, value)
            continue
        count = 15 if index % 10 == 0 else 1
        readings = []
        for _ in range(count):
            moment = T0 + timedelta(milliseconds=rng.randrange(120_000))
            readings.append((moment, round(rng.gauss(40, 9), 4)))
            sent.setdefault(device, []).append(moment)
        if count > 1:
            stream.batch(device, readings)
        else:
            stream.single(device, *readings[0])
    # Over twice the 1 MiB that Kafka replicates by default: the replicas must fetch it too.
    big = stream.batch("big-1", [(T0 + timedelta(minutes=3, microseconds=400 * n), n % 997 / 7) for n in range(30_000)])
    stream.sent.insert(messages // 4, stream.sent.pop())
    assert len(big.payload) > 2 * 1024 * 1024
    return stream


def bronze_records(paths: LakePaths) -> int:
    """Records in bronze, as DuckDB reads the lake."""
    from lake.duck import connect

    return connect(paths).sql("SELECT count(*) FROM bronze").fetchone()[0]  # type: ignore[index]


def test_standalone_spark_and_three_brokers_survive_a_broker_loss(
    kafka_cluster, spark_master: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from lake.duck import connect
    from pipeline.kafka.broker import describe, ensure_topic

    settings = Settings(
        kafka_bootstrap=kafka_cluster.bootstrap,
        topic="cluster-telemetry",
        topic_replication=3,
        topic_min_insync_replicas=2,
        lake_root=(tmp_path / "lake").as_uri(),  # file:///...: the lake root as a URI, as on object storage
        home=HOME,
        spark_master=spark_master,
        spark_driver_memory="1g",
        spark_executor_memory="1g",
        shuffle_partitions=2,
        max_offsets_per_trigger=500,  # few micro-batches: on 2 cores each costs seconds whatever its size
        trigger_interval="1 second",
    )
    assert settings.lake_root.startswith("file:///")
    paths = LakePaths.from_settings(settings)
    assert ensure_topic(settings) is True
    # A new topic's partitions reach every broker's metadata a moment after creation returns.
    deadline = time.monotonic() + 30
    while (topology := describe(settings))["replicas"] is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert topology["brokers"] and len(topology["brokers"]) == 3 and topology["replicas"] == 3  # type: ignore[arg-type]

    stream = build_stream(random.Random(8), 300)
    messages, reference = stream.messages, stream.reference()
    half = len(messages) // 2
    first, second = stream.write(tmp_path / "first.ndjson", stop=half), stream.write(tmp_path / "second.ndjson", half)

    sent = lakehouse(settings, "produce", str(first))
    assert sent.returncode == 0, sent.stderr

    # The driver on loopback, so that the worker's executors reach it whatever the host's name resolves to.
    loopback = {"SPARK_LOCAL_IP": "127.0.0.1"}
    log = tmp_path / "pipeline.log"
    pipeline = start_lakehouse(settings, "pipeline", log=log, env_extra=loopback)
    producer: subprocess.Popen[str] | None = None
    try:

        def wait_until(condition: str, check: Callable[[], bool], timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            while not check():
                tail = log.read_text()[-4000:]
                assert pipeline.poll() is None, f"the pipeline exited while waiting for {condition}:\n{tail}"
                assert time.monotonic() < deadline, f"timed out waiting for {condition}:\n{tail}"
                time.sleep(1)

        # The first micro-batch done before the second half starts: gold's first commit after its creation, and
        # bronze's (a batch writes gold and silver first, bronze beside them).
        gold_log = tmp_path / "lake" / "gold" / "_delta_log"
        wait_until(
            "the first micro-batch in gold and bronze",
            lambda: len(list(gold_log.glob("*.json"))) >= 2 and bronze_records(paths) >= half,
            300,
        )
        apps = [app["name"] for app in _master_state().get("activeapps", [])]  # type: ignore[union-attr]
        assert "kpi-lakehouse" in apps, f"the job does not run on the standalone cluster: active apps {apps}"

        # Data keeps arriving, and the job keeps reading, while a broker stops: the producer sends with acks=all,
        # and 2 of 3 replicas stay in sync (min.insync.replicas=2).
        producer = subprocess.Popen(
            [*LAKEHOUSE, "produce", "--rate", "15", str(second)],
            env=env_for(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(4)
        stopped = kafka_cluster.nodes[0]  # also the first bootstrap address
        assert stopped.stop(), "the first broker was not running"
        after_loss = describe(settings)
        assert len(after_loss["brokers"]) == 2 and after_loss["under_replicated"], after_loss  # type: ignore[arg-type]
        _, produce_errors = producer.communicate(timeout=120)
        assert producer.returncode == 0, produce_errors
        assert f"sent {len(messages) - half:,} messages" in produce_errors

        per_second = reference.buckets()

        def complete() -> bool:
            lake = connect(paths)
            gold = gold_kpis(lake)
            return (
                set(gold) == set(per_second)
                and all(gold[s]["reading_count"] == want["reading_count"] for s, want in per_second.items())
                and lake.sql("SELECT count(*) FROM silver").fetchone()[0] >= len(reference.readings)  # type: ignore[index]
                and bronze_records(paths) >= len(messages)
            )

        # A batch commits gold, then silver, with bronze beside them: wait for all three before stopping the job
        # (stopped between two of them, the batch would run again at the next start, which this test does not make).
        wait_until("gold to hold every reading, silver every reading and bronze every record", complete, 240)
    finally:
        if producer is not None and producer.poll() is None:
            producer.kill()
        stop_group(pipeline)

    lake = connect(paths)
    bronze = lake.sql('SELECT count(*), count(DISTINCT ("partition", "offset")) FROM bronze').fetchone()
    assert bronze == (len(messages), len(messages)), "every record once in bronze, none lost, none twice"
    assert lake.sql("SELECT count(*) FROM silver").fetchone()[0] == len(reference.readings)  # type: ignore[index]
    assert lake.sql("SELECT count(*) FROM quarantine").fetchone()[0] == 0  # type: ignore[index]
    gold = gold_kpis(lake)
    assert set(gold) == set(per_second)
    for second_start, want in per_second.items():
        assert_kpis_equal(gold[second_start], want, f"gold {second_start}")
