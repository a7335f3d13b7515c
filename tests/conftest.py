"""Shared fixtures: the real Kafka broker (started once per session) and a local Spark session."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from lake.settings import Settings

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


@pytest.fixture()
def lake_settings(tmp_path: Path) -> Settings:
    """Settings for one test: its own lake folder, test-sized Spark, a topic of its own (created by `topic`)."""
    return Settings(
        kafka_bootstrap=f"localhost:{TEST_KAFKA_PORT}",
        topic=f"test-{uuid.uuid4().hex[:8]}",
        lake_root=str(tmp_path / "lake"),
        home=HOME,
        spark_master="local[2]",
        shuffle_partitions=2,
        spark_driver_memory="2g",
        spark_driver_java_options=QUICK_START_JIT,
    )


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
