"""The pipeline's tables take the checkpoint interval of the settings, and silver its stats columns: made with them,
or altered to them once."""

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


def test_silver_records_stats_of_the_columns_readers_filter_on(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    from pipeline.stream.tables import STATS_COLUMNS, create_tables

    paths = LakePaths.from_settings(Settings(lake_root=str(tmp_path / "lake")))
    silver = paths.table(Table.SILVER)
    create_tables(spark, paths)
    made = latest_version(silver)
    assert made is not None and made.version == 0  # made with the property, in its first commit
    # As an earlier release made it: the property absent, which the next start sets once.
    spark.sql(f"ALTER TABLE delta.`{silver}` UNSET TBLPROPERTIES ('{STATS_COLUMNS}')")
    create_tables(spark, paths)
    create_tables(spark, paths)
    assert latest_version(silver).version == 2  # type: ignore[union-attr]

    from pyspark.sql import functions as F

    row = spark.createDataFrame(
        [("pump-1", "flow", 1.5, "t", 0, 7, 0)],
        "device_id STRING, metric STRING, value DOUBLE, topic STRING, partition INT, offset BIGINT, reading_index INT",
    ).select(
        "*",
        F.current_timestamp().alias("timestamp"),
        F.current_timestamp().alias("kafka_timestamp"),
        F.current_timestamp().alias("arrival_watermark"),
        F.current_timestamp().alias("updated_at"),
    )
    row.write.format("delta").mode("append").save(silver)
    commit = (Path(silver) / "_delta_log" / f"{3:020d}.json").read_text().splitlines()
    (stats,) = [json.loads(json.loads(line)["add"]["stats"]) for line in commit if '"add"' in line]
    assert stats["numRecords"] == 1
    assert set(stats["minValues"]) == {"device_id", "metric", "timestamp", "value"}
    assert stats["minValues"]["metric"] == "flow" and stats["maxValues"]["value"] == 1.5
