"""Retention of raw payloads: bronze and quarantine rows older than their retention by Kafka time are deleted, bronze
stays append-only between runs, and what every run removed is kept in the table's own properties for audit and
replay.

A run removes, per Kafka partition, the oldest records in offset order up to the first one that is still inside the
retention (with the topic's LogAppendTime that is every record older than the cutoff), so what retention removed is
always offsets up to a line, the partition's `through` offset. A run is three delta-rs commits:

1. `begin`: the run's plan (cutoff; per partition the line and the rows under it) in the property `PENDING`, and on
   bronze `delta.appendOnly=false`, in one commit;
2. the delete of the rows under the lines (the commit's metadata names the cutoff);
3. `finish`: the plan added into the property `REMOVED` (per partition the highest line and all rows removed so
   far), `PENDING` emptied and on bronze `delta.appendOnly=true`, in one commit.

A run cut between them leaves `PENDING` set; the next `maintain` deletes under the same lines again (nothing when
the delete had committed) and finishes it, so the counts stay exact and bronze is append-only again. `lakehouse
doctor` and `lakehouse audit` report a run left unfinished. The table properties survive Delta's log cleanup and
checkpoints, which commit metadata would not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from lake.conflicts import delta_rs_conflicts, retry_on_conflict
from lake.deltars import open_table
from lake.tables import LakePaths, Table

if TYPE_CHECKING:
    from deltalake import DeltaTable

log = logging.getLogger("lakehouse.retention")

PENDING = "kpi_lakehouse.retention.pending"
REMOVED = "kpi_lakehouse.retention.removed"
APPEND_ONLY = "delta.appendOnly"
RETAINED_TABLES = (Table.BRONZE, Table.QUARANTINE)
# Quarantine rows of offsets Kafka lost have no Kafka time and no raw payload: they stay, as the record of the loss.
_OFFSETS_LOST = "offsets_lost"

Partition = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True)
class Line:
    """What retention removed from one partition: every row at or below offset `through`, `rows` rows."""

    through: int
    rows: int


@dataclass
class RetentionState:
    """What retention has removed from a table so far, and a run left unfinished, from the table's properties."""

    removed: dict[Partition, Line] = field(default_factory=dict)
    last_cutoff: datetime | None = None
    pending: dict[Partition, Line] | None = None  # the plan of an unfinished run
    pending_cutoff: datetime | None = None
    append_only: bool | None = None  # bronze's delta.appendOnly; None on tables without it

    def through(self, topic: str, partition: int) -> int:
        """The highest offset of this partition that retention removed or is removing; -1 for none."""
        lines = [self.removed.get((topic, partition)), (self.pending or {}).get((topic, partition))]
        return max((line.through for line in lines if line is not None), default=-1)

    def lines(self) -> dict[Partition, int]:
        """Every partition's `through`, the unfinished run's included."""
        keys = set(self.removed) | set(self.pending or {})
        return {key: self.through(*key) for key in sorted(keys)}

    @property
    def rows_removed(self) -> int:
        return sum(line.rows for line in self.removed.values())


@dataclass
class RetentionReport:
    table: str
    cutoff: datetime | None  # None: the table keeps rows forever and no run was repaired
    rows_removed: int = 0
    repaired: bool = False  # an interrupted run was finished first


def _lines_to_json(lines: dict[Partition, Line]) -> list[list[object]]:
    return [[topic, partition, line.through, line.rows] for (topic, partition), line in sorted(lines.items())]


def _lines_from_json(rows: list[list[object]]) -> dict[Partition, Line]:
    return {(str(t), int(str(p))): Line(int(str(through)), int(str(n))) for t, p, through, n in rows}


def _cutoff(text: object) -> datetime | None:
    return datetime.fromisoformat(str(text)) if text else None


def state_of(delta: DeltaTable) -> RetentionState:
    configuration = delta.metadata().configuration
    state = RetentionState()
    if APPEND_ONLY in configuration:
        state.append_only = configuration[APPEND_ONLY].lower() == "true"
    if configuration.get(REMOVED):
        removed = json.loads(configuration[REMOVED])
        state.removed, state.last_cutoff = _lines_from_json(removed["partitions"]), _cutoff(removed["last_cutoff"])
    if configuration.get(PENDING):
        pending = json.loads(configuration[PENDING])
        state.pending, state.pending_cutoff = _lines_from_json(pending["partitions"]), _cutoff(pending["cutoff"])
    return state


def retention_state(paths: LakePaths, table: Table) -> RetentionState:
    """What retention removed from `table` (empty for a table retention never ran on)."""
    return state_of(open_table(paths.table(table)))


def _plan(delta: DeltaTable, table: Table, cutoff: datetime) -> dict[Partition, Line]:
    """Per partition, the rows older than `cutoff` before its first row that is not (in offset order)."""
    import duckdb

    rows = delta.to_pyarrow_dataset()  # read through DuckDB: only the four columns below, never the payloads
    skip_lost = "WHERE reason_code <> $lost" if table is Table.QUARANTINE else ""
    query = f"""
        WITH candidates AS (SELECT topic, "partition", "offset", kafka_timestamp FROM rows {skip_lost}),
        first_kept AS (
            SELECT topic, "partition",
                   min("offset") FILTER (WHERE kafka_timestamp IS NULL OR kafka_timestamp >= $cutoff) AS kept_from
            FROM candidates GROUP BY ALL
        )
        SELECT topic, "partition", max("offset"), count(*)
        FROM candidates JOIN first_kept USING (topic, "partition")
        WHERE kept_from IS NULL OR "offset" < kept_from
        GROUP BY ALL ORDER BY ALL
    """
    parameters: dict[str, object] = {"cutoff": cutoff}
    if table is Table.QUARANTINE:
        parameters["lost"] = _OFFSETS_LOST
    with duckdb.connect() as connection:
        connection.register("rows", rows)
        found = connection.execute(query, parameters).fetchall()
    return {(topic, partition): Line(through, count) for topic, partition, through, count in found}


def _predicate(table: Table, lines: dict[Partition, Line]) -> str:
    """The rows under the lines, as a delta-rs (DataFusion SQL) predicate."""
    per_partition = " OR ".join(
        f"(topic = '{topic.replace(chr(39), chr(39) * 2)}' AND \"partition\" = {partition} "
        f'AND "offset" <= {line.through})'
        for (topic, partition), line in sorted(lines.items())
    )
    keep_lost = f"reason_code <> '{_OFFSETS_LOST}' AND " if table is Table.QUARANTINE else ""
    return f"{keep_lost}({per_partition})"


def _set_properties(location: str, properties: dict[str, str], what: str) -> None:
    retry_on_conflict(
        lambda: open_table(location).alter.set_table_properties(properties, raise_if_not_exists=False),
        what,
        delta_rs_conflicts(),
    )


def begin(location: str, table: Table, cutoff: datetime, lines: dict[Partition, Line]) -> None:
    """Commit 1: the plan, and bronze opened to deletes."""
    plan = json.dumps({"cutoff": cutoff.isoformat(), "partitions": _lines_to_json(lines)})
    opened = {APPEND_ONLY: "false"} if table is Table.BRONZE else {}
    _set_properties(location, {PENDING: plan, **opened}, f"start of the retention run on {table.value}")


def delete(location: str, table: Table, cutoff: datetime, lines: dict[Partition, Line]) -> int:
    """Commit 2: the rows under the lines; how many went (none when a run being finished had deleted them)."""
    from deltalake import CommitProperties

    if not lines:
        return 0
    metadata = {"kpi_lakehouse.retention.cutoff": cutoff.isoformat()}

    def run() -> int:
        metrics = open_table(location).delete(
            _predicate(table, lines), commit_properties=CommitProperties(custom_metadata=metadata)
        )
        return int(metrics.get("num_deleted_rows") or 0)

    return retry_on_conflict(run, f"retention delete in {table.value}", delta_rs_conflicts())


def finish(location: str, table: Table) -> int:
    """Commit 3: the pending plan counted as removed, bronze append-only again; the rows the plan removed."""
    state = state_of(open_table(location))
    removed = dict(state.removed)
    for key, line in (state.pending or {}).items():
        before = removed.get(key)
        removed[key] = Line(
            max(line.through, before.through if before else -1), line.rows + (before.rows if before else 0)
        )
    cutoffs = [c for c in (state.last_cutoff, state.pending_cutoff) if c is not None]
    record = {"last_cutoff": max(cutoffs).isoformat() if cutoffs else None, "partitions": _lines_to_json(removed)}
    closed = {APPEND_ONLY: "true"} if table is Table.BRONZE else {}
    properties = {PENDING: "", REMOVED: json.dumps(record), **closed}
    _set_properties(location, properties, f"end of the retention run on {table.value}")
    return sum(line.rows for line in (state.pending or {}).values())


def repair(location: str, table: Table) -> bool:
    """Finish a run that was cut between its commits; True when there was one. Bronze found open to deletes without
    a run pending (someone set the property) is closed again."""
    state = state_of(open_table(location))
    if state.pending is not None:
        log.warning("%s: finishing a retention run that was interrupted (cutoff %s)", table.value, state.pending_cutoff)
        assert state.pending_cutoff is not None
        if table is Table.BRONZE and state.append_only is not False:  # set back meanwhile, by hand or by a writer
            _set_properties(location, {APPEND_ONLY: "false"}, "bronze opened again to finish a retention run")
        delete(location, table, state.pending_cutoff, state.pending)
        finish(location, table)
        return True
    if table is Table.BRONZE and state.append_only is False:
        log.warning("bronze: delta.appendOnly was false outside a retention run; setting it back to true")
        _set_properties(location, {APPEND_ONLY: "true"}, "bronze made append-only again")
        return True
    return False


def apply_retention(
    paths: LakePaths,
    table: Table,
    keep: timedelta | None,
    now: datetime | None = None,
    on_step: Callable[[str], None] | None = None,
) -> RetentionReport:
    """Repair an interrupted run on `table`, then delete its rows older than `keep` (none when None)."""
    location = paths.table(table)
    step = on_step or (lambda text: None)
    step(f"{table.value}: checking for an interrupted retention run")
    repaired = repair(location, table)
    if keep is None:
        return RetentionReport(table.value, None, repaired=repaired)
    cutoff = (now or datetime.now(UTC)) - keep
    step(f"{table.value}: finding rows older than {cutoff:%Y-%m-%d %H:%M:%S} UTC")
    lines = _plan(open_table(location), table, cutoff)
    planned = sum(line.rows for line in lines.values())
    if not planned:
        return RetentionReport(table.value, cutoff, 0, repaired)
    step(f"{table.value}: deleting {planned:,} rows older than {cutoff:%Y-%m-%d %H:%M:%S} UTC")
    begin(location, table, cutoff, lines)
    deleted = delete(location, table, cutoff, lines)
    if deleted != planned:  # quarantine only: a replay changed rows under the lines since they were counted
        log.warning("%s: %d rows planned for retention, %d deleted", table.value, planned, deleted)
    finish(location, table)
    log.info("%s: %d rows older than %s removed by retention", table.value, planned, cutoff.isoformat())
    return RetentionReport(table.value, cutoff, planned, repaired)
