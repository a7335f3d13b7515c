"""DuckDB over the lake: views `bronze`, `silver`, `gold`, `quarantine`, and the locked-down reader that scans
pinned table versions for the serving snapshot; on a local disk or S3.

DuckDB cannot download extensions here, so the delta, httpfs and aws extensions are loaded from the pinned
`duckdb-extension-*` wheels, which carry them for exactly the installed DuckDB version.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from lake import deltalog, objectstore, upgrade, watermark
from lake.errors import LakeError
from lake.settings import local_path
from lake.tables import LakePaths, Table
from lake.upgrade import SILVER_METRIC


def extension(name: str) -> Path:
    """The file of a DuckDB extension (delta, httpfs, aws) from its `duckdb-extension-<name>` wheel."""
    import importlib

    try:
        package = importlib.import_module(f"duckdb_extension_{name}")
    except ImportError:
        package = None
    folder = Path(package.__file__).parent if package is not None and package.__file__ else Path("?")
    path = folder / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not path.exists():
        raise LakeError(
            f"no {name} extension for DuckDB {duckdb.__version__} at {path}; "
            f"install duckdb-extension-{name} at the same version as duckdb"
        )
    return path


def delta_extension() -> Path:
    return extension("delta")


def open_lake_storage(connection: duckdb.DuckDBPyConnection, root: str) -> None:
    """Load the delta extension, and for a lake on S3 the httpfs and aws extensions and a secret from the standard
    AWS settings (after checking that they name credentials and an existing bucket)."""
    connection.load_extension(str(extension("delta")))
    if objectstore.is_s3(root):
        objectstore.check_access(root)
        connection.load_extension(str(extension("httpfs")))
        connection.load_extension(str(extension("aws")))
        objectstore.access().create_duckdb_secret(connection)


def reader_location(location: str) -> str:
    """A table's location as DuckDB reads and compares it: a local folder (not a `file:` URI), or `s3://`."""
    folder = local_path(location)
    return str(folder) if folder is not None else objectstore.s3_uri(location)


def allowed_prefix(root: str) -> str:
    """The lake root as DuckDB's allowed_directories takes it."""
    return reader_location(root).rstrip("/") + "/"


def table_exists(paths: LakePaths, table: Table) -> bool:
    """Whether the table has its first commit (or a checkpoint, once old commits are cleaned up); on other stores
    than a local disk or S3, assumed.

    The `_delta_log` folder appears before its first commit file, and a reader of a log without one fails."""
    location = paths.table(table)
    folder = local_path(location)
    if folder is None:
        return not objectstore.is_s3(location) or deltalog.exists(location)
    return (folder / "_delta_log" / "00000000000000000000.json").is_file() or any(
        (folder / "_delta_log").glob("*.checkpoint*.parquet")
    )


def connect(paths: LakePaths, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A connection with the delta extension loaded and one view per existing table; a lake written before metrics
    is upgraded first (lake.upgrade)."""
    upgrade.upgrade_lake(paths)
    connection = duckdb.connect(
        database,
        config={"autoinstall_known_extensions": "false", "autoload_known_extensions": "false"},
    )
    open_lake_storage(connection, paths.root)
    connection.execute("SET TimeZone = 'UTC'")  # timestamps print and truncate in UTC, as the contract speaks
    create_views(connection, paths)
    return connection


# The columns a view leads with: its key, the metric beside the time. Silver's readings written before metrics hold
# a null metric (lake.upgrade), read as `value`.
_LEADING = {
    Table.SILVER: f"device_id, {SILVER_METRIC} AS metric, * EXCLUDE (device_id, metric)",
    Table.GOLD: "metric, * EXCLUDE (metric)",
    Table.ROLLUPS: "grain, metric, * EXCLUDE (grain, metric)",
}
# A bucket's end, for the `final` column of the gold and rollups views.
_BUCKET_END = {
    Table.GOLD: '"timestamp" + INTERVAL 1 SECOND',
    Table.ROLLUPS: (
        "\"timestamp\" + CASE grain WHEN 'minute' THEN INTERVAL 1 MINUTE WHEN 'hour' THEN INTERVAL 1 HOUR "
        "ELSE INTERVAL 1 DAY END"
    ),
}


def create_views(connection: duckdb.DuckDBPyConnection, paths: LakePaths) -> list[Table]:
    """A view per existing table, and `watermark`: one row with the watermark recorded at gold's newest version
    when the views were made (lake.watermark). The gold and rollups views add `final`, true for a bucket that ends
    at or before it."""
    created = []
    mark = watermark.NONE
    gold = deltalog.latest_version(paths.table(Table.GOLD))
    if gold is not None:
        mark = watermark.at_version(paths.table(Table.GOLD), gold.version)
    moment = "NULL" if mark.watermark_us is None else f"make_timestamptz({int(mark.watermark_us)})"
    connection.execute(f"CREATE OR REPLACE VIEW watermark AS SELECT {moment}::TIMESTAMPTZ AS watermark")
    for table in Table:
        if not table_exists(paths, table):
            continue
        location = reader_location(paths.table(table)).replace("'", "''")
        columns = _LEADING.get(table, "*")
        if table in _BUCKET_END:
            columns = f"{columns}, coalesce({_BUCKET_END[table]} <= {moment}::TIMESTAMPTZ, false) AS final"
        connection.execute(f"CREATE OR REPLACE VIEW {table.value} AS SELECT {columns} FROM delta_scan('{location}')")
        created.append(table)
    return created


def connect_reader(paths: LakePaths) -> duckdb.DuckDBPyConnection:
    """A connection that reads the lake's Delta tables and nothing else: file access is limited to the lake root
    and the configuration is locked, so no later statement can widen it."""
    connection = duckdb.connect(
        ":memory:", config={"autoinstall_known_extensions": "false", "autoload_known_extensions": "false"}
    )
    open_lake_storage(connection, paths.root)
    connection.execute("SET TimeZone = 'UTC'")
    connection.execute("SET allowed_directories = [$root]", {"root": allowed_prefix(paths.root)})
    connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")
    return connection
