"""The API's serving store: a DuckDB database file on local disk holding gold, the rollups and a summary per device
and metric (with the metrics' catalog folded from it) as of given Delta versions, synced per version; memory is
bounded by DuckDB's `memory_limit`, not by history.

- A worker claims a slot (`slot-N.duckdb` under the store folder, held with an `fcntl` lock), since DuckDB lets one
  process write a file; with `--workers 2` the two workers hold slots 0 and 1.
- A store file written by another format or for another lake root, or one that saw a table at a higher version or
  with another creation time than the lake now has (the lake was made anew), is dropped and built again.
- Until its file holds a complete copy (a never-seen lake, or a rebuild), the store answers straight from the lake:
  `delta_scan` of gold, rollups and silver at versions pinned per snapshot, while a background thread builds the file
  in one transaction; then it switches.
- `refresh()` asks for the commit after the version it holds by name, on a local disk as on S3, rather than listing
  `_delta_log` (whose listing is as long as the log: see lake.deltalog): one lookup per table when nothing changed
  (on S3 a HEAD; there it reads the tables' first commits only when a version moved). When a version moved on, it
  follows the table by commit, not by any writer's clock: it reads the commits since the version it holds, and
  the rows of the data files they added replace the store's rows of the same key (gold's metric and second, a
  rollup's bucket key; silver's are folded into the summary per device and metric), so a commit of one metric
  leaves the others' rows as they were. A replay that computed its rows before a stream batch and committed after
  it is loaded like any other commit. Files that a compaction rewrote without changing a row are skipped. A table
  whose commits cannot be followed by their files (one deleted rows, as a DELETE, a MERGE that deleted or a
  RESTORE does; or the log no longer holds them after a checkpoint) is copied again whole at its new version. Either way the changes and the new versions are applied in one transaction. A reader
  queries inside its own transaction, so the versions it reports are those of the rows it read.
- A device's seconds are the only answers still read from readings: from silver in the lake at the snapshot's
  version, with a time filter so that DuckDB skips the other files.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import duckdb

from lake import deltalog, duck, watermark
from lake.errors import LakeError
from lake.rows import fetch_one
from lake.settings import MIB, Settings, local_path
from lake.tables import LakePaths, Table
from lake.upgrade import SILVER_METRIC
from serve.answers import MAX_CHANGED_KEYS, AnswerCache, Changes

# Bumped whenever the store's tables change shape: a file of another format is built again.
# 2: gold and the rollups hold fingerprint, revision and late_readings; 3: loaded by commit, no `*_since` columns;
# 4: keyed by metric (gold by metric and second), the summary per device and metric, and the metrics' catalog.
STORE_FORMAT = 4
TABLES = (Table.GOLD, Table.SILVER, Table.ROLLUPS)
# Microseconds from 0001-01-01 to the Unix epoch: bucket keys count from year 1 so that they are never negative.
_YEAR_ONE_US = 62_135_596_800_000_000
# One VARCHAR key per row, as DuckDB's ART index serves single-column lookups only (a second condition beside the
# indexed one makes it scan): gold's `metric|microseconds since year 1` (20 digits), a rollup's
# `grain|metric|device|microseconds` (the fleet's device is empty, which no device id is). Neither a grain nor a
# metric name holds a `|` (lake.tables.METRIC_NAME), and the microseconds have a fixed width, so a device id that
# holds one cannot make two keys meet.
_MICROS_KEY_SQL = "lpad(CAST(epoch_us(\"timestamp\") + 62135596800000000 AS VARCHAR), 20, '0')"
GOLD_KEY_SQL = f"metric || '|' || {_MICROS_KEY_SQL}"
ROLLUP_KEY_SQL = f"grain || '|' || metric || '|' || coalesce(device_id, '') || '|' || {_MICROS_KEY_SQL}"
log = logging.getLogger("kpi_lakehouse.store")


def gold_key(metric: str, start_us: int) -> str:
    return f"{metric}|{start_us + _YEAR_ONE_US:020d}"


def rollup_key(grain: str, metric: str, device_id: str | None, start_us: int) -> str:
    return f"{grain}|{metric}|{device_id or ''}|{start_us + _YEAR_ONE_US:020d}"


def timestamp_literal(moment: datetime) -> str:
    """A timestamp as SQL text, for filters DuckDB must see as constants to skip Delta files by their statistics;
    only ever made from datetimes this code computed, never from request text."""
    return f"TIMESTAMPTZ '{moment.astimezone(UTC).isoformat(sep=' ')}'"


@dataclass(frozen=True)
class Snapshot:
    """Which table versions a reader sees, how fresh they are, and whether the store file or the lake answers."""

    gold_version: int | None
    silver_version: int | None
    gold_committed_at: datetime | None  # when the pipeline last committed to gold
    newest_event: datetime | None  # the newest second in gold
    loaded_at: datetime | None  # when the service loaded this snapshot
    rollups_version: int | None = None
    from_store: bool = True  # False: answered from the lake at these versions while the store file is built
    generation: int | None = None  # the store file's sync that holds these versions (None: from the lake)

    @property
    def ready(self) -> bool:
        return self.gold_version is not None and self.silver_version is not None

    @property
    def etag(self) -> str:
        rollups = "" if self.rollups_version is None else f".rollups-{self.rollups_version}"
        return f'"gold-{self.gold_version}.silver-{self.silver_version}{rollups}"'

    def version(self, table: Table) -> int | None:
        return {Table.GOLD: self.gold_version, Table.SILVER: self.silver_version}.get(table, self.rollups_version)


@dataclass(frozen=True)
class RefreshReport:
    changed: bool
    seconds: float
    rows: dict[str, int]


_META_COLUMNS = (
    "format INTEGER, lake_root VARCHAR, gold_version BIGINT, silver_version BIGINT, rollups_version BIGINT, "
    "gold_committed_at TIMESTAMPTZ, newest_event TIMESTAMPTZ, loaded_at TIMESTAMPTZ, "
    "gold_created TIMESTAMPTZ, silver_created TIMESTAMPTZ, rollups_created TIMESTAMPTZ, generation BIGINT"
)
_SNAPSHOT_COLUMNS = "gold_version, silver_version, gold_committed_at, newest_event, loaded_at, rollups_version"
_SNAPSHOT_SQL = f"SELECT {_SNAPSHOT_COLUMNS} FROM store_meta"
# A reading's identity: what the summary reads of silver (whose rows written before metrics hold a null metric, which
# every reader takes as `value`: lake.upgrade).
_READING_COLUMNS = f'device_id, {SILVER_METRIC} AS metric, "timestamp"'
# The metrics' catalog from the summary per device and metric: a row per metric the snapshot holds readings of.
_CATALOG_SQL = (
    "SELECT metric, count(*) AS device_count, min(first_reading) AS first_reading, "
    "max(last_reading) AS last_reading, sum(reading_count)::BIGINT AS reading_count FROM device_metrics"
)


def claim_slot(store_dir: Path) -> tuple[int, IO[str]]:
    """The lowest slot no other store holds (in this process or another), locked until the handle is closed."""
    store_dir.mkdir(parents=True, exist_ok=True)
    for slot in itertools.count():
        handle = (store_dir / f"slot-{slot}.lock").open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return slot, handle
    raise AssertionError("unreachable")


class SnapshotStore:
    """The serving store of one worker; `read()` gives a request its snapshot and cursor."""

    def __init__(
        self,
        paths: LakePaths,
        store_dir: Path,
        memory_limit: str = "512MB",
        threads: int = 2,
        answers: AnswerCache | None = None,
    ) -> None:
        self.paths = paths
        # Answers kept in memory (serve.answers), told of each sync's changes; none kept by default.
        self.answers = answers if answers is not None else AnswerCache(0)
        self.store_dir = store_dir.absolute()
        self.slot, self._slot_lock = claim_slot(self.store_dir)
        self.file = self.store_dir / f"slot-{self.slot}.duckdb"
        self._memory_limit = memory_limit
        self._threads = threads
        self._refresh_lock = threading.Lock()
        self._local = threading.local()
        self._builder: threading.Thread | None = None
        self.build_error: BaseException | None = None
        self._snapshots: dict[int, Snapshot] = {}  # by store_meta's generation, which each sync counts up
        self._generation = 0
        self._database = self._open()
        # Each table's folder as the store's connection may read it.
        self.locations = {t: self._location(t) for t in TABLES}
        self._lake_on_disk = local_path(paths.root) is not None
        self.current = self._stored_snapshot() or Snapshot(None, None, None, None, None, from_store=False)
        # The generation whose answers may be answered from memory (serve.answers): None from just before a sync
        # commits until it is published, so that no request answers from an older generation than one a request
        # before it read.
        self.kept_generation: int | None = self.current.generation
        if self.current.generation is not None:
            self.answers.advance(self.current.generation, Changes.everything())
        self._writer = self._database.cursor()

    @classmethod
    def from_settings(cls, settings: Settings) -> SnapshotStore:
        return cls(
            LakePaths.from_settings(settings),
            settings.store_dir,
            settings.api_memory_limit,
            answers=AnswerCache(settings.api_cache_mb * MIB),
        )

    # Opening -------------------------------------------------------------------------------------------------

    def _open(self) -> duckdb.DuckDBPyConnection:
        """The store file's connection, after dropping a file that cannot be caught up; it reads only the lake and
        the store folder, and its configuration is locked."""
        if self.file.exists() and self._stale_reason() is not None:
            log.info("rebuilding the serving store %s: %s", self.file, self._stale_reason())
            for leftover in (self.file, self.file.with_name(self.file.name + ".wal")):
                leftover.unlink(missing_ok=True)
        database = duckdb.connect(
            str(self.file),
            config={
                "autoinstall_known_extensions": "false",
                "autoload_known_extensions": "false",
                "memory_limit": self._memory_limit,
                "threads": str(self._threads),
                "temp_directory": str(self.store_dir / f"slot-{self.slot}.tmp"),
            },
        )
        duck.open_lake_storage(database, self.paths.root)
        database.execute("SET TimeZone = 'UTC'")
        allowed = [str(self.store_dir).rstrip("/") + "/", duck.allowed_prefix(self.paths.root)]
        database.execute("SET allowed_directories = $allowed", {"allowed": allowed})
        database.execute("SET enable_external_access = false")
        database.execute("SET lock_configuration = true")
        return database

    def _stale_reason(self) -> str | None:
        """Why the store file cannot be caught up from the lake as it is now, or None when it can."""
        try:
            with duckdb.connect(str(self.file), read_only=True) as probe:
                row = probe.execute(
                    "SELECT format, lake_root, gold_version, silver_version, rollups_version, "
                    "gold_created, silver_created, rollups_created FROM store_meta"
                ).fetchone()
        except duckdb.Error as exc:
            return f"unreadable ({exc})"
        if row is None:
            return "no versions recorded"
        if row[0] != STORE_FORMAT:
            return f"store format {row[0]}, this service writes {STORE_FORMAT}"
        if row[1] != self.paths.root:
            return f"written for the lake {row[1]}, this service serves {self.paths.root}"
        for table, version, created in zip(TABLES, row[2:5], row[5:8], strict=True):
            found = deltalog.latest_version(self.paths.table(table))
            if version is not None and (found is None or found.version < version):
                return f"{table.value} is at version {found and found.version}, lower than the store's {version}"
            now_created = deltalog.created_at(self.paths.table(table))
            if created is not None and now_created is not None and created != now_created:
                return f"{table.value} was made anew"
        return None

    def _stored_snapshot(self) -> Snapshot | None:
        try:
            row = self._database.execute(f"SELECT {_SNAPSHOT_COLUMNS}, generation FROM store_meta").fetchone()
        except duckdb.CatalogException:
            return None
        if row is None:
            return None
        self._generation = row[-1]
        return _stored(row[:-1], self._generation)

    # Refreshing ----------------------------------------------------------------------------------------------

    def refresh(self) -> RefreshReport:
        """Catch up with the newest committed versions, if any table moved on; safe to call from any thread."""
        with self._refresh_lock:
            started = time.perf_counter()
            loaded = {t: self.current.version(t) for t in TABLES}
            found = {t: deltalog.latest_version(self.paths.table(t), known=loaded[t]) for t in TABLES}
            if not self.current.from_store:
                return self._pin(found, started)
            moved = any(v is not None and v.version != loaded[t] for t, v in found.items())
            if any(loaded[t] is not None and (v is None or v.version < (loaded[t] or 0)) for t, v in found.items()) or (
                # On an object store, where reading each first commit costs requests, only when a version moved.
                (moved or self._lake_on_disk) and self._made_anew()
            ):
                # A table made anew: answer from the lake while the file is built again.
                log.info("a lake table was made anew; rebuilding the serving store %s", self.file)
                self.kept_generation = None
                self.current = replace(self.current, from_store=False, generation=None)
                return self._pin(found, started)
            changed = {t: v.version for t, v in found.items() if v is not None and v.version != loaded[t]}
            if not changed:
                return RefreshReport(False, time.perf_counter() - started, {})
            gold = found[Table.GOLD]
            rows = self._apply(changed, gold.committed_at if gold else self.current.gold_committed_at)
            return RefreshReport(True, time.perf_counter() - started, rows)

    def _made_anew(self) -> bool:
        created = self._writer.execute("SELECT gold_created, silver_created, rollups_created FROM store_meta")
        row = fetch_one(created, "the store's table creation times")
        for table, stored in zip(TABLES, row, strict=True):
            now = deltalog.created_at(self.paths.table(table))
            if stored is not None and now is not None and stored != now:
                return True
        return False

    def _pin(self, found: dict[Table, deltalog.TableVersion | None], started: float) -> RefreshReport:
        """Answer from the lake at its newest versions (nothing is copied), and build the store file if no build
        runs yet."""
        versions = {t: v.version if v else None for t, v in found.items()}
        previous = self.current
        unchanged = all(versions[t] == previous.version(t) for t in TABLES) and previous.loaded_at is not None
        if not unchanged:
            gold = found[Table.GOLD]
            newest_event = previous.newest_event
            if gold is not None and versions[Table.GOLD] != previous.gold_version:
                newest_event = fetch_one(
                    self._writer.execute(
                        f'SELECT max("timestamp") FROM delta_scan($location, version := {gold.version})',
                        {"location": self._location(Table.GOLD)},
                    ),
                    "gold's newest event",
                )[0]
            self.current = Snapshot(
                gold_version=versions[Table.GOLD],
                silver_version=versions[Table.SILVER],
                gold_committed_at=gold.committed_at if gold else None,
                newest_event=newest_event,
                loaded_at=datetime.now(UTC),
                rollups_version=versions[Table.ROLLUPS],
                from_store=False,
            )
        if self.current.ready and (self._builder is None or not self._builder.is_alive()):
            self._builder = threading.Thread(target=self._build, name="store-build", daemon=True)
            self._builder.start()
        return RefreshReport(not unchanged, time.perf_counter() - started, {})

    def _location(self, table: Table) -> str:
        return duck.reader_location(self.paths.table(table))

    def _scan(self, table: Table, version: int, columns: str = "*") -> str:
        """SQL of a pinned table version's rows; $<table> names its location."""
        return f"SELECT {columns} FROM delta_scan(${table.value}, version := {int(version)})"

    def _build(self) -> None:
        """Copy gold, the rollups and silver's summary per device and metric at pinned versions into the file, in
        one transaction; then serve from it."""
        found = {t: deltalog.latest_version(self.paths.table(t)) for t in TABLES}
        gold, silver, rollups = (found[t] for t in TABLES)
        if gold is None or silver is None:
            return
        started = time.perf_counter()
        cursor = self._database.cursor()
        params = {t.value: self._location(t) for t in TABLES if found[t] is not None}
        generation = self._generation + 1
        try:
            cursor.begin()
            for name in ("store_meta", "gold", "rollups", "device_metrics", "metrics"):
                cursor.execute(f"DROP TABLE IF EXISTS {name}")
            self._create_gold(cursor, gold.version, _only(params, "gold"))
            if rollups is not None:
                self._create_rollups(cursor, rollups.version, _only(params, "rollups"))
            self._create_devices(cursor, silver.version, _only(params, "silver"))
            newest_event = fetch_one(cursor.execute('SELECT max("timestamp") FROM gold'), "gold's newest second")[0]
            loaded_at = datetime.now(UTC)
            cursor.execute(f"CREATE TABLE store_meta ({_META_COLUMNS})")
            cursor.execute(
                "INSERT INTO store_meta VALUES ($format, $root, $gold, $silver, $rollups, $committed, $newest, "
                "$loaded, $gold_created, $silver_created, $rollups_created, $generation)",
                {
                    "generation": generation,
                    "format": STORE_FORMAT,
                    "root": self.paths.root,
                    "gold": gold.version,
                    "silver": silver.version,
                    "rollups": rollups.version if rollups else None,
                    "committed": gold.committed_at,
                    "newest": newest_event,
                    "loaded": loaded_at,
                    **{f"{t.value}_created": deltalog.created_at(self.paths.table(t)) for t in TABLES},
                },
            )
            self.kept_generation = None
            cursor.commit()
        except BaseException as exc:
            with contextlib.suppress(duckdb.Error):  # a commit that failed has ended the transaction
                cursor.rollback()
            self.build_error = exc
            log.exception("building the serving store %s failed; answering from the lake", self.file)
            return
        finally:
            cursor.close()
        with self._refresh_lock:
            self._publish(
                generation,
                Snapshot(
                    gold.version,
                    silver.version,
                    gold.committed_at,
                    newest_event,
                    loaded_at,
                    rollups.version if rollups else None,
                    from_store=True,
                ),
                Changes.everything(),
            )
            self.build_error = None
        log.info(
            "serving store %s built at gold %s, silver %s, rollups %s in %.2f s",
            self.file,
            gold.version,
            silver.version,
            rollups and rollups.version,
            time.perf_counter() - started,
        )

    def _create_gold(self, cursor: duckdb.DuckDBPyConnection, version: int, params: dict[str, str]) -> None:
        cursor.execute(
            f"CREATE TABLE gold AS SELECT {GOLD_KEY_SQL} AS gold_key, * "
            f"FROM ({self._scan(Table.GOLD, version)}) ORDER BY gold_key",
            params,
        )
        cursor.execute("CREATE INDEX gold_key ON gold (gold_key)")

    def _create_rollups(self, cursor: duckdb.DuckDBPyConnection, version: int, params: dict[str, str]) -> None:
        cursor.execute(
            f"CREATE TABLE rollups AS SELECT {ROLLUP_KEY_SQL} AS bucket_key, * "
            f"FROM ({self._scan(Table.ROLLUPS, version)}) ORDER BY bucket_key",
            params,
        )
        cursor.execute("CREATE INDEX rollups_bucket ON rollups (bucket_key)")

    def _create_devices(self, cursor: duckdb.DuckDBPyConnection, version: int, params: dict[str, str]) -> None:
        """The summary per device and metric (`device_metrics`) of silver at `version`, and the metrics' catalog."""
        cursor.execute(
            'CREATE TABLE device_metrics AS SELECT device_id, metric, min("timestamp") AS first_reading, '
            'max("timestamp") AS last_reading, count(*) AS reading_count '
            f"FROM ({self._scan(Table.SILVER, version, _READING_COLUMNS)}) GROUP BY device_id, metric "
            "ORDER BY device_id, metric",
            params,
        )
        cursor.execute(f"CREATE TABLE metrics AS {_CATALOG_SQL} GROUP BY metric ORDER BY metric")

    def _reload(self, cursor: duckdb.DuckDBPyConnection, table: Table, version: int, params: dict[str, str]) -> int:
        """Copy a table whole again at `version` (silver as the devices' summary), inside the caller's transaction:
        readers in older transactions keep the copy they began with. Returns the rows copied."""
        if table is Table.GOLD:
            cursor.execute("DROP TABLE IF EXISTS gold")
            self._create_gold(cursor, version, params)
            query = "SELECT count(*) FROM gold"
        elif table is Table.ROLLUPS:
            cursor.execute("DROP TABLE IF EXISTS rollups")
            self._create_rollups(cursor, version, params)
            query = "SELECT count(*) FROM rollups"
        else:
            cursor.execute("DROP TABLE IF EXISTS device_metrics")
            cursor.execute("DROP TABLE IF EXISTS metrics")
            self._create_devices(cursor, version, params)
            query = "SELECT coalesce(sum(reading_count), 0) FROM device_metrics"
        return int(fetch_one(cursor.execute(query), f"{table.value} copied")[0])

    def wait_built(self, timeout_s: float = 60) -> bool:
        """Whether the store file serves (waiting up to `timeout_s` for a build that runs); for tests and tools."""
        deadline = time.monotonic() + timeout_s
        while not self.current.from_store and time.monotonic() < deadline:
            builder = self._builder
            if builder is not None:
                builder.join(timeout=max(0.0, deadline - time.monotonic()))
            if not self.current.from_store:
                time.sleep(0.05)
        return self.current.from_store

    def _apply(self, changed: dict[Table, int], gold_committed_at: datetime | None) -> dict[str, int]:
        """Apply what each moved table's commits since the held version changed, and the new versions, in one
        transaction: the rows of the files those commits added replace the store's rows of the same keys, or the
        table is copied again whole when its commits cannot be followed by their files."""
        writer = self._writer
        params = {t.value: self._location(t) for t in changed}
        newest_event, old_silver = fetch_one(
            writer.execute("SELECT newest_event, silver_version FROM store_meta"), "store_meta"
        )
        # The log is read before the transaction begins: on S3 that is one GET per commit.
        added = {
            table: deltalog.added_files(self.paths.table(table), held, version)
            for table, version in changed.items()
            if (held := self.current.version(table)) is not None
        }
        counts: dict[str, int] = {}
        # The keys of the rows each table's sync replaced, for the answers kept in memory (None: all of them).
        keys: dict[Table, frozenset[str] | None] = {}
        writer.begin()
        try:
            for table, version in changed.items():
                one = _only(params, table.value)
                files = added.get(table)
                # None: the rollups table appeared after the store was built.
                if files is None or files.unfollowable is not None:
                    if files is not None:
                        log.info("copying %s again at version %s: %s", table.value, version, files.unfollowable)
                    counts[table.value] = self._reload(writer, table, version, one)
                    keys[table] = None
                    if table is Table.GOLD:  # a second may have gone
                        newest_event = fetch_one(writer.execute('SELECT max("timestamp") FROM gold'), "gold")[0]
                    continue
                counts[table.value] = self._load_files(writer, table, files.files)
                if counts[table.value] == 0:
                    continue
                if table in (Table.GOLD, Table.ROLLUPS):
                    keys[table] = _changed_keys(writer, "gold_key" if table is Table.GOLD else "bucket_key")
                if table is Table.GOLD:
                    newest_second = fetch_one(writer.execute('SELECT max("timestamp") FROM changed_rows'), "gold")[0]
                    newest_event = max(filter(None, [newest_event, newest_second]), default=None)
                    writer.execute("DELETE FROM gold WHERE gold_key IN (SELECT gold_key FROM changed_rows)")
                    writer.execute("INSERT INTO gold BY NAME SELECT * FROM changed_rows ORDER BY gold_key")
                elif table is Table.ROLLUPS:
                    writer.execute("DELETE FROM rollups WHERE bucket_key IN (SELECT bucket_key FROM changed_rows)")
                    writer.execute("INSERT INTO rollups BY NAME SELECT * FROM changed_rows ORDER BY bucket_key")
                else:
                    self._update_devices(writer, old_silver, one)
            writer.execute("DROP TABLE IF EXISTS changed_rows")
            loaded_at = datetime.now(UTC)
            versions = {t: changed.get(t, self.current.version(t)) for t in TABLES}
            writer.execute(
                "UPDATE store_meta SET gold_version = $gold, silver_version = $silver, rollups_version = $rollups, "
                "gold_committed_at = $committed, newest_event = $newest, loaded_at = $loaded, "
                "rollups_created = coalesce(rollups_created, $rollups_created), generation = $generation",
                {
                    "generation": self._generation + 1,
                    "gold": versions[Table.GOLD],
                    "silver": versions[Table.SILVER],
                    "rollups": versions[Table.ROLLUPS],
                    "committed": gold_committed_at,
                    "newest": newest_event,
                    "loaded": loaded_at,
                    "rollups_created": deltalog.created_at(self.paths.table(Table.ROLLUPS)),
                },
            )
            self.kept_generation = None
            writer.commit()
        except BaseException:
            writer.rollback()
            raise
        self._publish(
            self._generation + 1,
            Snapshot(
                versions[Table.GOLD],
                versions[Table.SILVER],
                gold_committed_at,
                newest_event,
                loaded_at,
                versions[Table.ROLLUPS],
                from_store=True,
            ),
            Changes(gold=keys.get(Table.GOLD, frozenset()), rollups=keys.get(Table.ROLLUPS, frozenset())),
        )
        return counts

    def _load_files(self, writer: duckdb.DuckDBPyConnection, table: Table, files: tuple[deltalog.DataFile, ...]) -> int:
        """Read the rows of a table's data files into the temporary table `changed_rows`, with the columns and
        types the store keeps (gold's and the rollups' by name, with their keys; silver's identities); returns how
        many there are.

        The files are read as Parquet, not through `delta_scan`, which would list every file of the version and
        cannot skip those not named: the commits already say which files hold the changes. A partitioned table's
        files (the rollups', by grain) lack their partition columns, which come from the log, as text."""
        if not files:
            return 0
        by_partition: dict[tuple[tuple[str, str | None], ...], list[str]] = {}
        for file in files:
            by_partition.setdefault(file.partition_values, []).append(file.location)
        parts: list[str] = []
        parameters: dict[str, object] = {}
        for group, (values, locations) in enumerate(by_partition.items()):
            parameters[f"files_{group}"] = locations
            # Not from the `grain=minute/` folders DuckDB would otherwise read: Delta's paths are not its values.
            read = f"read_parquet($files_{group}, union_by_name = true, hive_partitioning = false)"
            if not values:
                parts.append(f"SELECT * FROM {read}")
                continue
            # Some writers (Spark's Delta 4) also keep the partition columns in the file, others (delta-rs) do
            # not: the file's copy, if any, gives way to the log's.
            names = ", ".join("'" + name.replace("'", "''") + "'" for name, _ in values)
            partition_columns = ""
            for index, (name, value) in enumerate(values):
                parameters[f"value_{group}_{index}"] = value
                quoted = name.replace('"', '""')
                partition_columns += f', CAST($value_{group}_{index} AS VARCHAR) AS "{quoted}"'
            parts.append(f"SELECT COLUMNS(c -> c NOT IN ({names})){partition_columns} FROM {read}")
        if table is Table.SILVER:
            # Silver's files written before metrics lack the column, which a metadata commit added (lake.upgrade):
            # an empty part that has it lets a union of such files alone name it too (null, read as `value`).
            parts.append("SELECT NULL::VARCHAR AS metric WHERE false")
        # Timestamps as the store keeps them (a writer may store Parquet timestamps without a time zone).
        if table is Table.SILVER:
            columns = f'device_id, {SILVER_METRIC} AS metric, "timestamp"::TIMESTAMPTZ AS "timestamp"'
        elif table is Table.ROLLUPS:
            columns = f'{ROLLUP_KEY_SQL} AS bucket_key, * REPLACE ("timestamp"::TIMESTAMPTZ AS "timestamp")'
        else:
            columns = f'{GOLD_KEY_SQL} AS gold_key, * REPLACE ("timestamp"::TIMESTAMPTZ AS "timestamp")'
        writer.execute(
            f"CREATE OR REPLACE TEMP TABLE changed_rows AS SELECT {columns} FROM ({' UNION ALL BY NAME '.join(parts)})",
            parameters,
        )
        return int(fetch_one(writer.execute("SELECT count(*) FROM changed_rows"), "changed rows")[0])

    def _publish(self, generation: int, snapshot: Snapshot, changes: Changes) -> None:
        """Make a committed snapshot current, and keep it by generation for readers that meet it in store_meta; the
        answers kept in memory learn what changed before any request may read them at the new generation."""
        snapshot = replace(snapshot, generation=generation)
        self._generation = generation
        self._snapshots[generation] = snapshot
        for old in [g for g in self._snapshots if g < generation - 64]:
            del self._snapshots[old]
        self.current = snapshot
        self.answers.advance(generation, changes)
        if len(self.answers):
            # The watermark at the new gold version, read here once (on S3 a request or more) so that the answers
            # kept are rendered again for the new snapshot without waiting on the lake.
            watermark.at_version(self.paths.table(Table.GOLD), snapshot.gold_version)
        self.kept_generation = generation

    def _update_devices(self, writer: duckdb.DuckDBPyConnection, old_version: int, params: dict[str, str]) -> None:
        """Fold silver's changed rows into the summary per device and metric, then the catalog rows of the metrics
        they touched. A changed row is a new reading unless its identity (device, metric, instant) was in silver at
        the version the store had (then it is a correction, which moves no count and no time); that version is read
        only over the changed rows' time range, so DuckDB skips the other files."""
        span = fetch_one(writer.execute('SELECT min("timestamp"), max("timestamp") FROM changed_rows'), "changed rows")
        earlier = (
            f"SELECT {_READING_COLUMNS} FROM delta_scan($silver, version := {int(old_version)}) "
            f'WHERE "timestamp" >= {timestamp_literal(span[0])} AND "timestamp" <= {timestamp_literal(span[1])}'
        )
        writer.execute(
            "CREATE OR REPLACE TEMP TABLE device_changes AS "
            'SELECT c.device_id, c.metric, min(c."timestamp") AS first_reading, max(c."timestamp") AS last_reading, '
            "count(*) FILTER (WHERE e.device_id IS NULL) AS added "
            f"FROM changed_rows c LEFT JOIN ({earlier}) e "
            'ON e.device_id = c.device_id AND e.metric = c.metric AND e."timestamp" = c."timestamp" '
            "GROUP BY c.device_id, c.metric",
            params,
        )
        writer.execute(
            "CREATE OR REPLACE TEMP TABLE merged_devices AS "
            "SELECT c.device_id, c.metric, least(d.first_reading, c.first_reading) AS first_reading, "
            "greatest(d.last_reading, c.last_reading) AS last_reading, "
            "coalesce(d.reading_count, 0) + c.added AS reading_count "
            "FROM device_changes c LEFT JOIN device_metrics d USING (device_id, metric)"
        )
        writer.execute(
            "DELETE FROM device_metrics d USING merged_devices m WHERE d.device_id = m.device_id AND d.metric = m.metric"
        )
        writer.execute("INSERT INTO device_metrics SELECT * FROM merged_devices ORDER BY device_id, metric")
        # The catalog's rows of the touched metrics, again from the summary: a fleet's rows per metric, not history.
        writer.execute("DELETE FROM metrics WHERE metric IN (SELECT metric FROM merged_devices)")
        writer.execute(
            f"INSERT INTO metrics SELECT * FROM ({_CATALOG_SQL} "
            "WHERE metric IN (SELECT metric FROM merged_devices) GROUP BY metric) ORDER BY metric"
        )
        writer.execute("DROP TABLE device_changes")
        writer.execute("DROP TABLE merged_devices")

    # Reading -------------------------------------------------------------------------------------------------

    @contextmanager
    def _cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """This thread's cursor, made once and reused by every request the thread serves (a read nested in another
        on the same thread gets a cursor of its own)."""
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self._local.cursor = self._database.cursor()
        if getattr(self._local, "busy", False):
            nested = self._database.cursor()
            try:
                yield nested
            finally:
                nested.close()
            return
        self._local.busy = True
        try:
            yield cursor
        finally:
            self._local.busy = False

    @contextmanager
    def read(self) -> Iterator[tuple[Snapshot, duckdb.DuckDBPyConnection]]:
        """A cursor and the snapshot its answers belong to: inside one transaction of the store file, or, while the
        file is built, on the lake at the versions pinned by the current snapshot."""
        snapshot = self.current
        with self._cursor() as cursor:
            if not snapshot.from_store:
                yield snapshot, cursor
                return
            cursor.begin()
            try:
                # Only the generation is read (one integer costs less than converting the timestamps of the whole
                # row); the snapshot of a generation is kept in memory, or read whole when it is not.
                generation = fetch_one(cursor.execute("SELECT generation FROM store_meta"), "store_meta")[0]
                found = self._snapshots.get(generation)
                if found is None:
                    found = _stored(fetch_one(cursor.execute(_SNAPSHOT_SQL), "store_meta"), generation)
                yield found, cursor
            finally:
                cursor.rollback()  # the transaction only read

    def read_once(self, query: str, parameters: dict[str, object]) -> tuple[Snapshot, list[tuple]] | None:
        """The rows of one statement over the store file, with the snapshot they belong to, read by that statement
        itself (no transaction to begin and end around it: a statement reads one committed state); None while the
        lake answers, or when the generation it read is no longer known here (`read()` then serves)."""
        current = self.current
        if not current.from_store:
            return None
        with self._cursor() as cursor:
            rows = cursor.execute(
                f"SELECT meta.generation, found.* FROM (SELECT generation FROM store_meta) meta "
                f"LEFT JOIN ({query}) found ON TRUE",
                parameters,
            ).fetchall()
        generation = rows[0][0]
        snapshot = current if current.generation == generation else self._snapshots.get(generation)
        if snapshot is None:
            return None
        # Without a row, the outer join gives one of nulls beside the generation.
        return snapshot, [row[1:] for row in rows if any(value is not None for value in row[1:])]

    def close(self) -> None:
        builder = self._builder
        if builder is not None and builder.is_alive():
            self._database.interrupt()
            builder.join(timeout=30)
        self._writer.close()
        self._database.close()
        self._slot_lock.close()


def _stored(row: tuple, generation: int) -> Snapshot:
    """The snapshot of a store_meta row as _SNAPSHOT_SQL selects it, at its generation."""
    gold, silver, committed, newest, loaded, rollups = row
    return Snapshot(gold, silver, committed, newest, loaded, rollups, from_store=True, generation=generation)


def _only(params: dict[str, str], name: str) -> dict[str, str]:
    """The one location parameter a statement names (DuckDB refuses unused named parameters)."""
    if name not in params:
        raise LakeError(f"the lake has no {name} table yet; run `lakehouse pipeline` first")
    return {name: params[name]}


def _changed_keys(writer: duckdb.DuckDBPyConnection, column: str) -> frozenset[str] | None:
    """The store keys of the changed rows a sync loads (None past MAX_CHANGED_KEYS: as good as all of them)."""
    rows = writer.execute(f"SELECT {column} FROM changed_rows LIMIT {MAX_CHANGED_KEYS + 1}").fetchall()
    return None if len(rows) > MAX_CHANGED_KEYS else frozenset(row[0] for row in rows)
