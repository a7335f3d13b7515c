"""DuckDB over the lake: views `bronze`, `silver`, `gold`, `quarantine`, and the locked-down reader that scans
pinned table versions for the serving snapshot.

DuckDB cannot download extensions here, so the delta extension is loaded from the pinned
`duckdb-extension-delta` wheel, which carries it for exactly the installed DuckDB version.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from lake.errors import LakeError
from lake.settings import local_path
from lake.tables import LakePaths, Table

if TYPE_CHECKING:
    import pyarrow as pa


def delta_extension() -> Path:
    import duckdb_extension_delta

    path = (
        Path(duckdb_extension_delta.__file__).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / "delta.duckdb_extension"
    )
    if not path.exists():
        raise LakeError(
            f"no delta extension for DuckDB {duckdb.__version__} at {path}; "
            "install duckdb-extension-delta at the same version as duckdb"
        )
    return path


def table_exists(paths: LakePaths, table: Table) -> bool:
    """Whether the table has its first commit; on object stores assumed (listing them costs a request per table).

    The `_delta_log` folder appears before its first commit file, and a reader of a log without one fails."""
    folder = local_path(paths.table(table))
    return (
        folder is None
        or (folder / "_delta_log" / "00000000000000000000.json").is_file()
        or any((folder / "_delta_log").glob("*.checkpoint*.parquet"))
    )


def connect(paths: LakePaths, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A connection with the delta extension loaded and one view per existing table."""
    connection = duckdb.connect(
        database,
        config={"autoinstall_known_extensions": "false", "autoload_known_extensions": "false"},
    )
    connection.load_extension(str(delta_extension()))
    connection.execute("SET TimeZone = 'UTC'")  # timestamps print and truncate in UTC, as the contract speaks
    create_views(connection, paths)
    return connection


def create_views(connection: duckdb.DuckDBPyConnection, paths: LakePaths) -> list[Table]:
    created = []
    for table in Table:
        if not table_exists(paths, table):
            continue
        location = paths.table(table).replace("'", "''")
        connection.execute(f"CREATE OR REPLACE VIEW {table.value} AS SELECT * FROM delta_scan('{location}')")
        created.append(table)
    return created


def connect_reader(paths: LakePaths) -> duckdb.DuckDBPyConnection:
    """A connection that reads the lake's Delta tables and nothing else: file access is limited to the lake root
    and the configuration is locked, so no later statement can widen it."""
    connection = duckdb.connect(
        ":memory:", config={"autoinstall_known_extensions": "false", "autoload_known_extensions": "false"}
    )
    connection.load_extension(str(delta_extension()))
    connection.execute("SET TimeZone = 'UTC'")
    folder = local_path(paths.root)
    if folder is not None:  # object stores need their own secrets and extensions, set up by whoever runs them
        connection.execute("SET allowed_directories = [$root]", {"root": str(folder).rstrip("/") + "/"})
        connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")
    return connection


def scan_table(
    connection: duckdb.DuckDBPyConnection, location: str, version: int, updated_since: datetime | None
) -> pa.Table:
    """Rows of one pinned table version, all of them or those updated at or after `updated_since`."""
    folder = local_path(location)  # a `file:` URI as the folder it names, the spelling allowed_directories compares
    query = "SELECT * FROM delta_scan($location, version := $version)"
    parameters: dict[str, object] = {"location": str(folder) if folder else location, "version": version}
    if updated_since is not None:
        query += " WHERE updated_at >= $since"
        parameters["since"] = updated_since
    return connection.execute(query, parameters).to_arrow_table()
