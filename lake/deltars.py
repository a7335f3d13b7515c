"""Opening a Delta table with delta-rs (the `deltalake` package), on a local disk or S3, for the tools that run
without Spark: maintenance and retention."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lake import objectstore
from lake.errors import LakeError
from lake.settings import local_path

if TYPE_CHECKING:
    from deltalake import DeltaTable


def open_table(location: str, version: int | None = None) -> DeltaTable:
    """The table at `version`, or at its newest."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    try:
        if objectstore.is_s3(location):  # the same AWS_* settings as Spark and DuckDB
            return DeltaTable(
                objectstore.s3_uri(location), version=version, storage_options=objectstore.access().delta_rs_options()
            )
        return DeltaTable(location, version=version)
    except (DeltaError, OSError) as exc:
        where = (
            ""
            if local_path(location) is not None or objectstore.is_s3(location)
            else (
                "; on an object store delta-rs takes credentials and settings from its own environment variables "
                "(AZURE_*, GOOGLE_*), not from spark.hadoop.* (DEPLOY.md, section 4)"
            )
        )
        raise LakeError(f"cannot open the Delta table at {location}: {exc}{where}") from exc
