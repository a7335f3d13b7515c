"""The in-place upgrade of a lake written before metrics existed (contract section 7): once, by whichever of the
pipeline, the API or `lakehouse sql` meets it first, without losing or changing an answer.

Each table gains its nullable `metric` column, and then the table property `lakehouse.metrics` that says it is
done; a table that has the property is never touched again, so a crash at any point leaves a lake that the next
start finishes. Per table:
- gold and the rollups: their rows are rewritten once with metric `value` (a delta-rs UPDATE of the rows whose
  metric is null; no reader streams from these tables);
- silver: only the column is added, a metadata commit. Silver is the rollups query's stream source, and a rewrite
  would hand the query every reading ever written again; its old rows keep a null metric, which every reader takes
  as `value` (`SILVER_METRIC`: the views, the pipeline and the API all read it so);
- quarantine: only the column (null: not known);
- and the `metrics` table is made, listing `value` when silver holds readings.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from lake import objectstore
from lake.conflicts import delta_rs_conflicts, retry_on_conflict
from lake.deltars import open_table
from lake.tables import DEFAULT_METRIC, LakePaths, Table

log = logging.getLogger("lakehouse.upgrade")

# A table property: the table has its `metric` column, filled where the table's rows need it.
MARK = "lakehouse.metrics"
DONE = "1"
# Silver's metric as every reader takes it: rows written before metrics hold null there.
SILVER_METRIC = f"coalesce(metric, '{DEFAULT_METRIC}')"


def silver_metric(alias: str) -> str:
    """SILVER_METRIC of the silver table named `alias` in a query (a MERGE's target)."""
    return f"coalesce({alias}.metric, '{DEFAULT_METRIC}')"


_FILLED = (Table.GOLD, Table.ROLLUPS)
_UPGRADED = (Table.SILVER, Table.GOLD, Table.ROLLUPS, Table.QUARANTINE)


def _exists(paths: LakePaths, table: Table) -> bool:
    from lake import deltalog

    return deltalog.latest_version(paths.table(table)) is not None


def pending(paths: LakePaths) -> list[Table]:
    """The tables that still need the upgrade: they exist and lack the mark (a read of each table's log tail)."""
    if objectstore.is_s3(paths.root):
        # Missing credentials, a server that does not answer or a missing bucket are named as such, not as a
        # table that cannot be opened.
        objectstore.check_access(paths.root)
    waiting = []
    for table in _UPGRADED:
        if _exists(paths, table) and open_table(paths.table(table)).metadata().configuration.get(MARK) != DONE:
            waiting.append(table)
    return waiting


def needs_upgrade(paths: LakePaths) -> bool:
    return bool(pending(paths))


def mark_new(configuration: dict[str, str]) -> dict[str, str]:
    """A new table's properties, with the mark: it is made with its `metric` column."""
    return {**configuration, MARK: DONE}


def upgrade_lake(paths: LakePaths) -> list[Table]:
    """Upgrade every table that needs it; returns those it upgraded (none for a lake made with metrics)."""
    waiting = pending(paths)
    if not waiting:
        return []
    log.warning(
        "upgrading the lake at %s to metrics (tables %s); readings written before read as metric %r",
        paths.root,
        ", ".join(t.value for t in waiting),
        DEFAULT_METRIC,
    )
    if Table.SILVER in waiting or Table.GOLD in waiting:
        _keep_watermark(paths)
    for table in waiting:
        _upgrade_table(paths, table)
    _make_metrics_table(paths)
    return waiting


def _keep_watermark(paths: LakePaths) -> None:
    """Gold's watermark is read from its newest commits; the upgrade's own commits record none, so it is first kept
    in gold's table property, where readers find it past any number of commits (lake.watermark)."""
    from lake import watermark

    if _exists(paths, Table.GOLD):
        watermark.keep(paths.table(Table.GOLD))


def _upgrade_table(paths: LakePaths, table: Table) -> None:
    from deltalake import Field
    from deltalake.schema import PrimitiveType

    location = paths.table(table)
    conflicts = delta_rs_conflicts()

    def add_column() -> None:
        # Tried again after a conflict: another process (Spark's `create_tables` does it too) may have added it.
        found = open_table(location)
        if "metric" not in {field.name for field in found.schema().fields}:
            found.alter.add_columns([Field("metric", PrimitiveType("string"), nullable=True)])

    retry_on_conflict(add_column, f"add metric to {table.value}", conflicts)
    crash_point(f"upgrade_{table.value}_column")
    if table in _FILLED:
        filled = retry_on_conflict(
            lambda: open_table(location).update(updates={"metric": f"'{DEFAULT_METRIC}'"}, predicate="metric IS NULL"),
            f"fill {table.value}'s metric",
            conflicts,
        )
        log.info("%s: %s rows take metric %r", table.value, filled.get("num_updated_rows"), DEFAULT_METRIC)
        crash_point(f"upgrade_{table.value}_filled")
    retry_on_conflict(
        lambda: open_table(location).alter.set_table_properties({MARK: DONE}, raise_if_not_exists=False),
        f"mark {table.value} upgraded",
        conflicts,
    )


def crash_point(stage: str) -> None:
    """For the upgrade's crash test: LAKEHOUSE_TEST_CRASH_AFTER=<stage> kills the process right after that step
    (`upgrade_<table>_column`, `upgrade_<table>_filled`). Unset, it does nothing."""
    import os
    import signal

    if os.environ.get("LAKEHOUSE_TEST_CRASH_AFTER") == stage:
        log.warning("LAKEHOUSE_TEST_CRASH_AFTER=%s: killing the process now", stage)
        os.kill(os.getpid(), signal.SIGKILL)


def _make_metrics_table(paths: LakePaths) -> None:
    """The `metrics` table of an upgraded lake: `value`, when silver holds readings."""
    import pyarrow as pa
    from deltalake import write_deltalake

    if _exists(paths, Table.METRICS) or not _exists(paths, Table.SILVER):
        return
    silver = open_table(paths.table(Table.SILVER))
    any_reading = any(True for _ in silver.file_uris())
    schema = pa.schema(
        [pa.field("metric", pa.string(), False), pa.field("first_seen", pa.timestamp("us", "UTC"), False)]
    )
    rows = [DEFAULT_METRIC] if any_reading else []
    data = pa.table({"metric": rows, "first_seen": [datetime.now(UTC)] * len(rows)}, schema=schema)
    location = paths.table(Table.METRICS)
    if objectstore.is_s3(location):
        write_deltalake(
            objectstore.s3_uri(location), data, mode="append", storage_options=objectstore.access().delta_rs_options()
        )
    else:
        write_deltalake(location, data, mode="append")
