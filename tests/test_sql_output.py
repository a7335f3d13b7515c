"""`lakehouse sql --output csv` writes CSV as Unix tools (and the stock `duckdb -csv`) do: lines end with LF."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from bench.processes import LAKEHOUSE
from lake.sql import run_query

QUERY = "SELECT 1 AS n, 'a,b' AS text, 'say \"hi\"' AS quoted UNION ALL SELECT 2, 'c', 'd' ORDER BY n"


def test_csv_lines_end_with_lf_and_quote_as_csv_does() -> None:
    out = io.StringIO()
    rows = run_query(duckdb.connect(), QUERY, "csv", out)
    assert rows == 2
    assert out.getvalue() == 'n,text,quoted\n1,"a,b","say ""hi"""\n2,c,d\n'


def test_csv_is_what_the_stock_duckdb_command_line_writes() -> None:
    duckdb_cli = shutil.which("duckdb", path=str(Path(sys.executable).parent)) or shutil.which("duckdb")
    if duckdb_cli is None:
        pytest.skip("no duckdb command line")
    out = io.StringIO()
    run_query(duckdb.connect(), QUERY, "csv", out)
    stock = subprocess.run([duckdb_cli, "-csv", "-c", QUERY], capture_output=True, text=True, check=True)
    assert out.getvalue() == stock.stdout


def test_the_demo_reads_a_timestamp_from_the_last_csv_line(tmp_path: Path) -> None:
    # The Makefile's demo does `ts=$(lakehouse sql --output csv "SELECT strftime(...) ..." | tail -n 1)` and
    # curls /kpis/$ts: a trailing CR would end up in the URL.
    query = "SELECT strftime(TIMESTAMP '2024-07-30 12:00:24', '%Y-%m-%dT%H:%M:%SZ')"
    result = subprocess.run(
        [*LAKEHOUSE, "--lake-root", str(tmp_path / "lake"), "sql", "--output", "csv", query],
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert result.stdout.splitlines(keepends=True)[-1] == b"2024-07-30T12:00:24Z\n"
