"""The Spark driver's class data sharing (CDS) archive: the classes a pipeline run loads (Spark, Scala, Delta, the
parser's Arrow path), saved once by `lakehouse setup` in the JVM's own format, so that every later driver maps them
from one file instead of finding, parsing and verifying them in hundreds of jars.

Measured on the 2-core machine (`lakehouse pipeline --available-now`, a new lake, 50 readings, three runs each):
the Spark session started in 4.2-4.6 s instead of 6.2-6.8 s, the tables were ready about 1 s sooner, and the run
took 31-32 s instead of 36 s. Every Spark command pays that start: a pipeline restarted after a crash, `replay`,
`maintain`, `audit`.

The archive belongs to one JDK and one set of pyspark jars (the driver's class path), and is named after them. A
JVM that finds it does not match says so in one warning line and starts without it, slower, nothing else; a driver
started by spark-submit, or when no archive was made, starts as before. It takes about 220 MB.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.errors import SetupError


def _java() -> str | None:
    """The java that pyspark's launcher runs: JAVA_HOME's, else the one on PATH."""
    if os.environ.get("JAVA_HOME"):
        return str(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    return shutil.which("java")


def archive(home: Path) -> Path | None:
    """Where this JDK's and this pyspark's archive is kept under `home` (None without a java)."""
    import pyspark

    java = _java()
    if java is None:
        return None
    jdk = Path(java).resolve()
    key = f"{jdk}\0{jdk.stat().st_mtime_ns if jdk.exists() else 0}\0{pyspark.__version__}\0{pyspark.__file__}"
    return home.resolve() / "jvm" / f"spark-driver-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsa"


def java_options(home: Path) -> list[str]:
    """The driver JVM's option that maps the archive, when `lakehouse setup` made one."""
    path = archive(home)
    return [f"-XX:SharedArchiveFile={path}"] if path is not None and path.is_file() else []


def make(home: Path, force: bool = False) -> Path | None:
    """Make the archive unless it is there: a pipeline batch and a rollups run on a throwaway lake, in a driver
    that writes the classes it loaded when it exits (`-XX:ArchiveClassesAtExit`). None without a java."""
    path = archive(home)
    if path is None or (path.is_file() and not force):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob("spark-driver-*.jsa"):  # another JDK's or pyspark's
        stale.unlink()
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.jvm.classes", str(home), str(partial)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise SetupError(f"the Spark driver's class archive could not be made:\n{result.stderr[-4000:]}")
    partial.rename(path)
    return path


def _load_classes(home: Path, target: Path) -> None:
    """Run what a pipeline runs, on a throwaway lake, in a driver that archives its classes into `target` at exit;
    return once that JVM has exited."""
    from datetime import UTC, datetime

    from pyspark import SparkContext

    from lake.settings import Settings
    from lake.tables import LakePaths
    from pipeline.stream.job import IngestJob, start_rollups
    from pipeline.stream.spark import build_session, jvm_memory_bounds
    from pipeline.stream.tables import create_tables

    with tempfile.TemporaryDirectory(prefix="lakehouse-classes-") as folder:
        settings = Settings(home=home, lake_root=str(Path(folder) / "lake"), spark_master="local[2]")
        options = ["-Dio.netty.tryReflectionSetAccessible=true", *jvm_memory_bounds(settings)[0]]
        options.append(f"-XX:ArchiveClassesAtExit={target}")
        spark = build_session(settings, "kpi-lakehouse-classes", {"spark.driver.extraJavaOptions": " ".join(options)})
        paths = LakePaths.from_settings(settings)
        create_tables(spark, paths)
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        values = [
            b'{"device_id":"d-1","timestamp":"%s","value":1.5}' % stamp.encode(),
            b'{"device_id":"d-2","readings":[{"timestamp":"%s","value":2},{"timestamp":"x","value":3}]}'
            % stamp.encode(),
            b"not json",
        ]
        records = spark.createDataFrame(
            [("classes", 0, offset, now, b"d", value) for offset, value in enumerate(values)],
            "topic STRING, `partition` INT, `offset` BIGINT, kafka_timestamp TIMESTAMP, key BINARY, value BINARY",
        )
        job = IngestJob(spark, settings, paths, None, "kpi-lakehouse-classes")
        job.process_batch(records, 0)
        job.process_batch(records, 1)  # the same readings again: silver's update road
        start_rollups(spark, settings, paths, available_now=True).awaitTermination()
        spark.stop()
        # The JVM writes the archive as it exits, which it does when its standard input closes.
        gateway = SparkContext._gateway
        process = getattr(gateway, "proc", None)
        if process is None or process.stdin is None:
            raise SetupError("pyspark did not start the driver JVM itself; no class archive is made")
        process.stdin.close()
        process.wait(timeout=600)


if __name__ == "__main__":
    _load_classes(Path(sys.argv[1]), Path(sys.argv[2]))
