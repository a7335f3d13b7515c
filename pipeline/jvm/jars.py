"""Resolves the JVM jars (Delta, Spark's Kafka source and s3a file system, the Kafka broker, S3Proxy) once with Maven
into a local folder."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from pipeline.errors import SetupError

_VERSION_SUFFIX = re.compile(r"-\d[\w.\-]*$")


def _artifact(jar: Path) -> str:
    return _VERSION_SUFFIX.sub("", jar.stem)


def pyspark_jars() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent / "jars"


def spark_jar_dir(home: Path) -> Path:
    return home / "jars" / "spark"


def kafka_jar_dir(home: Path) -> Path:
    return home / "jars" / "kafka"


def s3proxy_jar_dir(home: Path) -> Path:
    return home / "jars" / "s3proxy"


# A jar of each of Spark's needs, by name: `resolve` runs Maven again for a folder resolved before one was added.
_SPARK_MARKERS = ("delta-spark", "spark-sql-kafka", "hadoop-aws")


# What s3a needs (hadoop-aws and what it was built against), beside the jars every session needs. The AWS SDK's
# bundle alone is 686 MB, and Spark copies each jar it is given into a temporary folder per session (left behind
# by a killed driver), so a session is given them only when the lake or its checkpoints are on S3.
_OBJECT_STORE_JARS = ("hadoop-aws-", "bundle-", "analyticsaccelerator-s3-", "wildfly-openssl-")


def spark_jars(home: Path, object_store: bool = True) -> list[Path]:
    """The jars a Spark session is given: all that `lakehouse setup` resolved, without s3a's unless
    `object_store`."""
    jars = sorted(spark_jar_dir(home).glob("*.jar"))
    if not any(j.name.startswith("delta-spark") for j in jars) or not any("sql-kafka" in j.name for j in jars):
        raise SetupError(f"Spark's Delta and Kafka jars are missing under {spark_jar_dir(home)}; run `lakehouse setup`")
    return [j for j in jars if object_store or not j.name.startswith(_OBJECT_STORE_JARS)]


def log4j_config() -> Path:
    return Path(str(resources.files("pipeline.jvm") / "log4j2.properties"))


def fair_scheduler_pools() -> Path:
    return Path(str(resources.files("pipeline.jvm") / "fairscheduler.xml"))


def s3proxy_log_config() -> Path:
    return Path(str(resources.files("pipeline.jvm") / "s3proxy-logback.xml"))


def _copy_dependencies(pom_name: str, target: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise SetupError("Maven (`mvn`) is not on PATH; install it (Debian: apt-get install maven)")
    target = target.resolve()  # Maven resolves a relative outputDirectory against the POM's folder
    pom = Path(str(resources.files("pipeline.jvm") / pom_name))
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    command = [
        mvn,
        "-B",
        "-q",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SetupError(f"Maven could not resolve {pom_name}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)


def resolve(home: Path, force: bool = False) -> dict[str, int]:
    """Fill <home>/jars/{spark,kafka,s3proxy}; Spark's folder keeps only jars that pyspark does not already ship.

    pyspark's own jars (Scala, Jackson, Hadoop, Parquet, ...) are newer than what Delta's POM names, and two
    versions of one library on the classpath break at run time, so those are dropped by artifact name.
    """
    counts: dict[str, int] = {}
    spark_dir = spark_jar_dir(home)
    if force or not all(any(spark_dir.glob(f"{marker}*.jar")) for marker in _SPARK_MARKERS):
        _copy_dependencies("spark-pom.xml", spark_dir)
        shipped = {_artifact(j) for j in pyspark_jars().glob("*.jar")}
        for jar in spark_dir.glob("*.jar"):
            if _artifact(jar) in shipped:
                jar.unlink()
    counts["spark"] = len(list(spark_dir.glob("*.jar")))
    kafka_dir = kafka_jar_dir(home)
    if force or not kafka_dir.is_dir() or not any(kafka_dir.glob("kafka_2.13-*.jar")):
        _copy_dependencies("kafka-pom.xml", kafka_dir)
    counts["kafka"] = len(list(kafka_dir.glob("*.jar")))
    s3proxy_dir = s3proxy_jar_dir(home)
    if force or not any(s3proxy_dir.glob("s3proxy-*.jar")):
        _copy_dependencies("s3proxy-pom.xml", s3proxy_dir)
    counts["s3proxy"] = len(list(s3proxy_dir.glob("*.jar")))
    return counts
