"""The one row a query must give: an aggregate without grouping always gives exactly one, so a missing row is a
broken query or file, reported as such instead of as `None` failing later."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lake.errors import LakeError

if TYPE_CHECKING:
    import duckdb
    from pyspark.sql import DataFrame, Row


def first_row(frame: DataFrame, what: str) -> Row:
    """The first row of a Spark frame that must have one; `what` names it in the error."""
    row = frame.first()
    if row is None:
        raise LakeError(f"{what} gave no row")
    return row


def fetch_one(result: duckdb.DuckDBPyConnection, what: str) -> tuple[Any, ...]:
    """The next row of an executed DuckDB query that must have one; `what` names it in the error."""
    row = result.fetchone()
    if row is None:
        raise LakeError(f"{what} gave no row")
    return row
