"""The design this project replaces, rebuilt faithfully for side-by-side lookups: per-batch `kpi_*.csv` files and a
Flask service that lists them, reads each with pandas and filters by timestamp (the tutorial's Step 3).

Run as `python -m bench.tutorial --folder DIR --port N`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import duckdb


def write_csv_batches(gold_rows: duckdb.DuckDBPyRelation, folder: Path, seconds_per_batch: int) -> int:
    """One `kpi_<n>.csv` per micro-batch of `seconds_per_batch` seconds, as the tutorial's Spark job wrote them."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = gold_rows.df()
    files = 0
    for start in range(0, len(frame), seconds_per_batch):
        frame.iloc[start : start + seconds_per_batch].to_csv(folder / f"kpi_{files}.csv", index=False)
        files += 1
    return files


def create_app(folder: str):  # type: ignore[no-untyped-def]
    import pandas as pd
    from flask import Flask, jsonify

    app = Flask(__name__)

    def get_kpis(timestamp: str) -> list[dict[str, object]]:
        files = [f for f in os.listdir(folder) if f.startswith("kpi_")]
        for file in files:
            frame = pd.read_csv(os.path.join(folder, file))
            found = frame[frame["timestamp"] == timestamp]
            if not found.empty:
                return found.to_dict(orient="records")  # type: ignore[no-any-return]
        return []

    @app.route("/kpis/<timestamp>", methods=["GET"])
    def kpis(timestamp: str):  # type: ignore[no-untyped-def]
        return jsonify(get_kpis(timestamp))

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--port", type=int, required=True)
    arguments = parser.parse_args()
    create_app(arguments.folder).run(host="127.0.0.1", port=arguments.port, debug=False, threaded=True)


if __name__ == "__main__":
    main()
