"""Every Kafka client of the project reads LAKEHOUSE_KAFKA_PROPERTIES, and the operator tools find a `file:` lake.

A client properties file that asks for TLS cannot talk to the plaintext test broker: a client that honours the file
fails, one that ignores it succeeds. That difference is what these tests look at.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from bench.processes import lakehouse
from lake import checkpoint
from lake.settings import Settings
from lake.tables import LakePaths
from tests.serve_lake import api_settings, serving

pytestmark = pytest.mark.kafka


def health_once_kafka_answered(base: str) -> dict:
    deadline = time.monotonic() + 30
    while "not asked yet" in str((body := httpx.get(f"{base}/health", timeout=5).json())["pipeline"]["kafka_error"]):
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
    return body


def test_health_asks_kafka_with_the_client_properties(lake_settings: Settings, topic: str, tmp_path: Path) -> None:
    plain = api_settings(tmp_path / "lake", kafka_bootstrap=lake_settings.kafka_bootstrap, topic=topic)
    with serving(plain) as base:
        body = health_once_kafka_answered(base)
    assert body["pipeline"]["kafka_error"] is None
    assert len(body["pipeline"]["partitions"]) == lake_settings.topic_partitions

    tls = tmp_path / "client.properties"
    tls.write_text("security.protocol=SSL\nssl.endpoint.identification.algorithm=\n")
    secured = plain.model_copy(update={"kafka_properties": tls})
    with serving(secured) as base:
        body = health_once_kafka_answered(base)
    # TLS against a plaintext listener: the lag is unknown and /health says why, instead of ignoring the file.
    assert body["pipeline"]["records_behind"] is None
    assert "cannot read offsets from Kafka" in body["pipeline"]["kafka_error"]


def test_doctor_checks_the_checkpoint_and_disk_of_a_file_uri_lake(
    lake_settings: Settings, topic: str, tmp_path: Path
) -> None:
    folder = tmp_path / "deep" / "lake"
    settings = lake_settings.model_copy(update={"lake_root": folder.as_uri()})  # file:///.../deep/lake
    # The files Spark's checkpoint keeps for a committed micro-batch, made for another topic.
    ingest = Path(checkpoint.ingest_checkpoint(LakePaths(str(folder), str(folder / "_checkpoints"))))
    (ingest / "offsets").mkdir(parents=True)
    (ingest / "commits").mkdir()
    metadata = {"batchWatermarkMs": 0, "batchTimestampMs": 0, "conf": {}}
    (ingest / "offsets" / "0").write_text(f"v1\n{json.dumps(metadata)}\n{json.dumps({'other-topic': {'0': 5}})}")
    (ingest / "commits" / "0").write_text('v1\n{"nextBatchWatermarkMs":0}')

    result = lakehouse(settings, "doctor", "--json", timeout=120)
    found = {f["check"]: f for f in json.loads(result.stdout)}
    assert result.returncode == 1
    assert found["checkpoint"]["status"] == "fail"
    assert "other-topic" in found["checkpoint"]["detail"] and repr(topic) in found["checkpoint"]["detail"]
    # Free space is measured where the lake will be (its nearest existing folder), not in the working directory.
    assert f"GiB free at {tmp_path}" in found["disk"]["detail"]
