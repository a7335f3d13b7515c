"""Creates the lake's Delta tables (idempotently) from the schemas that `lake.tables` owns."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lake.tables import SCHEMAS, LakePaths, Table

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_PROPERTIES: dict[Table, dict[str, str]] = {
    # Bronze is the record of what Kafka held: rows are only ever added.
    Table.BRONZE: {"delta.appendOnly": "true"},
}

# Readers ask for one grain at a time; three partitions keep them apart.
_PARTITIONS: dict[Table, tuple[str, ...]] = {Table.ROLLUPS: ("grain",)}


def create_tables(spark: SparkSession, paths: LakePaths) -> None:
    """Create each table that is missing, and add the columns a table made by an earlier release lacks. The tables
    are independent, so they are made or checked at once, in threads of their own (the driver's planning and log
    reads overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(SCHEMAS), thread_name_prefix="lakehouse-tables") as pool:
        for done in [pool.submit(_create_table, spark, paths, table, ddl) for table, ddl in SCHEMAS.items()]:
            done.result()


def _create_table(spark: SparkSession, paths: LakePaths, table: Table, ddl: str) -> None:
    from delta.tables import DeltaTable
    from pyspark.sql.types import StructType

    schema = StructType.fromDDL(ddl)
    if not isinstance(schema, StructType):  # fromDDL gives a struct for a list of columns
        raise TypeError(f"the {table.value} schema is not a list of columns: {ddl}")
    builder = DeltaTable.createIfNotExists(spark).location(paths.table(table)).addColumns(schema)
    if table in _PARTITIONS:
        builder = builder.partitionedBy(*_PARTITIONS[table])
    for key, value in _PROPERTIES.get(table, {}).items():
        builder = builder.property(key, value)
    existing = builder.execute().toDF().schema.fieldNames()
    # A table made by an earlier release gains the columns added since (nullable, null in its old rows).
    missing = [f for f in schema.fields if f.name not in existing]
    if missing:
        columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
        spark.sql(f"ALTER TABLE delta.`{paths.table(table)}` ADD COLUMNS ({columns})")
