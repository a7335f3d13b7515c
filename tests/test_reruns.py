"""Gold and the watermark through what a crash, a replay and log cleanup do between commits: a batch run again that
yields other readings than its first run, a replay that commits after a newer stream batch, and a lake whose old
commits are gone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lake import watermark
from lake.settings import Settings
from lake.tables import LakePaths, Table
from pipeline.stream.source import RECORD_DDL
from tests.reference import Reference, assert_kpis_equal, gold_kpis

pytestmark = pytest.mark.spark

T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)
SLASHED = "%d/%m/%Y %H:%M:%S"  # a timestamp format the first run accepts and the run after the crash does not


class Crash(Exception):
    pass


def records(spark, payloads: list[bytes], first_offset: int, at: datetime = T0):  # type: ignore[no-untyped-def]
    rows = [("t", 0, first_offset + i, at, None, bytearray(p)) for i, p in enumerate(payloads)]
    return spark.createDataFrame(rows, RECORD_DDL)


def reading(device: str, moment: datetime, value: float, spelled: str | None = None) -> bytes:
    text = spelled or moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps({"device_id": device, "timestamp": text, "value": value}).encode()


def assert_gold_is(spark, paths: LakePaths, reference: Reference) -> None:  # type: ignore[no-untyped-def]
    from lake import duck

    silver = spark.read.format("delta").load(paths.table(Table.SILVER)).collect()
    assert {(r.device_id, r.timestamp.replace(tzinfo=UTC), r.metric): r.value for r in silver} == reference.readings
    lake = duck.connect(paths)
    got = gold_kpis(lake)
    lake.close()
    want = reference.buckets("second")
    assert set(got) == set(want), "gold holds other seconds than silver's readings"
    for second, kpis in want.items():
        assert_kpis_equal(got[second], kpis, f"second {second}")


@pytest.mark.parametrize("first_commit", ["gold", "silver"])
def test_batch_run_again_after_its_first_commit_yields_less(  # type: ignore[no-untyped-def]
    spark, tmp_path: Path, monkeypatch, first_commit: str
) -> None:
    """A crash between a batch's first commit and its second (gold's then silver's in a small batch; silver's then
    gold's in a backlog's); the restart drops an extra timestamp format, so the batch now yields one reading less
    and a second fewer. Gold follows what silver holds, not the first run."""
    from pipeline.stream import job as job_module
    from pipeline.stream import writes
    from pipeline.stream.job import IngestJob
    from pipeline.stream.tables import create_tables

    if first_commit == "silver":  # the backlog's way: silver first, then gold recomputed from silver
        monkeypatch.setattr(writes, "_GOLD_FROM_BATCH_READINGS", 0)

    lenient = Settings(lake_root=str(tmp_path / "lake"), extra_timestamp_formats=[SLASHED])
    paths = LakePaths.from_settings(lenient)
    create_tables(spark, paths)
    IngestJob(spark, lenient, paths, app_id="app").process_batch(records(spark, [reading("a", T0, 1.0)], 0), 0)
    later = T0 + timedelta(seconds=5)
    batch = [reading("a", T0 + timedelta(seconds=1), 2.0), reading("b", later, 9.0, later.strftime(SLASHED))]

    def crash_after_first_commit(stage: str, batch_id: int) -> None:
        if (stage, batch_id) == (first_commit, 1):
            raise Crash

    monkeypatch.setattr(job_module, "crash_point", crash_after_first_commit)
    with pytest.raises(Crash):
        IngestJob(spark, lenient, paths, app_id="app").process_batch(records(spark, batch, 1), 1)
    monkeypatch.undo()
    if first_commit == "gold":
        assert later in gold_seconds(spark, paths), "the first run committed gold, with the second it alone yields"
        kept = [("a", T0, 1.0), ("a", T0 + timedelta(seconds=1), 2.0)]
    else:  # silver keeps the first run's reading (a MERGE never takes one away); gold must hold its second
        assert later not in gold_seconds(spark, paths), "the crash was to come before gold's commit"
        kept = [("a", T0, 1.0), ("a", T0 + timedelta(seconds=1), 2.0), ("b", later, 9.0)]

    strict = lenient.model_copy(update={"extra_timestamp_formats": []})
    IngestJob(spark, strict, paths, app_id="app").process_batch(records(spark, batch, 1), 1)
    assert_gold_is(spark, paths, Reference.of(kept))
    reasons = [r.reason_code for r in spark.read.format("delta").load(paths.table(Table.QUARANTINE)).collect()]
    assert reasons == ["bad_timestamp"]

    # Run again once more with nothing valid at all: the first seconds' KPIs still follow silver.
    IngestJob(spark, strict, paths, app_id="app").process_batch(records(spark, [b"[]"], 1), 1)
    assert_gold_is(spark, paths, Reference.of(kept))


def gold_seconds(spark, paths: LakePaths) -> set[datetime]:  # type: ignore[no-untyped-def]
    rows = spark.read.format("delta").load(paths.table(Table.GOLD)).select("timestamp").collect()
    return {r.timestamp.replace(tzinfo=UTC) for r in rows}


def newest_watermark(paths: LakePaths) -> watermark.Watermark:
    from lake import deltalog

    gold = paths.table(Table.GOLD)
    found = deltalog.latest_version(gold)
    assert found is not None
    watermark.at_version.cache_clear()
    return watermark.at_version(gold, found.version)


def test_watermark_never_goes_back_and_outlives_log_cleanup(spark, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A replay that read the watermark before a newer stream batch and commits after it leaves the newest
    watermark where the stream put it; `lakehouse maintain` cleaning every old commit of gold's log keeps it."""
    from lake.maintenance import maintain
    from pipeline.ops.replay import replay
    from pipeline.stream.job import IngestJob
    from pipeline.stream.tables import create_tables
    from pipeline.stream.writes import LakeWriter

    strict = Settings(lake_root=str(tmp_path / "lake"), allowed_lateness="10s")
    paths = LakePaths.from_settings(strict)
    create_tables(spark, paths)
    stream = IngestJob(spark, strict, paths, app_id="app")
    slashed = T0 + timedelta(seconds=3)
    stream.process_batch(
        records(spark, [reading("a", T0, 1.0), reading("b", slashed, 4.0, slashed.strftime(SLASHED))], 0, T0), 0
    )
    first = newest_watermark(paths)
    newer = T0 + timedelta(minutes=5)

    # The replay reads the watermark; the stream commits a newer batch; then the replay commits.
    original = LakeWriter.recorded_watermark
    interleaved: list[watermark.Watermark] = []

    def read_then_stream_goes_on(self: LakeWriter) -> watermark.Watermark:
        found = original(self)
        if not interleaved:
            stream.process_batch(records(spark, [reading("a", newer, 2.0)], 2, newer), 1)
            interleaved.append(newest_watermark(paths))
        return found

    monkeypatch.setattr(LakeWriter, "recorded_watermark", read_then_stream_goes_on)
    lenient = strict.model_copy(update={"extra_timestamp_formats": [SLASHED]})
    assert replay(lenient, spark=spark).readings_accepted == 1
    monkeypatch.undo()
    assert interleaved and interleaved[0].watermark_us is not None and first.watermark_us is not None
    assert interleaved[0].watermark_us > first.watermark_us
    assert newest_watermark(paths) == interleaved[0], "the replay's commit took the watermark back"
    assert_gold_is(spark, paths, Reference.of([("a", T0, 1.0), ("b", slashed, 4.0), ("a", newer, 2.0)]))

    # Log cleanup of every commit before the newest checkpoint: the commitInfo entries go, the watermark stays.
    spark.sql(
        f"ALTER TABLE delta.`{paths.table(Table.GOLD)}` SET TBLPROPERTIES "
        "('delta.logRetentionDuration' = 'interval 0 seconds', "
        "'delta.deletedFileRetentionDuration' = 'interval 0 seconds')"
    )
    maintain(paths, [Table.GOLD], vacuum=False)
    log = Path(paths.table(Table.GOLD)) / "_delta_log"
    entries = [
        action
        for commit in log.glob("*.json")
        for action in map(json.loads, commit.read_text().splitlines())
        if watermark.parse(action.get("commitInfo", {}).get("userMetadata")) is not None
    ]
    assert entries == [], "log cleanup left a commit that records the watermark: the test proves nothing"
    assert newest_watermark(paths).watermark_us == interleaved[0].watermark_us
    restarted = IngestJob(spark, strict, paths, app_id="app")
    assert restarted.writer.recorded_watermark().watermark_us == interleaved[0].watermark_us
