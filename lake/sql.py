"""Ad hoc SQL over the lake with DuckDB: one-shot queries printed as a table, CSV or JSON, and a prompt."""

from __future__ import annotations

import csv
import json
from typing import TextIO

import duckdb

from lake.rows import fetch_one

_MAX_TABLE_ROWS = 1000


def _printable(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value[:200]).decode("utf-8", "backslashreplace")
        return text + ("..." if len(value) > 200 else "")
    return value


def run_query(connection: duckdb.DuckDBPyConnection, query: str, output: str, stream: TextIO) -> int:
    """Run one query and print its rows; returns the number of rows."""
    result = connection.execute(query)
    if result.description is None:
        return 0
    names = [column[0] for column in result.description]
    rows = result.fetchall()
    if output == "csv":
        writer = csv.writer(stream, lineterminator="\n")  # LF, as `duckdb -csv` and Unix tools write CSV
        writer.writerow(names)
        writer.writerows([[_printable(v) for v in row] for row in rows])
    elif output == "json":
        stream.writelines(json.dumps(dict(zip(names, map(_printable, row))), default=str) + "\n" for row in rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*names, show_lines=False)
        for row in rows[:_MAX_TABLE_ROWS]:
            table.add_row(*["NULL" if v is None else str(_printable(v)) for v in row])
        console = Console(file=stream, width=200 if not stream.isatty() else None)
        console.print(table)
        more = f" (first {_MAX_TABLE_ROWS} shown)" if len(rows) > _MAX_TABLE_ROWS else ""
        console.print(f"{len(rows)} rows{more}")
    return len(rows)


def interactive(connection: duckdb.DuckDBPyConnection) -> None:
    """A small prompt: statements end with ';', '.quit' or Ctrl-D leaves."""
    import sys

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(
        "DuckDB over the lake: views bronze, silver, gold, rollups, quarantine, metrics. "
        "End statements with ';', .quit to leave."
    )
    buffer: list[str] = []
    while True:
        try:
            line = input("lake> " if not buffer else "  ... ")
        except EOFError:
            print()
            return
        if not buffer and line.strip() in {".quit", ".exit"}:
            return
        buffer.append(line)
        statement = "\n".join(buffer).strip()
        if not statement.endswith(";"):
            continue
        buffer.clear()
        try:
            run_query(connection, statement, "table", sys.stdout)
        except duckdb.Error as exc:
            print(f"error: {exc}")


def export(connection: duckdb.DuckDBPyConnection, target: str) -> dict[str, int]:
    """Copy the lake's views into a DuckDB database file as tables (a snapshot any DuckDB client opens offline,
    without the delta extension). Returns the rows per table."""
    from pathlib import Path

    path = Path(target)
    if path.exists():
        path.unlink()
    escaped = str(path).replace("'", "''")
    connection.execute(f"ATTACH '{escaped}' AS export")
    counts = {}
    try:
        listed = connection.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal AND database_name = current_database() ORDER BY 1"
        ).fetchall()
        views = [row[0] for row in listed]
        for view in views:
            connection.execute(f'CREATE TABLE export."{view}" AS SELECT * FROM "{view}"')
            counts[view] = fetch_one(connection.execute(f'SELECT count(*) FROM export."{view}"'), f"count of {view}")[0]
    finally:
        connection.execute("DETACH export")
    return counts
