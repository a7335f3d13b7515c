"""The smoke run of `lakehouse bench --quick`: every part runs from a fresh set-up and reports its figures.
Timings are not asserted (a benchmark is not a timed test); what the figures count is."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from bench.processes import LAKEHOUSE
from tests.conftest import HOME

pytestmark = [pytest.mark.kafka, pytest.mark.spark]


def test_bench_quick_reports_every_figure(tmp_path: Path) -> None:
    figures_file = tmp_path / "figures.json"
    markdown_file = tmp_path / "BENCHMARKS-table.md"
    result = subprocess.run(
        [
            *LAKEHOUSE,
            "--home",
            str(HOME),
            "--spark-master",
            "local[2]",
            "--shuffle-partitions",
            "2",
            "bench",
            "--quick",
            "--folder",
            str(tmp_path / "bench"),
            "--json",
            str(figures_file),
            "--markdown",
            str(markdown_file),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    print(result.stdout)
    figures = {f["name"]: f for f in json.loads(figures_file.read_text())}
    ingest = figures["ingest, Kafka to gold (micro-batches)"]
    assert ingest["ours"] > 0 and ingest["reference"] > 0
    assert "readings in" in ingest["note"] and "floor: raw" in ingest["note"]
    rate = figures["ingest readings/s, Kafka to gold"]
    assert rate["ours"] > 0 and rate["reference"] > 0
    # Whichever way the run went, each goal's verdict is the one its own figures give: at least the floor's rate.
    for figure in (ingest, rate):
        assert figure["goal"] == "≥ 1.0x floor"
        assert figure["met"] is (figure["ours"] >= figure["reference"]), figure
        assert figure["ratio"] == pytest.approx(figure["ours"] / figure["reference"])
    least = figures["ingest against the contract's minimum writes"]
    # The floor's two appends plus gold's: a slower reference than the floor, and no goal.
    assert least["ours"] == ingest["ours"] and 0 < least["reference"] < ingest["reference"] and least["met"] is None
    freshness = figures["freshness p50, produce to API"]
    assert (
        freshness["note"].startswith("6 of 6 readings seen") and "(floor: 6 through its Delta log)" in freshness["note"]
    )
    assert freshness["reference"] > 0 and figures["freshness p95, produce to API"]["reference"] > 0
    # The same readings through a stream that commits each micro-batch to three tables; the pipeline's own p50.
    minimum = figures["freshness p50 against the contract's minimum writes"]
    assert minimum["note"].startswith("6 readings seen through the first table's Delta log")
    assert minimum["reference"] > 0 and minimum["ours"] == freshness["ours"] and minimum["met"] is None
    assert figures["freshness p95 against the contract's minimum writes"]["reference"] > 0
    for kind in ("cold", "hot"):
        lookups = figures[f"{kind} lookup p99 at 100 requests/s"]
        assert "300 of 300 answered 200, 0 errors" in lookups["note"], lookups
        peak = figures[f"{kind} lookup throughput vs trivial route"]
        assert peak["reference"] > 0 and "answered 200" in peak["note"]
    # The hot part ran while gold took commits, which moved the API's snapshot on.
    assert re.search(r", [1-9]\d* commits while it ran", figures["hot lookup throughput vs trivial route"]["note"])
    assert figures["lookup p50, one client"]["reference"] > 0
    serving = figures["serving: answers equal to the formula"]
    assert serving["ours"] > 0 and serving["met"] is True
    assert figures["serving: API peak RSS"]["ours"] > 0
    assert "statuses {200: 50}" in figures["serving p99: a second of the fleet"]["note"]
    assert "| figure | ours | reference | ratio | goal | met |" in markdown_file.read_text()
