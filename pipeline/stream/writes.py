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
from lake.upgrade import SILVER_METRIC
from lake.watermark import Watermark
from pipeline.stream import dedupe, kpi, rollups
from pipeline.stream.spark import SMALL_BATCH_ROWS

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger("lakehouse.pipeline")
# Past this many distinct seconds in one batch (a backlog), all of them are treated as held by silver.
CLASSIFIED_SECONDS = 10_000
_GOLD_FROM_BATCH_READINGS = 1_000_000


def read_silver(spark: SparkSession, paths: LakePaths) -> DataFrame:
    """Silver, its readings written before metrics (a null metric, lake.upgrade) read as metric `value`."""
    from pyspark.sql import functions as F

    silver = spark.read.format("delta").load(paths.table(Table.SILVER))
    return silver.withColumn("metric", F.expr(SILVER_METRIC))


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
        """The watermark of gold's newest commit that records one, or else the one kept in gold's table property
        past log cleanup (lake.watermark)."""
        found = self.newest_entry(Table.GOLD)
        return found if found is not None else watermark.kept(self.paths.table(Table.GOLD))

    def newest_entry(self, table: Table) -> Watermark | None:
        """The watermark entry of the table's newest commit that records one: the stream's commits to silver carry
        the same entry as its commits to gold."""
        from delta.tables import DeltaTable

        history = DeltaTable.forPath(self.spark, self.paths.table(table)).history(watermark.LOOK_BACK)
        for row in history.select("userMetadata").collect():
            found = watermark.parse(row[0])
            if found is not None:
                return found
        return None

    def silver(self) -> DataFrame:
        """Silver's readings, each with its metric (a reading written before metrics reads as `value`)."""
        return read_silver(self.spark, self.paths)

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
        mark: Watermark | None = None,
        arrival_us: int | None = None,
        first_run: tuple[int, int] | None = None,
    ) -> None:
        """Write `count` valid readings into silver and their seconds' KPIs into gold; `committed(stage)` runs after
        each stage that wrote ("silver", "gold"). `touched` lists the readings' seconds (Unix
        microseconds, up to CLASSIFIED_SECONDS + 1 of them) when the caller knows them already. Gold's commits
        record the watermark `mark`; each reading records the one it arrived at, `arrival_us` (Unix microseconds,
        None before the first); only the stream passes `mark`. `first_run`: the batch is run again after a crash that
        followed its first commit (gold's, or silver's in a backlog's batch), whose readings lay between these times (Unix microseconds; `lo` and `hi` cover
        them): gold's seconds there are recomputed from silver too, and those silver holds nothing in go.

        Gold goes first, since answers wait for it: the KPIs of each second the batch touched are computed from
        silver's readings in it with the batch's MERGEd in as silver's MERGE will (`kpi.kpis_after_merge`), and
        MERGEd into gold; then the readings go into silver. A second silver did not hold holds only new
        identities: when the batch holds only such seconds, both MERGEs are insert-only (an anti-join and an
        append, no file rewritten). Only a second silver held can hold a duplicate or a correction: a batch with
        one MERGEs gold with an update clause, and silver too (a row changes only for a later record with another
        value, though Delta rewrites every file holding a matched row). A backlog's batch (past a million readings
        or CLASSIFIED_SECONDS seconds) writes silver first, then recomputes its seconds' KPIs from silver.

        Every MERGE here is idempotent by its data (identity and record order in silver, KPIs of silver's readings
        in gold), so none carries a `txnVersion`, whose check costs a replay of the table's log per commit. A batch
        run again after a crash between gold's commit and silver's computes the same KPIs from the same silver;
        after silver's, it finds its readings there and changes nothing. A commit that conflicts with another
        writer's (`lakehouse replay`, `maintain`) starts the whole again from silver's read, which the other
        writer's readings may have changed; another writer's commit to silver between that read and silver's
        MERGE, which Delta does not see as a conflict, is told by silver's version and makes the batch recompute
        gold from silver (`_write_readings`).
        """
        from pyspark.sql import functions as F

        # Not cached: the MERGE into silver materializes its source itself, and a second copy of a backlog batch
        # of a million readings ran a 1 GiB heap out of memory (tests/test_backlog.py). Gold's KPIs deduplicate
        # the batch again, which costs little beside the MERGE for the batches that take that road.
        arrived = None if arrival_us is None else F.timestamp_micros(F.lit(arrival_us))
        readings = readings.withColumn("arrival_watermark", F.lit(arrived).cast("timestamp"))
        if count >= SMALL_BATCH_ROWS:
            latest = dedupe.latest_of_large_batch(readings, count)
        else:
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
        if mark is not None:
            self.spark.conf.set(watermark.USER_METADATA_CONF, mark.user_metadata())
        try:
            retry_on_conflict(
                lambda: self._write_readings(readings, latest, from_batch, lo, hi, seconds, committed, first_run),
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
        first_run: tuple[int, int] | None,
    ) -> None:
        from delta.tables import DeltaTable
        from pyspark.sql import functions as F

        silver_path = self.paths.table(Table.SILVER)
        # Silver's version before its read, looked up by commit file name (a stat or two): the read is outside the
        # MERGE's transaction, so another writer's commit after it (see below) is told by the version the MERGE
        # lands on.
        before = deltalog.latest_version(silver_path)
        classified = len(touched) <= CLASSIFIED_SECONDS  # past it, every second is taken as held: exact, slower
        # A batch run again after its first commit goes silver first, then recomputes gold: gold's MERGE from the
        # batch alone would keep the first run's rows of seconds this run no longer yields.
        gold_first = from_batch and classified and first_run is None
        if gold_first:
            # Gold first, for every second the batch touched: answers wait for gold, not silver. A second's KPIs
            # are those of silver's readings in it as the MERGE below leaves them, computed before it.
            silver = self.silver()
            fresh = kpi.kpis_after_merge(silver, latest, touched, lo, hi)
            fresh = fresh.localCheckpoint(eager=True)  # a row per second, which MERGE reads more than once
            corrections = bool(fresh.where("held").limit(1).collect())
            fresh, condition = fresh.drop("held"), kpi.gold_merge_condition(lo, hi)
            if corrections:
                self._upsert(Table.GOLD, fresh, condition, kpi.GOLD_CHANGED)
            else:  # seconds silver did not hold: an insert-only MERGE, an anti-join and an append
                gold = DeltaTable.forPath(self.spark, self.paths.table(Table.GOLD)).alias("t")
                gold.merge(fresh.alias("s"), condition).whenNotMatchedInsertAll().execute()
            committed("gold")
        else:  # a backlog's batch: silver first, then gold from silver's new files
            corrections = not classified or self._holds_any(silver_path, touched, lo, hi)
        self._merge_silver(latest, lo, hi, corrections)
        committed("silver")

        after = None if before is None else deltalog.latest_version(silver_path, before.version)
        raced = after is not None and before is not None and after.version > before.version + 1
        if raced:
            # Another writer (`lakehouse replay`) committed to silver between the read and this MERGE: a second
            # may hold its readings, and a correction of one of them may not have been applied. Every second is
            # then taken as held: silver MERGEd again with corrections, and gold recomputed from silver.
            log.info("silver went from version %s to %s under a write: gold is recomputed", before, after)
            if not corrections:
                self._merge_silver(latest, lo, hi, corrections=True)
        if raced or not gold_first:
            seconds = readings.select(F.date_trunc("second", "timestamp").alias("second")).distinct()
            self._recompute_gold(seconds, lo, hi, first_run)
            committed("gold")

    def recompute_gold(self, first_run: tuple[int, int]) -> None:
        """Gold's seconds between the first run's bounds (Unix microseconds) recomputed from silver, for a batch
        run again after its gold commit that now yields no readings at all."""
        lo, hi = (f"timestamp_micros({bound})" for bound in first_run)
        retry_on_conflict(lambda: self._recompute_gold(None, lo, hi, first_run), "recompute gold")

    def _recompute_gold(self, seconds: DataFrame | None, lo: str, hi: str, first_run: tuple[int, int] | None) -> None:
        """Recompute from silver the KPIs of `seconds` (a `second` column), and with `first_run` of every second gold
        holds between its bounds, deleting those silver holds nothing in; `lo` and `hi` bound them all."""
        from pyspark.sql import functions as F

        silver = self.silver()
        gone = None
        if first_run is not None:
            # Every second of the first run's range that gold or silver holds: gold's may have lost their readings,
            # and silver's may lack gold's row (a batch that wrote silver first).
            first_lo, first_hi = (f"timestamp_micros({bound})" for bound in first_run)
            gone = f"t.`timestamp` >= date_trunc('second', {first_lo}) AND t.`timestamp` <= {first_hi}"
            gold = self.spark.read.format("delta").load(self.paths.table(Table.GOLD)).alias("t")
            held = gold.where(gone).select(F.col("timestamp").alias("second"))
            read = silver.alias("t").where(gone).select(F.date_trunc("second", "timestamp").alias("second"))
            held = held.unionByName(read)
            seconds = (held if seconds is None else seconds.unionByName(held)).distinct()
        assert seconds is not None
        # MERGE reads its source more than once; compute the seconds' KPIs once (a row per second).
        recomputed = kpi.kpis_for_seconds(silver, seconds, lo, hi).localCheckpoint(eager=True)
        self._upsert(Table.GOLD, recomputed, kpi.gold_merge_condition(lo, hi), kpi.GOLD_CHANGED, gone)

    def _holds_any(self, silver_path: str, seconds: list[int], lo: str, hi: str) -> bool:
        """Whether silver holds a reading in one of the given seconds (Unix microseconds)."""
        silver = self.silver()
        return bool(kpi.in_seconds(silver, seconds, lo, hi).limit(1).collect())

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

    def _upsert(self, table: Table, fresh: DataFrame, condition: str, changed: str, gone: str | None = None) -> None:
        """MERGE recomputed rows into `table`: a row whose values changed is updated, a new one inserted, and one
        that `fresh` lacks deleted where `gone` holds."""
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
        if gone is not None:
            merge = merge.whenNotMatchedBySourceDelete(condition=gone)
        merge.execute()

    def rollups(self, readings: DataFrame, lo: str, hi: str, read_stored_once: bool = False) -> None:
        """Recompute the rollup buckets these readings fall into (silver holds them already), and MERGE them
        (`read_stored_once`: see `rollups.for_batch`)."""

        def recompute_and_merge() -> None:
            silver = self.silver()
            stored = self.spark.read.format("delta").load(self.paths.table(Table.ROLLUPS))
            # Computed once from the table as it stands, before the MERGE reads its source; again after a conflict.
            fresh = rollups.for_batch(silver, stored, readings, lo, hi, read_stored_once).localCheckpoint(eager=True)
            self._upsert(Table.ROLLUPS, fresh, rollups.merge_condition(lo, hi), rollups.CHANGED)

        retry_on_conflict(recompute_and_merge, "MERGE into rollups")
