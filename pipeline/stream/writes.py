"""The lake's Delta writes: bronze and quarantine appends, silver, gold and rollups MERGEs, each exactly once.

An append carries the ingest query's stable app id and the batch id (`txnAppId`/`txnVersion`), so a batch that
Spark re-runs after a crash skips the appends that already committed. The MERGEs into silver, gold and the rollups
are idempotent by their data (identity and record order in silver, recomputes elsewhere), in a micro-batch and in
`lakehouse replay` alike. The one session conf set here is the commitInfo's `userMetadata` that records the
watermark on gold's commits (lake.watermark), set and unset around them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lake import checkpoint, deltalog, watermark
from lake.conflicts import retry_on_conflict
from lake.rows import first_row
from lake.tables import LakePaths, Table
from lake.watermark import Watermark
from pipeline.stream import dedupe, kpi, rollups

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger("lakehouse.pipeline")
# Past this many distinct seconds in one batch (a backlog), all of them are treated as held by silver.
CLASSIFIED_SECONDS = 10_000
_GOLD_FROM_BATCH_READINGS = 1_000_000


@dataclass
class LakeWriter:
    """Writes to one lake; appends take their app id from the ingest query's checkpoint on first use."""

    spark: SparkSession
    paths: LakePaths
    app_id: str | None = None

    def _app_id(self) -> str:
        # The checkpoint's `metadata` file holds the query id, which stays the same across restarts on the same
        # checkpoint and is new for a new checkpoint: exactly what Delta's idempotent writes need.
        if self.app_id is None:
            metadata = checkpoint.ingest_checkpoint(self.paths) + "/metadata"
            line = first_row(self.spark.read.text(metadata), f"the checkpoint's {metadata}")
            self.app_id = "kpi-lakehouse-" + json.loads(line[0])["id"]
        return self.app_id

    def app_id_of_query(self) -> str:
        """The ingest query's stable id (see `append`)."""
        return self._app_id()

    def recorded_watermark(self) -> Watermark:
        """The watermark of gold's newest commit that records one (lake.watermark)."""
        from delta.tables import DeltaTable

        history = DeltaTable.forPath(self.spark, self.paths.table(Table.GOLD)).history(watermark.LOOK_BACK)
        for row in history.select("userMetadata").collect():
            found = watermark.parse(row[0])
            if found is not None:
                return found
        return watermark.NONE

    def append(self, frame: DataFrame, table: Table, batch_id: int) -> None:
        writer = (
            frame.write.format("delta").mode("append").option("txnAppId", self._app_id()).option("txnVersion", batch_id)
        )
        # A concurrent `lakehouse maintain` may conflict; the write is idempotent, so it is simply tried again.
        retry_on_conflict(lambda: writer.save(self.paths.table(table)), f"append to {table.value}")

    def readings(
        self,
        readings: DataFrame,
        count: int,
        lo: str,
        hi: str,
        touched: list[int] | None,
        committed: Callable[[str], None],
        mark: Watermark = watermark.NONE,
        arrival_us: int | None = None,
    ) -> None:
        """Write `count` valid readings into silver and their seconds' KPIs into gold; `committed(stage)` runs after
        each stage that wrote ("silver", "gold"). `touched` lists the readings' seconds (Unix
        microseconds, up to CLASSIFIED_SECONDS + 1 of them) when the caller knows them already. Gold's commits
        record the watermark `mark`; each reading records the one it arrived at, `arrival_us` (Unix microseconds,
        None before the first).

        The seconds silver held before decide the work. In a second silver did not hold, every reading is a new
        identity and the second's KPIs are the batch's own: they go into gold first, by an insert-only MERGE, since
        answers wait for gold; when the batch holds only such seconds, its readings then go into silver by another
        (an anti-join and an append, no file rewritten). Only a second silver held can hold a duplicate or a
        correction: a batch with one MERGEs its readings with an update clause too (a row changes only for a later
        record with another value, though Delta rewrites every file holding a matched row), and the KPIs of the
        seconds silver held are recomputed from silver after that.

        Every MERGE here is idempotent by its data (identity and record order in silver, a recompute from silver in
        gold), so none carries a `txnVersion`, whose check costs a replay of the table's log per commit. A batch
        run again after a crash finds the seconds it inserted into gold still new in silver (cut before silver's
        commit), or its readings in silver (cut after), and takes the second road for all of them. A commit that
        conflicts with another writer's (`lakehouse replay`, `maintain`) starts the whole again from the
        classification, which the other writer's readings may have changed; another writer's commit to silver
        between the classification and silver's MERGE, which Delta does not see as a conflict, makes every second
        held (`_write_readings`).
        """
        from pyspark.sql import functions as F

        # Not cached: the MERGE into silver materializes its source itself, and a second copy of a backlog batch
        # of a million readings ran a 1 GiB heap out of memory (tests/test_backlog.py). Gold's KPIs of new seconds
        # deduplicate the batch again, which costs little beside the MERGE for the batches that take that road.
        arrived = None if arrival_us is None else F.timestamp_micros(F.lit(arrival_us))
        readings = readings.withColumn("arrival_watermark", F.lit(arrived).cast("timestamp"))
        latest = dedupe.latest_per_identity(readings)
        if touched is None:
            second = F.unix_micros(F.date_trunc("second", "timestamp"))
            touched = [row[0] for row in readings.select(second).distinct().limit(CLASSIFIED_SECONDS + 1).collect()]
        # A backlog's batch: its gold rows come from silver's new files (a scan of three Parquet columns) rather
        # than from its own deduplicated readings: aggregating a batch of 19 million of them took 43 s, where
        # the recompute from silver took about 10.
        from_batch = count <= _GOLD_FROM_BATCH_READINGS
        seconds = touched
        # Gold's commits carry the watermark; the session conf is unset again at once. The rollups query runs in a
        # session of its own; bronze's append, beside these writes in a small batch, may carry the value too, on
        # bronze's commit, where nothing reads it.
        self.spark.conf.set(watermark.USER_METADATA_CONF, mark.user_metadata())
        try:
            retry_on_conflict(
                lambda: self._write_readings(readings, latest, from_batch, lo, hi, seconds, committed),
                "write readings",
            )
        finally:
            self.spark.conf.unset(watermark.USER_METADATA_CONF)

    def _write_readings(
        self,
        readings: DataFrame,
        latest: DataFrame,
        from_batch: bool,
        lo: str,
        hi: str,
        touched: list[int],
        committed: Callable[[str], None],
    ) -> None:
        from delta.tables import DeltaTable
        from pyspark.sql import functions as F

        second = F.unix_micros(F.date_trunc("second", "timestamp"))
        silver_path = self.paths.table(Table.SILVER)
        # Silver's version before the classification, looked up by commit file name (a stat or two): the query
        # below is a plain read outside the MERGE's transaction, so another writer's commit after it (see below)
        # is told by the version the MERGE lands on.
        before = deltalog.latest_version(silver_path)
        if len(touched) > CLASSIFIED_SECONDS:  # treating a second as held is always exact, only slower
            held, any_new, any_held = F.lit(True), False, True
        else:
            stored = kpi.whole_seconds(self.spark.read.format("delta").load(silver_path), lo, hi)
            found = stored.select(second.alias("second")).where(F.col("second").isin(touched)).distinct()
            held_seconds = [row[0] for row in found.collect()]
            held = second.isin(held_seconds)
            any_new, any_held = len(held_seconds) < len(touched), bool(held_seconds)

        if any_new and from_batch:
            # Before silver: the KPIs of a second silver did not hold are the batch's own, and answers wait for
            # gold, not silver. Cut between the two commits, the batch run again finds the same seconds new and
            # its insert-only MERGE finds their rows in gold already.
            gold = DeltaTable.forPath(self.spark, self.paths.table(Table.GOLD)).alias("t")
            new = kpi.kpis_per_second(latest.where(~held)).localCheckpoint(eager=True)
            gold.merge(new.alias("s"), kpi.gold_merge_condition(lo, hi)).whenNotMatchedInsertAll().execute()
            committed("gold")

        self._merge_silver(latest, lo, hi, corrections=any_held)
        committed("silver")

        after = None if before is None else deltalog.latest_version(silver_path, before.version)
        if after is not None and before is not None and after.version > before.version + 1:
            # Another writer (`lakehouse replay`) committed to silver between the classification and this MERGE:
            # a second taken as new may hold its readings, and a correction of one of them was not applied. Every
            # second is then taken as held, which is always exact: silver MERGEd again with corrections, and every
            # second's KPIs recomputed from silver.
            log.info(
                "silver went from version %d to %d under a write: every second is recomputed",
                before.version,
                after.version,
            )
            if not any_held:
                self._merge_silver(latest, lo, hi, corrections=True)
            any_held, held = True, F.lit(True)

        if any_held or not from_batch:
            recompute = readings if not from_batch else readings.where(held)
            seconds = recompute.select(F.date_trunc("second", "timestamp").alias("second")).distinct()
            silver = self.spark.read.format("delta").load(silver_path)
            # MERGE reads its source more than once; compute the held seconds' KPIs once (a row per second).
            recomputed = kpi.kpis_for_seconds(silver, seconds, lo, hi).localCheckpoint(eager=True)
            self._upsert(Table.GOLD, recomputed, kpi.gold_merge_condition(lo, hi), kpi.GOLD_CHANGED)
            committed("gold")

    def _merge_silver(self, latest: DataFrame, lo: str, hi: str, corrections: bool) -> None:
        """MERGE the batch's newest reading per identity into silver: new identities inserted, and with
        `corrections` a stored reading replaced by a later record's other value."""
        from delta.tables import DeltaTable

        target = DeltaTable.forPath(self.spark, self.paths.table(Table.SILVER)).alias("t")
        merge = target.merge(latest.alias("s"), dedupe.merge_condition(lo, hi))
        if corrections:
            # A held second is shared by many devices' new readings as often as it holds a re-sent one (a fleet's
            # batches overlap in time): one MERGE that inserts the new and corrects the changed. A second MERGE
            # for the corrections alone took 35 s of a 96 s batch of a million readings that had none.
            merge = merge.whenMatchedUpdateAll(condition=dedupe.newer_and_different())
        merge.whenNotMatchedInsertAll().execute()

    def _upsert(self, table: Table, fresh: DataFrame, condition: str, changed: str) -> None:
        """MERGE recomputed rows into `table`: a row whose values changed is updated, a new one inserted."""
        from delta.tables import DeltaTable

        target = DeltaTable.forPath(self.spark, self.paths.table(table))
        values: dict[str, str | Column] = {f"`{c}`": f"s.`{c}`" for c in fresh.columns if c != "revision"}
        # One more revision of a row that changed; a row from before fingerprints were kept takes its first.
        values["`revision`"] = "coalesce(t.revision, 0) + CASE WHEN t.fingerprint IS NULL THEN 0 ELSE 1 END"
        merge = (
            target.alias("t")
            .merge(fresh.alias("s"), condition)
            .whenMatchedUpdate(condition=changed, set=values)
            .whenNotMatchedInsertAll()
        )
        merge.execute()

    def rollups(self, readings: DataFrame, lo: str, hi: str) -> None:
        """Recompute the rollup buckets these readings fall into (silver holds them already), and MERGE them."""

        def recompute_and_merge() -> None:
            silver = self.spark.read.format("delta").load(self.paths.table(Table.SILVER))
            stored = self.spark.read.format("delta").load(self.paths.table(Table.ROLLUPS))
            # Computed once from the table as it stands, before the MERGE reads its source; again after a conflict.
            fresh = rollups.for_batch(silver, stored, readings, lo, hi).localCheckpoint(eager=True)
            self._upsert(Table.ROLLUPS, fresh, rollups.merge_condition(lo, hi), rollups.CHANGED)

        retry_on_conflict(recompute_and_merge, "MERGE into rollups")
