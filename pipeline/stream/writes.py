"""The lake's Delta writes: bronze and quarantine appends, silver, gold and rollups MERGEs, each exactly once.

A write made for a micro-batch carries the query's stable app id and the batch id (`txnAppId`/`txnVersion`), so a
batch that Spark re-runs after a crash skips the writes that already committed. A write made outside a micro-batch
(`lakehouse replay`) passes no batch id: its MERGEs are idempotent by themselves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lake import checkpoint
from lake.conflicts import retry_on_conflict
from lake.rows import first_row
from lake.tables import LakePaths, Table
from pipeline.stream import dedupe, kpi, rollups

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

_TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
_TXN_VERSION = "spark.databricks.delta.write.txnVersion"


@dataclass
class LakeWriter:
    """Writes to one lake for one streaming query; the app id comes from that query's checkpoint on first use."""

    spark: SparkSession
    paths: LakePaths
    app_id: str | None = None
    query: str = checkpoint.INGEST_QUERY

    def _app_id(self) -> str:
        # The checkpoint's `metadata` file holds the query id, which stays the same across restarts on the same
        # checkpoint and is new for a new checkpoint: exactly what Delta's idempotent writes need.
        if self.app_id is None:
            metadata = self.paths.checkpoint(self.query) + "/metadata"
            line = first_row(self.spark.read.text(metadata), f"the checkpoint's {metadata}")
            self.app_id = "kpi-lakehouse-" + json.loads(line[0])["id"]
        return self.app_id

    def append(self, frame: DataFrame, table: Table, batch_id: int) -> None:
        writer = (
            frame.write.format("delta").mode("append").option("txnAppId", self._app_id()).option("txnVersion", batch_id)
        )
        # A concurrent `lakehouse maintain` may conflict; the write is idempotent, so it is simply tried again.
        retry_on_conflict(lambda: writer.save(self.paths.table(table)), f"append to {table.value}")

    def _merge(self, batch_id: int | None, table: Table, run_merge: Callable[[], object]) -> None:
        if batch_id is None:  # not a micro-batch (replay): the MERGE itself is idempotent
            retry_on_conflict(run_merge, f"MERGE into {table.value}")
            return
        conf = self.spark.conf
        conf.set(_TXN_APP_ID, self._app_id())
        conf.set(_TXN_VERSION, str(batch_id))
        try:
            retry_on_conflict(run_merge, f"MERGE into {table.value}")
        finally:
            conf.unset(_TXN_APP_ID)
            conf.unset(_TXN_VERSION)

    def silver(self, readings: DataFrame, batch_id: int | None, lo: str, hi: str) -> None:
        """MERGE readings into silver: new identities inserted, corrections from later records applied."""
        from delta.tables import DeltaTable

        latest = dedupe.latest_per_identity(readings)
        silver = DeltaTable.forPath(self.spark, self.paths.table(Table.SILVER))
        merge = (
            silver.alias("t")
            .merge(latest.alias("s"), dedupe.merge_condition(lo, hi))
            .whenMatchedUpdateAll(condition=dedupe.newer_and_different())
            .whenNotMatchedInsertAll()
        )
        self._merge(batch_id, Table.SILVER, merge.execute)

    def _upsert(self, table: Table, fresh: DataFrame, condition: str, changed: str, batch_id: int | None) -> None:
        """MERGE recomputed rows into `table`: a row whose values changed is updated, a new one inserted."""
        from delta.tables import DeltaTable

        target = DeltaTable.forPath(self.spark, self.paths.table(table))
        merge = (
            target.alias("t")
            .merge(fresh.alias("s"), condition)
            .whenMatchedUpdateAll(condition=changed)
            .whenNotMatchedInsertAll()
        )
        self._merge(batch_id, table, merge.execute)

    def gold(self, readings: DataFrame, batch_id: int | None, lo: str, hi: str) -> None:
        """Recompute from silver the KPIs of the seconds these readings touch, and MERGE them into gold."""
        from pyspark.sql import functions as F

        seconds = readings.select(F.date_trunc("second", "timestamp").alias("second")).distinct()
        silver = self.spark.read.format("delta").load(self.paths.table(Table.SILVER))
        # MERGE reads its source more than once; compute the touched seconds' KPIs once (one row per second).
        fresh = kpi.kpis_for_seconds(silver, seconds, lo, hi).localCheckpoint(eager=True)
        self._upsert(Table.GOLD, fresh, kpi.gold_merge_condition(lo, hi), kpi.GOLD_CHANGED, batch_id)

    def rollups(self, readings: DataFrame, batch_id: int | None, lo: str, hi: str) -> None:
        """Recompute the rollup buckets these readings fall into (silver holds them already), and MERGE them."""
        silver = self.spark.read.format("delta").load(self.paths.table(Table.SILVER))
        stored = self.spark.read.format("delta").load(self.paths.table(Table.ROLLUPS))
        # Computed once from the table as it stands, before the MERGE reads its source.
        fresh = rollups.for_batch(silver, stored, readings, lo, hi).localCheckpoint(eager=True)
        self._upsert(Table.ROLLUPS, fresh, rollups.merge_condition(lo, hi), rollups.CHANGED, batch_id)
