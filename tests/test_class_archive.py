"""The Spark driver's class archive (pipeline.jvm.classes), made by `lakehouse setup` (which `make test` runs): a
driver started through `build_session` maps Spark's and Delta's classes from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.jvm import classes
from tests.conftest import HOME

pytestmark = [pytest.mark.spark]

_SESSION = """
import sys
from pathlib import Path
from lake.settings import Settings
from pipeline.stream.spark import build_session
spark = build_session(Settings(home=Path(sys.argv[1]), spark_master="local[1]", shuffle_partitions=1))
assert spark.range(5).count() == 5
spark.sql("SELECT 1").write.format("delta").save(sys.argv[2])
spark.stop()
"""


def _loaded_from(log_folder: Path, class_name: str) -> str:
    """Where the driver JVM says it loaded `class_name` from (the JVM's class+load log)."""
    for log in log_folder.glob("load-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if f" {class_name} source: " in line:
                return line.split(" source: ", 1)[1]
    raise AssertionError(f"no JVM loaded {class_name}")


def test_the_driver_maps_spark_and_delta_classes_from_the_archive(tmp_path: Path) -> None:
    archive = classes.archive(HOME)
    assert archive is not None and archive.is_file(), "`lakehouse setup` makes the archive"
    assert classes.java_options(HOME) == [f"-XX:SharedArchiveFile={archive}"]
    # Every JVM of the command logs where each class came from, in a file of its own (%p: its process id).
    env = {"JAVA_TOOL_OPTIONS": f"-Xlog:class+load=info:file={tmp_path}/load-%p.log"}
    result = subprocess.run(
        [sys.executable, "-c", _SESSION, str(HOME), str(tmp_path / "table")],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _loaded_from(tmp_path, "org.apache.spark.sql.classic.SparkSession") == "shared objects file (top)"
    assert _loaded_from(tmp_path, "org.apache.spark.sql.catalyst.analysis.Analyzer") == "shared objects file (top)"
    # Delta's jars reach Spark at run time (spark.jars, a class loader of Spark's): archived as well.
    assert _loaded_from(tmp_path, "org.apache.spark.sql.delta.DeltaLog") == "shared objects file (top)"


def test_no_archive_means_no_option(tmp_path: Path) -> None:
    assert classes.java_options(tmp_path) == []
