"""Creates the lake's Delta tables (idempotently) from the schemas that `lake.tables` owns."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lake import upgrade
from lake.tables import SCHEMAS, LakePaths, Table

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_PROPERTIES: dict[Table, dict[str, str]] = {
    # Bronze is the record of what Kafka held: rows are only ever added.
    Table.BRONZE: {"delta.appendOnly": "true"},
}
# Delta's table property naming the columns whose minimum, maximum and null count each file's entry records, for
# data skipping (by default the first 32). Readers filter silver by device, metric, time and value; its Kafka
# coordinates and bookkeeping times are read whole. Stats on silver's 11 columns took a sixth of its write.
STATS_COLUMNS = "delta.dataSkippingStatsColumns"
# Properties that a table made by an earlier release is given too (each an ALTER, once).
_KEPT_PROPERTIES: dict[Table, dict[str, str]] = {Table.SILVER: {STATS_COLUMNS: "device_id,metric,timestamp,value"}}

# Readers ask for one grain at a time; three partitions keep them apart.
_PARTITIONS: dict[Table, tuple[str, ...]] = {Table.ROLLUPS: ("grain",)}


# Delta's table property: a commit whose version is a multiple of it writes a checkpoint of the table's state
# before the commit returns (Delta's default is every 10 commits).
CHECKPOINT_INTERVAL = "delta.checkpointInterval"


def create_tables(spark: SparkSession, paths: LakePaths, checkpoint_interval: int | None = None) -> None:
    """Create each table that is missing, and add the columns a table made by an earlier release lacks; with
    `checkpoint_interval`, give each table that checkpoint interval (a table that has another is altered). The
    tables are independent, so they are made or checked at once, in threads of their own (the driver's planning and
    log reads overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    # A lake written before metrics is upgraded first, by the one code that does it for every entry point.
    upgrade.upgrade_lake(paths)
    with ThreadPoolExecutor(max_workers=len(SCHEMAS), thread_name_prefix="lakehouse-tables") as pool:
        made = [pool.submit(_create_table, spark, paths, t, ddl, checkpoint_interval) for t, ddl in SCHEMAS.items()]
        for done in made:
            done.result()


def _create_table(
    spark: SparkSession, paths: LakePaths, table: Table, ddl: str, checkpoint_interval: int | None
) -> None:
    from delta.tables import DeltaTable
    from pyspark.sql.types import StructType

    schema = StructType.fromDDL(ddl)
    if not isinstance(schema, StructType):  # fromDDL gives a struct for a list of columns
        raise TypeError(f"the {table.value} schema is not a list of columns: {ddl}")
    builder = DeltaTable.createIfNotExists(spark).location(paths.table(table)).addColumns(schema)
    if table in _PARTITIONS:
        builder = builder.partitionedBy(*_PARTITIONS[table])
    # A table made now has its `metric` column: no upgrade to do (lake.upgrade).
    kept = dict(_KEPT_PROPERTIES.get(table, {}))
    if checkpoint_interval is not None:
        kept[CHECKPOINT_INTERVAL] = str(checkpoint_interval)
    properties = upgrade.mark_new(_PROPERTIES.get(table, {})) | kept
    for key, value in properties.items():
        builder = builder.property(key, value)
    made = builder.execute()
    existing = made.toDF().schema.fieldNames()
    # A table made before, or with another checkpoint interval: one metadata commit, when a property changed.
    stored = made.detail().select("properties").first() if kept else None
    held = stored[0] if stored is not None else {}
    changed = {key: value for key, value in kept.items() if held.get(key) != value}
    if changed:
        listed = ", ".join(f"'{key}' = '{value}'" for key, value in changed.items())
        spark.sql(f"ALTER TABLE delta.`{paths.table(table)}` SET TBLPROPERTIES ({listed})")
    # A table made by an earlier release gains the columns added since (nullable, null in its old rows).
    missing = [f for f in schema.fields if f.name not in existing]
    if missing:
        columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
        spark.sql(f"ALTER TABLE delta.`{paths.table(table)}` ADD COLUMNS ({columns})")
