"""The cost of one small micro-batch, without Kafka or a stream around it: `IngestJob.process_batch` on batches of
a few new readings (Kafka-shaped rows made in the driver), one after another in one Spark session, as a live stream
of a few readings per trigger makes them. Prints the median seconds and Spark jobs per batch, per window of ten
batches and overall (after the first three), with the median seconds of each stage.

    .venv/bin/python -m bench.batch_loop --batches 40 --readings 5
    .venv/bin/python -m bench.batch_loop --batches 20 --step 0.5   # batches that share seconds
    .venv/bin/python -m bench.batch_loop --batches 48 --step 0.5 --rollups-every 6   # and rollups batches

A tool for changes to the hot path (issue 14 in BENCHMARKS.md): quicker and steadier than `lakehouse bench --part
freshness`, which measures the whole path from produce to the API, and which stays the figure of record.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--readings", type=int, default=5, help="new readings per batch, one per device")
    parser.add_argument(
        "--step",
        type=float,
        default=None,
        help="event time between batches, in seconds (default: each batch's readings are stamped with the clock); "
        "under 1, consecutive batches share seconds, as a live stream's do",
    )
    parser.add_argument(
        "--rollups-every",
        type=int,
        default=0,
        help="after every N batches, a rollups batch over silver's rows of those N (as the rollups query makes every "
        "30 s), timed apart; 0: none",
    )
    parser.add_argument("--spark-master", default="local[2]")
    parser.add_argument("--home", type=Path, default=Path(".lakehouse"), help="where `lakehouse setup` put the jars")
    args = parser.parse_args()

    from lake.settings import Settings
    from lake.tables import LakePaths, Table
    from pipeline.stream.job import IngestJob, RollupsJob
    from pipeline.stream.source import RECORD_DDL
    from pipeline.stream.spark import build_session
    from pipeline.stream.tables import create_tables

    with tempfile.TemporaryDirectory(prefix="batch-loop-") as folder:
        settings = Settings(home=args.home, lake_root=str(Path(folder) / "lake"), spark_master=args.spark_master)
        spark = build_session(settings, "kpi-lakehouse-batch-loop")
        paths = LakePaths.from_settings(settings)
        create_tables(spark, paths, settings.delta_checkpoint_interval)
        job = IngestJob(spark, settings, paths, None, "kpi-lakehouse-batch-loop")
        rollups_session = spark.newSession()  # as the rollups query has (job.start_rollups)
        rollups_job = RollupsJob(rollups_session, paths)
        rollups_rows: list[tuple[float, int]] = []  # seconds and Spark jobs of each rollups batch
        since: datetime | None = None  # the first event time of the batches since the last rollups batch
        scheduler = spark.sparkContext._jsc.sc().dagScheduler()  # type: ignore[union-attr]
        offset, rows = 0, []
        first = datetime.now(UTC).replace(microsecond=0)  # the same seconds shared from run to run
        for batch in range(args.batches):
            now = datetime.now(UTC) if args.step is None else first + timedelta(seconds=args.step * batch)
            records = []
            for device in range(args.readings):
                at = (now - timedelta(milliseconds=100 * device)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                value = json.dumps({"device_id": f"d-{device}", "timestamp": at, "value": float(device)})
                records.append(("loop", device % 4, offset, now, f"d-{device}".encode(), value.encode()))
                offset += 1
            frame = spark.createDataFrame(records, RECORD_DDL)
            first_job = scheduler.nextJobId()
            job.process_batch(frame, batch)
            report = job.reports[-1]
            rows.append((report.seconds, scheduler.nextJobId() - first_job, report.stages))
            since = since or now - timedelta(seconds=1)
            if args.rollups_every and (batch + 1) % args.rollups_every == 0:
                # Silver's rows of the last batches stand for the rows of silver's new commits that the query reads.
                silver = rollups_session.read.format("delta").load(paths.table(Table.SILVER))
                changes = silver.where(silver["timestamp"] >= since).localCheckpoint()
                first_job, started = scheduler.nextJobId(), time.monotonic()
                rollups_job.process_batch(changes, len(rollups_rows))
                rollups_rows.append((time.monotonic() - started, scheduler.nextJobId() - first_job))
                since = now + timedelta(seconds=args.step or 1)
            time.sleep(0.3)
        spark.stop()

    def medians(window: list[tuple[float, int, dict[str, float]]]) -> str:
        stages = {name: statistics.median(r[2].get(name, 0.0) for r in window) for name in window[-1][2]}
        return (
            f"{statistics.median(r[0] for r in window):.2f} s, {statistics.median(r[1] for r in window):g} jobs "
            f"({', '.join(f'{name} {s:.2f}' for name, s in stages.items())})"
        )

    for start in range(0, len(rows), 10):
        print(f"batches {start}-{min(start + 10, len(rows)) - 1}: {medians(rows[start : start + 10])}")
    if len(rows) > 3:
        print(f"median of batches 3-{len(rows) - 1}: {medians(rows[3:])}")
    if rollups_rows:
        print("rollups batches: " + ", ".join(f"{seconds:.2f} s ({jobs} jobs)" for seconds, jobs in rollups_rows))
        if len(rollups_rows) > 2:
            print(f"median of rollups batches 2-{len(rollups_rows) - 1}: ", end="")
            print(f"{statistics.median(r[0] for r in rollups_rows[2:]):.2f} s")


if __name__ == "__main__":
    main()
