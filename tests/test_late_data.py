"""Late data end to end: a device held back for an hour sends its readings after the watermark passed them, and a
pump its metrics. Each bucket's `final`, `revision` and `late_readings`, per metric, are checked against an
independent replay of the batches (tests.reference.History) through the API and `lakehouse sql`, after two kill -9s
in the late batch."""

from __future__ import annotations

import csv
import io
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from bench.processes import lakehouse, running_api, start_lakehouse
from lake.settings import Settings
from lake.tables import LakePaths, Table
from pipeline.stream.source import RECORD_DDL
from tests.reference import GRAINS, History, Reference, assert_kpis_equal, expected_rollups, gold_kpis
from tests.stream import Stream, dumps

pytestmark = pytest.mark.spark

T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)
FLEET = ("f-1", "f-2", "f-3")
LATENESS = timedelta(minutes=5)


def fleet_stream() -> Stream:
    """Three devices, a reading each every 20 s from 12:00 to 13:29:40 (the k-th device at +k/10 s), ten minutes to
    a message."""
    stream = Stream()
    for k, device in enumerate(FLEET, start=1):
        moments = [T0 + timedelta(seconds=20 * i, milliseconds=100 * k) for i in range(270)]
        for first in range(0, len(moments), 30):
            stream.batch(device, [(m, float(i % 17) + k) for i, m in enumerate(moments[first : first + 30], first)])
    return stream


def late_stream(fleet: Stream) -> Stream:
    """The late batch: an hour of a held-back device, a duplicate, a correction and two on-time readings."""
    stream = Stream()
    held_back = [(T0 + timedelta(seconds=30 * j, milliseconds=500), 100.0 + j) for j in range(120)]
    stream.batch("late-1", held_back)
    # A pump held back half an hour: its flow and pressure, late for every bucket of theirs, and no `value`.
    pumped = [
        (T0 + timedelta(minutes=j, milliseconds=700), {"flow_m3h": 10.0 + j, "pressure_bar": 2.0 + j / 100})
        for j in range(30)
    ]
    stream.metrics_batch("pump-1", pumped)
    # One of them corrected (flow alone) in the same batch: the later record wins; the pressure stays.
    stream.send(
        dumps({"device_id": "pump-1", "timestamp": stamp_us(pumped[3][0]), "metric": "flow_m3h", "value": -1.0}),
        [("pump-1", pumped[3][0], -1.0, "flow_m3h")],
    )
    stream.repeat(fleet.sent[0])  # sent again unchanged: changes nothing, counts nowhere
    # Quarantined, and no reading time to move the watermark (its broker time, two years on, must not either).
    stream.send(b"not json", quarantined=[("not_json", None)])
    stream.single("f-1", T0 + timedelta(minutes=30, milliseconds=100), -5.0)  # corrects 12:30:00.1, which is final
    # 13:24:40.9: in a second that is not final when it arrives, and is once it is in.
    stream.single("f-3", T0 + timedelta(minutes=84, seconds=40, milliseconds=900), 7.0)
    stream.single("f-2", T0 + timedelta(minutes=89, seconds=50, milliseconds=200), 8.0)  # 13:29:50.2: newest
    return stream


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def stamp_us(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def api_state(base: str, grain: str, device: str | None, start: datetime, metric: str = "value") -> dict[str, object]:
    query = {"grain": grain, "metric": metric, **({"device_id": device} if device else {})}
    answer = httpx.get(f"{base}/kpis/{stamp(start)}", params=query, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


# Buckets asked of the API before and after the late batch.
PROBES = [
    ("second", None, T0 + timedelta(minutes=10)),  # a fleet second the late device shares
    ("second", None, T0 + timedelta(minutes=30)),  # shared, and corrected
    ("second", None, T0 + timedelta(minutes=84, seconds=40)),  # gets an on-time reading, final only after it
    ("minute", "f-1", T0 + timedelta(minutes=30)),
    ("hour", None, T0),  # final: every late reading is late for it
    ("hour", None, T0 + timedelta(hours=1)),  # not final
    ("day", None, T0.replace(hour=0)),
    ("minute", None, T0 + timedelta(minutes=3), "flow_m3h"),  # the corrected flow's minute, all of it late
    ("hour", "pump-1", T0, "pressure_bar"),
]


def test_late_readings_are_counted_and_final_buckets_revised_through_kill_9s(
    lake_settings: Settings, topic: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    settings = lake_settings.model_copy(update={"allowed_lateness": "5 minutes"})
    fleet = fleet_stream()
    late = late_stream(fleet)
    history = History(LATENESS)

    assert lakehouse(settings, "produce", str(fleet.write(tmp_path / "fleet.ndjson"))).returncode == 0
    first = lakehouse(settings, "pipeline", "--available-now")
    assert first.returncode == 0, first.stderr[-3000:]
    history.batch([r for m in fleet.sent for r in m.readings])
    assert history.watermark == T0 + timedelta(minutes=89, seconds=40, milliseconds=300) - LATENESS

    with running_api(settings) as base:
        before = {probe: api_state(base, *probe) for probe in PROBES if len(probe) == 3}  # the pump comes late
        unknown = httpx.get(f"{base}/kpis/{stamp(T0)}", params={"metric": "flow_m3h"}, timeout=10)
        assert unknown.status_code == 404 and "value" in unknown.json()["detail"]
    for probe, answer in before.items():
        assert {k: answer[k] for k in ("final", "revision", "late_readings")} == history.state(*probe), probe
    assert before[PROBES[2]]["final"] is False and before[PROBES[0]]["final"] is True

    # The late batch, killed right after its silver commit, then right after its gold commit when run again.
    assert lakehouse(settings, "produce", str(late.write(tmp_path / "late.ndjson"))).returncode == 0
    for stage in ("silver:1", "gold:1"):
        log = tmp_path / f"crash-{stage.replace(':', '-')}.log"
        crashed = start_lakehouse(
            settings, "pipeline", "--available-now", log=log, env_extra={"LAKEHOUSE_TEST_CRASH_AFTER": stage}
        )
        assert crashed.wait(timeout=600) == -signal.SIGKILL, log.read_text()[-3000:]
    finished = lakehouse(settings, "pipeline", "--available-now")
    assert finished.returncode == 0, finished.stderr[-3000:]
    history.batch([r for m in late.sent for r in m.readings])
    assert history.watermark == T0 + timedelta(minutes=89, seconds=50, milliseconds=200) - LATENESS
    reference: Reference = history.reference

    # Every second of gold and every rollup bucket, through `lakehouse sql` (the views add `final`).
    listed = lakehouse(
        settings,
        "sql",
        "--output",
        "csv",
        "SELECT \"timestamp\", reading_count, final, revision, late_readings FROM gold WHERE metric = 'value' "
        'ORDER BY "timestamp"',
    )
    assert listed.returncode == 0, listed.stderr
    gold = {
        datetime.fromisoformat(row["timestamp"]).astimezone(UTC): row
        for row in csv.DictReader(io.StringIO(listed.stdout))
    }
    want = reference.buckets("second")
    assert set(gold) == set(want)
    for second, row in gold.items():
        state = history.state("second", None, second)
        got = {
            "final": row["final"] == "True",
            "revision": int(row["revision"]),
            "late_readings": int(row["late_readings"]),
        }
        assert (got, int(row["reading_count"])) == (state, want[second]["reading_count"]), second
    assert (
        sum(history.late.get(("second", None, s, "value"), 0) for s in want) == 121
    )  # the held-back hour and the correction

    from lake.duck import connect

    lake = connect(LakePaths.from_settings(settings))
    assert reference.metrics() == ["flow_m3h", "pressure_bar", "value"]
    for metric in reference.metrics():
        seconds = reference.buckets("second", metric=metric)
        for second, values in gold_kpis(lake, metric).items():
            assert_kpis_equal(values, seconds[second], f"gold {metric} {second}")
        states = lake.execute(
            'SELECT "timestamp", final, revision, late_readings FROM gold WHERE metric = $metric', {"metric": metric}
        ).fetchall()
        assert {t.astimezone(UTC) for t, *_ in states} == set(seconds), metric
        for second, final, revision, late_readings in states:
            state = history.state("second", None, second.astimezone(UTC), metric)
            assert {"final": final, "revision": revision, "late_readings": late_readings} == state, (metric, second)
        rows = lake.execute(
            'SELECT grain, device_id, "timestamp", reading_count, final, revision, late_readings FROM rollups '
            "WHERE metric = $metric",
            {"metric": metric},
        ).fetchall()
        rollups = {(g, d, t.astimezone(UTC)): rest for g, d, t, *rest in rows}
        expected = expected_rollups(reference, metric)
        assert set(rollups) == set(expected), metric
        for key, (count, final, revision, late_readings) in rollups.items():
            state = history.state(*key, metric)
            assert (count, {"final": final, "revision": revision, "late_readings": late_readings}) == (
                expected[key]["reading_count"],
                state,
            ), (metric, key)
    # The pump's half hour came late, all 30 of each metric (the correction, in the same batch, replaced one).
    late_flow = sum(
        n
        for (grain, device, _, metric), n in history.late.items()
        if (grain, device, metric) == ("second", None, "flow_m3h")
    )
    assert (
        late_flow == 30 and reference.value("pump-1", T0 + timedelta(minutes=3, milliseconds=700), "flow_m3h") == -1.0
    )
    assert lake.sql("SELECT watermark FROM watermark").fetchone()[0] == history.watermark  # type: ignore[index]
    lake.close()

    with running_api(settings) as base:
        after = {probe: api_state(base, *probe) for probe in PROBES}
        # A range, final buckets only, then only those that may still change: together, every bucket.
        minutes = {"start": stamp(T0), "end": stamp(T0 + timedelta(hours=2)), "grain": "minute"}
        done = httpx.get(f"{base}/kpis", params={**minutes, "final": "true"}, timeout=10).json()
        open_ = httpx.get(f"{base}/kpis", params={**minutes, "final": "false"}, timeout=10).json()
        freshness = done["freshness"]
    for probe, answer in after.items():
        grain, device, start, *metric = probe
        assert {k: answer[k] for k in ("final", "revision", "late_readings")} == history.state(*probe), probe
        assert answer["metric"] == (metric[0] if metric else "value")
        assert_kpis_equal(answer, reference.buckets(grain, device, *metric)[start], f"API {probe}")
    assert datetime.fromisoformat(freshness["watermark"]) == history.watermark
    minute_starts = sorted(reference.buckets("minute"))  # of metric `value`, which the series answers by default
    final_minutes = [m for m in minute_starts if m + GRAINS["minute"] <= history.watermark]  # type: ignore[operator]
    assert [datetime.fromisoformat(i["timestamp"]) for i in done["items"]] == final_minutes
    assert all(i["final"] for i in done["items"]) and not any(i["final"] for i in open_["items"])
    assert len(done["items"]) + len(open_["items"]) == len(minute_starts)

    print("\nlate data, the API before and after the late batch (final, revision, late_readings, reading_count):")
    for probe in PROBES:
        was, now = before.get(probe, {k: "-" for k in after[probe]}), after[probe]
        print(
            f"  {probe[0]:6} {probe[1] or 'fleet':6} {stamp(probe[2])} {probe[3] if len(probe) > 3 else 'value':12}: "
            f"{was['final']}, {was['revision']}, {was['late_readings']}, {was['reading_count']} -> "
            f"{now['final']}, {now['revision']}, {now['late_readings']}, {now['reading_count']}"
        )


def test_a_clock_running_ahead_moves_the_watermark_no_further_than_the_broker(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A reading dated years ahead (a device with a wrong clock) moves the watermark only as far as its record's
    broker time minus the allowed lateness, so it finalizes nothing that has not arrived; a reading that comes after
    that is late for its second and minute, not for its hour."""
    from lake import watermark
    from lake.deltalog import latest_version
    from lake.duck import connect
    from pipeline.stream.job import IngestJob, RollupsJob
    from pipeline.stream.tables import create_tables
    from tests.stream import dumps

    settings = Settings(lake_root=str(tmp_path / "lake"), allowed_lateness="1 minute")
    paths = LakePaths.from_settings(settings)
    create_tables(spark, paths)
    job = IngestJob(spark, settings, paths, app_id="clock-test")

    def send(batch_id: int, broker_time: datetime, readings: list[tuple[str, datetime, float]]) -> None:
        payloads = [dumps({"device_id": d, "timestamp": m.isoformat(), "value": v}) for d, m, v in readings]
        rows = [("t", 0, batch_id * 10 + i, broker_time, None, bytearray(p)) for i, p in enumerate(payloads)]
        job.process_batch(spark.createDataFrame(rows, RECORD_DDL), batch_id)

    broker = T0 + timedelta(minutes=10)
    send(0, broker, [("f-1", T0 + timedelta(minutes=9), 1.0), ("fast", datetime(2030, 1, 1, tzinfo=UTC), 2.0)])
    gold = paths.table(Table.GOLD)
    found = latest_version(gold)
    assert found is not None
    expected_us = int((broker - timedelta(minutes=1)).timestamp() * 1_000_000)
    assert watermark.at_version(gold, found.version).watermark_us == expected_us

    late = T0 + timedelta(minutes=8, seconds=59, milliseconds=500)  # its second ended at 12:09:00, the watermark
    send(1, broker + timedelta(seconds=1), [("f-2", late, 3.0)])
    # The rollups query's batch over all of silver.
    RollupsJob(spark, paths).process_batch(spark.read.format("delta").load(paths.table(Table.SILVER)), 0)
    lake = connect(paths)
    second = lake.execute(
        'SELECT final, revision, late_readings FROM gold WHERE "timestamp" = $t', {"t": late.replace(microsecond=0)}
    ).fetchone()
    assert second == (True, 0, 1)
    buckets = lake.execute(
        "SELECT grain, final, late_readings, reading_count FROM rollups WHERE device_id IS NULL "
        'AND "timestamp" <= $t AND "timestamp" + INTERVAL 1 DAY > $t ORDER BY 1',
        {"t": late},
    ).fetchall()
    lake.close()
    # The minute 12:08 ended when the watermark stood at 12:09: final, and the reading late for it; the hour and
    # the day are still open.
    assert buckets == [("day", False, 0, 2), ("hour", False, 0, 2), ("minute", True, 1, 1)]
