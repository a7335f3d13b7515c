"""The lake: table names, paths, schemas, settings and DuckDB access, shared by the pipeline and the API."""
