"""Shared fixtures: the real Kafka broker (started once per session), a local Spark session, and a lake the pipeline
wrote from that broker (once per session) for the tests that only read one."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from lake.settings import Settings
from tests.reference import Reference

REPO = Path(__file__).resolve().parent.parent
HOME = REPO / ".lakehouse"  # jars resolved by `lakehouse setup` (make test runs it first)
# Another port when 19092 is taken on the machine (its controller listens on the next port).
TEST_KAFKA_PORT = int(os.environ.get("LAKEHOUSE_TEST_KAFKA_PORT", "19092"))
# The pipelines the tests start hold a few thousand readings and start dozens of times: with the C1 compiler alone
# their JVM starts about a quarter sooner (README, LAKEHOUSE_SPARK_DRIVER_JAVA_OPTIONS). A test that measures the
# engine on a backlog (tests/test_backlog.py) sets the default back.
QUICK_START_JIT = "-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=240m"


@pytest.fixture(scope="session")
def broker():  # type: ignore[no-untyped-def]
    """A real single-node KRaft broker on a test port with fresh storage (tests may stop and start it)."""
    from pipeline.kafka.broker import LocalBroker

    local = LocalBroker(home=HOME, host="localhost", port=TEST_KAFKA_PORT, max_bytes=Settings().kafka_limit_bytes)
    local.stop()
    shutil.rmtree(local.folder, ignore_errors=True)
    local.start()
    yield local
    local.stop()


def sized_settings(folder: Path, topic_prefix: str) -> Settings:
    """A lake in `folder`, a topic of its own on the test broker, test-sized Spark."""
    return Settings(
        kafka_bootstrap=f"localhost:{TEST_KAFKA_PORT}",
        topic=f"{topic_prefix}-{uuid.uuid4().hex[:8]}",
        lake_root=str(folder / "lake"),
        home=HOME,
        spark_master="local[2]",
        shuffle_partitions=2,
        spark_driver_memory="2g",
        spark_driver_java_options=QUICK_START_JIT,
    )


@pytest.fixture()
def lake_settings(tmp_path: Path) -> Settings:
    """Settings for one test: its own lake folder, test-sized Spark, a topic of its own (created by `topic`)."""
    return sized_settings(tmp_path, "test")


@pytest.fixture()
def topic(broker, lake_settings: Settings) -> str:  # type: ignore[no-untyped-def]
    from pipeline.kafka.broker import ensure_topic

    assert ensure_topic(lake_settings) is True
    return lake_settings.topic


@pytest.fixture(scope="session")
def spark():  # type: ignore[no-untyped-def]
    from pipeline.stream.spark import build_session

    settings = Settings(home=HOME, spark_master="local[2]", shuffle_partitions=2, spark_driver_memory="2g")
    session = build_session(settings, app_name="kpi-lakehouse-tests")
    yield session
    session.stop()


@dataclass(frozen=True)
class PipelineLake:
    """A lake the pipeline wrote from a real topic: its settings, and the reference of what was produced."""

    settings: Settings
    reference: Reference
    messages: int
    seconds: float  # what producing and the pipeline run took

    @property
    def root(self) -> Path:
        return Path(self.settings.lake_root)


@pytest.fixture(scope="session")
def pipeline_lake(broker, tmp_path_factory) -> PipelineLake:  # type: ignore[no-untyped-def]
    """tests.stream.fleet_day produced to a topic of its own and run through `lakehouse pipeline --available-now`
    once for the whole session: the lake every test that only reads one shares (none may write to it)."""
    from bench.processes import lakehouse
    from pipeline.kafka.broker import ensure_topic
    from tests.stream import fleet_day

    folder = tmp_path_factory.mktemp("pipeline-lake")
    settings = sized_settings(folder, "fleet-day")
    started = time.monotonic()
    assert ensure_topic(settings) is True
    stream = fleet_day()
    sent = lakehouse(settings, "produce", str(stream.write(folder / "fleet-day.ndjson")))
    assert sent.returncode == 0, sent.stderr[-3000:]
    run = lakehouse(settings, "pipeline", "--available-now")
    assert run.returncode == 0, run.stderr[-5000:]
    seconds = time.monotonic() - started
    print(f"\npipeline_lake: {len(stream.sent)} messages produced and run through the pipeline in {seconds:.1f} s")
    return PipelineLake(settings, stream.reference(), len(stream.sent), seconds)


@contextmanager
def running_s3(bucket: str) -> Iterator:  # type: ignore[type-arg]
    """S3Proxy on a free port with an empty `bucket`; while it runs, the standard AWS_* variables point this process
    (and the `lakehouse` commands it starts) at it."""
    from bench.processes import free_port
    from pipeline.s3server import LocalS3Server

    server = LocalS3Server(home=HOME, port=free_port())
    shutil.rmtree(server.folder, ignore_errors=True)
    server.start((bucket,))
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in server.client_env().items():
                patch.setenv(name, value)
            yield server
    finally:
        server.stop()
