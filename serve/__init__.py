"""The HTTP API over gold and silver, served with Litestar; it reads the lake through `lake.duck` only."""
