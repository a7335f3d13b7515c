"""The pipeline's tables take the checkpoint interval of the settings: made with it, or altered to it once."""

from __future__ import annotations

from pathlib import Path

import pytest

from lake.deltalog import latest_version
from lake.settings import Settings
from lake.tables import SCHEMAS, LakePaths, Table

pytestmark = pytest.mark.spark


def test_tables_take_the_checkpoint_interval_and_checkpoint_on_it(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.stream.tables import CHECKPOINT_INTERVAL, create_tables

    paths = LakePaths.from_settings(Settings(lake_root=str(tmp_path / "lake")))

    def interval(table: Table) -> str:
        shown = spark.sql(f"SHOW TBLPROPERTIES delta.`{paths.table(table)}` ({CHECKPOINT_INTERVAL})").first()
        return str(shown["value"])

    create_tables(spark, paths)  # as an earlier release made them: Delta's default interval
    assert all(CHECKPOINT_INTERVAL in interval(t) and "does not have" in interval(t) for t in SCHEMAS)
    create_tables(spark, paths, checkpoint_interval=4)
    assert {t: interval(t) for t in SCHEMAS} == dict.fromkeys(SCHEMAS, "4")
    bronze = paths.table(Table.BRONZE)
    found = latest_version(bronze)
    assert found is not None and found.version == 1  # made, then altered once
    create_tables(spark, paths, checkpoint_interval=4)  # the same interval: no commit
    assert latest_version(bronze) == found

    row = spark.createDataFrame(
        [("t", 0, 0, None, None, b"{}")],
        "topic STRING, partition INT, offset BIGINT, kafka_timestamp TIMESTAMP, key BINARY, value BINARY",
    ).selectExpr("*", "current_timestamp() AS ingested_at")
    for _ in range(7):  # versions 2 to 8
        row.write.format("delta").mode("append").save(bronze)
    log = Path(bronze) / "_delta_log"
    assert sorted(int(p.name.split(".")[0]) for p in log.glob("*.checkpoint.parquet")) == [4, 8]

    fresh = LakePaths.from_settings(Settings(lake_root=str(tmp_path / "new-lake")))
    create_tables(spark, fresh, checkpoint_interval=100)  # a new lake: made with it, in its first commit
    assert latest_version(fresh.table(Table.GOLD)).version == 0  # type: ignore[union-attr]
    shown = spark.sql(f"SHOW TBLPROPERTIES delta.`{fresh.table(Table.GOLD)}` ({CHECKPOINT_INTERVAL})").first()
    assert shown["value"] == "100"
