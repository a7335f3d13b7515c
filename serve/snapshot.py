"""An in-memory DuckDB copy of gold and silver that readers query without touching the Delta log.

`refresh()` looks at each table's newest version (a directory listing), reads only the rows updated since the last
load from that pinned version, and applies them in one DuckDB transaction together with the versions they came
from. A reader queries inside its own transaction, so it sees one version of everything and the version it
reports is the version of the rows it read. The pipeline never deletes gold or silver rows (a correction updates a
row and its `updated_at`), so "rows updated since" is the whole change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import pyarrow as pa
import pyarrow.compute

from lake import deltalog, duck
from lake.rows import fetch_one
from lake.tables import LakePaths, Table

# Each table's identity, the key a changed row replaces the old one by.
_KEYS = {Table.GOLD: ('"timestamp"',), Table.SILVER: ("device_id", '"timestamp"')}


@dataclass(frozen=True)
class Snapshot:
    """Which versions of gold and silver a reader sees, and how fresh they are."""

    gold_version: int | None
    silver_version: int | None
    gold_committed_at: datetime | None  # when the pipeline last committed to gold
    newest_event: datetime | None  # the newest second in gold
    loaded_at: datetime | None  # when the service loaded this snapshot

    @property
    def ready(self) -> bool:
        return self.gold_version is not None and self.silver_version is not None

    @property
    def etag(self) -> str:
        return f'"gold-{self.gold_version}.silver-{self.silver_version}"'


@dataclass(frozen=True)
class RefreshReport:
    changed: bool
    seconds: float
    rows: dict[str, int]


class SnapshotStore:
    """The serving copy. Its DuckDB has no file access at all; Delta is read by a second, lake-only connection."""

    def __init__(self, paths: LakePaths) -> None:
        self.paths = paths
        self._database = duckdb.connect(
            ":memory:", config={"autoinstall_known_extensions": "false", "autoload_known_extensions": "false"}
        )
        self._database.execute("SET TimeZone = 'UTC'")
        self._database.execute(
            "CREATE TABLE snapshot_meta (gold_version BIGINT, silver_version BIGINT, "
            "gold_committed_at TIMESTAMPTZ, newest_event TIMESTAMPTZ, loaded_at TIMESTAMPTZ)"
        )
        self._database.execute("INSERT INTO snapshot_meta VALUES (NULL, NULL, NULL, NULL, NULL)")
        self._database.execute("SET enable_external_access = false")
        self._database.execute("SET lock_configuration = true")
        self._writer = self._database.cursor()
        self._reader = duck.connect_reader(paths)
        self._refresh_lock = threading.Lock()
        self._updated_since: dict[Table, datetime | None] = {Table.GOLD: None, Table.SILVER: None}
        self.current = Snapshot(None, None, None, None, None)

    def refresh(self) -> RefreshReport:
        """Load the newest committed versions, if any table moved on; safe to call from any thread."""
        with self._refresh_lock:
            started = time.perf_counter()
            found = {t: deltalog.latest_version(self.paths.table(t)) for t in (Table.GOLD, Table.SILVER)}
            loaded = {Table.GOLD: self.current.gold_version, Table.SILVER: self.current.silver_version}
            changes: dict[Table, tuple[int, pa.Table, bool]] = {}
            for table, newest in found.items():
                if newest is None or newest.version == loaded[table]:
                    continue
                # A lower version means the table was made anew (the lake reprocessed from scratch): load it whole.
                whole = loaded[table] is None or newest.version < (loaded[table] or 0)
                since = None if whole else self._updated_since[table]
                rows = duck.scan_table(self._reader, self.paths.table(table), newest.version, since)
                changes[table] = (newest.version, rows, whole)
            if not changes:
                return RefreshReport(False, time.perf_counter() - started, {})
            gold = found[Table.GOLD]
            snapshot = self._apply(changes, gold.committed_at if gold else self.current.gold_committed_at)
            for table, (_, rows, whole) in changes.items():
                newest_update = pyarrow.compute.max(rows.column("updated_at")).as_py()
                previous = None if whole else self._updated_since[table]
                self._updated_since[table] = max(filter(None, [previous, newest_update]), default=None)
            self.current = snapshot
            counts = {t.value: rows.num_rows for t, (_, rows, _) in changes.items()}
            return RefreshReport(True, time.perf_counter() - started, counts)

    def _apply(self, changes: dict[Table, tuple[int, pa.Table, bool]], gold_committed_at: datetime | None) -> Snapshot:
        writer = self._writer
        writer.begin()
        try:
            for table, (_, rows, whole) in changes.items():
                writer.register("changed_rows", rows)
                exists = fetch_one(
                    writer.execute(
                        "SELECT count(*) FROM duckdb_tables() WHERE table_name = $name", {"name": table.value}
                    ),
                    f"the count of tables named {table.value}",
                )[0]
                if whole or not exists:
                    # Sorted by key, DuckDB's per-block min/max lets a lookup skip all but the block it needs.
                    order = ", ".join(_KEYS[table][::-1])
                    writer.execute(
                        f"CREATE OR REPLACE TABLE {table.value} AS SELECT * FROM changed_rows ORDER BY {order}"
                    )
                else:
                    match = " AND ".join(f"{table.value}.{key} = changed_rows.{key}" for key in _KEYS[table])
                    writer.execute(f"DELETE FROM {table.value} USING changed_rows WHERE {match}")
                    writer.execute(f"INSERT INTO {table.value} SELECT * FROM changed_rows")
                if table is Table.SILVER:
                    self._update_devices(writer, whole or not exists)
                writer.unregister("changed_rows")
            versions = {t: v for t, (v, _, _) in changes.items()}
            newest_event = None
            gold_tables = writer.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'gold'")
            if fetch_one(gold_tables, "the count of tables named gold")[0]:
                newest_event = fetch_one(writer.execute('SELECT max("timestamp") FROM gold'), "gold's newest event")[0]
            snapshot = Snapshot(
                gold_version=versions.get(Table.GOLD, self.current.gold_version),
                silver_version=versions.get(Table.SILVER, self.current.silver_version),
                gold_committed_at=gold_committed_at,
                newest_event=newest_event,
                loaded_at=datetime.now(UTC),
            )
            writer.execute(
                "UPDATE snapshot_meta SET gold_version = $gold, silver_version = $silver, "
                "gold_committed_at = $committed, newest_event = $newest, loaded_at = $loaded",
                {
                    "gold": snapshot.gold_version,
                    "silver": snapshot.silver_version,
                    "committed": gold_committed_at,
                    "newest": newest_event,
                    "loaded": snapshot.loaded_at,
                },
            )
            writer.commit()
        except BaseException:
            writer.rollback()
            raise
        return snapshot

    @staticmethod
    def _update_devices(writer: duckdb.DuckDBPyConnection, whole: bool) -> None:
        summary = (
            'SELECT device_id, min("timestamp") AS first_reading, max("timestamp") AS last_reading, '
            "count(*) AS reading_count FROM silver"
        )
        if whole:
            writer.execute(f"CREATE OR REPLACE TABLE devices AS {summary} GROUP BY device_id")
            return
        # Only the devices with changed readings need their summary recomputed.
        writer.execute("DELETE FROM devices WHERE device_id IN (SELECT device_id FROM changed_rows)")
        writer.execute(
            f"INSERT INTO devices {summary} WHERE device_id IN (SELECT DISTINCT device_id FROM changed_rows) "
            "GROUP BY device_id"
        )

    @contextmanager
    def read(self) -> Iterator[tuple[Snapshot, duckdb.DuckDBPyConnection]]:
        """A cursor inside one transaction, and the snapshot its rows belong to."""
        cursor = self._database.cursor()
        try:
            cursor.begin()
            row = fetch_one(
                cursor.execute(
                    "SELECT gold_version, silver_version, gold_committed_at, newest_event, loaded_at FROM snapshot_meta"
                ),
                "snapshot_meta",
            )
            yield Snapshot(*row), cursor
        finally:
            cursor.rollback()  # the transaction only read
            cursor.close()

    def close(self) -> None:
        self._reader.close()
        self._writer.close()
        self._database.close()
