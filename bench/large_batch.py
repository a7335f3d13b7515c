"""The cost of one large micro-batch, without Kafka or a stream around it: the ingest part's backlog (`lakehouse bench
--part ingest`: 5 MiB batch messages of 200 devices) as Kafka-shaped records in a Parquet file, handed to
`IngestJob.process_batch` as one batch on a new lake, in one Spark session. Prints each run's seconds, its stages and
its Spark jobs; the Parquet file is made once and kept.

    .venv/bin/python -m bench.large_batch                  # the 1 GiB backlog, one run
    .venv/bin/python -m bench.large_batch --mib 256 --runs 3

The counterpart of `bench/batch_loop.py` for the large batch: steadier than the ingest part, which reads the same
messages from Kafka and stays the figure of record, and a few minutes shorter. Spark's event log
(PYSPARK_SUBMIT_ARGS="--conf spark.eventLog.enabled=true --conf spark.eventLog.dir=file:///tmp/events pyspark-shell")
shows where a run's time goes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from bench.run import ingest_messages
from lake.settings import MIB, Settings


def write_records(path: Path, mib: int, settings: Settings) -> int:
    """The backlog's messages as Kafka records (RECORD_DDL), spread over the topic's partitions in turn, so that each
    read task gets a like share; returns the bytes of the messages."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.kafka.synthetic import Fleet

    messages = ingest_messages(mib, settings.max_message_bytes)
    # Produced after the readings' hour, a message a millisecond, as a backlog's are.
    sent = Fleet().start + timedelta(hours=2)
    partitions = [i % settings.topic_partitions for i in range(len(messages))]
    table = pa.table(
        {
            "topic": pa.array(["large-batch"] * len(messages)),
            "partition": pa.array(partitions, pa.int32()),
            "offset": pa.array([i // settings.topic_partitions for i in range(len(messages))], pa.int64()),
            "kafka_timestamp": pa.array(
                [sent + timedelta(milliseconds=i) for i in range(len(messages))], pa.timestamp("us", tz="UTC")
            ),
            "key": pa.array([None] * len(messages), pa.binary()),
            "value": pa.array(messages, pa.binary()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    # Row groups of 8 messages (40 MiB): the reader holds a row group's column at once, per task. Uncompressed:
    # with Snappy, the readers' buffers beside bronze's write ran the default 2 GiB heap out of memory.
    pq.write_table(table, partial, row_group_size=8, compression="none")
    partial.replace(path)
    return sum(len(m) for m in messages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="MiB of messages in the batch")
    parser.add_argument("--runs", type=int, default=1, help="batches, each on a new lake, in one session")
    parser.add_argument("--spark-master", default="local[2]")
    parser.add_argument("--home", type=Path, default=Path(".lakehouse"), help="where `lakehouse setup` put the jars")
    args = parser.parse_args()

    from lake.tables import LakePaths
    from pipeline.stream.job import IngestJob
    from pipeline.stream.spark import build_session
    from pipeline.stream.tables import create_tables

    settings = Settings(home=args.home, spark_master=args.spark_master)
    records_file = args.home.resolve() / "bench" / f"large-batch-{args.mib}mib.parquet"
    if not records_file.is_file():
        size = write_records(records_file, args.mib, settings)
        print(f"wrote {size / MIB:,.0f} MiB of messages as Kafka records to {records_file}")
    spark = build_session(settings, "kpi-lakehouse-large-batch")
    # A read task per Kafka partition's share of the batch, as the Kafka source makes them.
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(max(1, args.mib // settings.topic_partitions) * MIB))
    scheduler = spark.sparkContext._jsc.sc().dagScheduler()  # type: ignore[union-attr]
    seconds: list[float] = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="large-batch-") as folder:
            lake = settings.model_copy(update={"lake_root": str(Path(folder) / "lake")})
            paths = LakePaths.from_settings(lake)
            create_tables(spark, paths, lake.delta_checkpoint_interval)
            job = IngestJob(spark, lake, paths, None, f"kpi-lakehouse-large-batch-{run}")
            first_job, started = scheduler.nextJobId(), time.monotonic()
            job.process_batch(spark.read.parquet(str(records_file)), 0)
            seconds.append(time.monotonic() - started)
            report = job.reports[-1]
            stages = ", ".join(f"{name} {s:.1f}" for name, s in report.stages.items())
            print(
                f"run {run}: {seconds[-1]:.1f} s, {scheduler.nextJobId() - first_job} Spark jobs, "
                f"{report.records:,} records, {report.readings:,} readings ({stages})",
                flush=True,
            )
    spark.stop()
    if len(seconds) > 1:
        print(f"median of {len(seconds)} runs: {statistics.median(seconds):.1f} s")


if __name__ == "__main__":
    main()
