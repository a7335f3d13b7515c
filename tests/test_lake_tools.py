"""Exploration and upkeep: notebooks run against a lake the real pipeline built, `lakehouse sql --export` opens
in the stock DuckDB command line, and `lakehouse maintain` compacts while the stream writes, losing nothing."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from bench.processes import lakehouse, running_api, start_lakehouse, stop_group
from lake.settings import Settings
from lake.tables import LakePaths, Table
from tests.conftest import HOME, REPO, TEST_KAFKA_PORT
from tests.reference import assert_kpis_equal, gold_kpis
from tests.stream import Stream, dumps
from tests.test_faults import wait_for_new_commit

pytestmark = [pytest.mark.kafka, pytest.mark.spark]

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.py"))
T0 = datetime(2024, 7, 30, 12, 0, tzinfo=UTC)


def fleet(rng: random.Random, singles: int, batches: int) -> Stream:
    stream = Stream()
    for i in range(singles + batches):
        device = f"dev-{rng.randrange(12):02d}"
        count = 1 if i < singles else 100
        readings = [
            (T0 + timedelta(microseconds=rng.randrange(90_000_000)), round(rng.gauss(40, 8), 4)) for _ in range(count)
        ]
        if count == 1:
            stream.single(device, *readings[0])
        else:
            stream.batch(device, readings)
    stream.shuffle(rng)  # the reference follows the send order: a repeated identity's last value wins
    return stream


def send(settings: Settings, messages: list[bytes], path: Path) -> None:
    path.write_bytes(b"".join(m + b"\n" for m in messages))
    result = lakehouse(settings, "produce", str(path))
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def small_lake(broker, spark, tmp_path_factory: pytest.TempPathFactory) -> Settings:  # type: ignore[no-untyped-def]
    """A lake built by the real pipeline from a small fleet with a few bad messages."""
    from pipeline.kafka.broker import ensure_topic
    from pipeline.stream.job import run

    folder = tmp_path_factory.mktemp("small_lake")
    settings = Settings(
        kafka_bootstrap=f"localhost:{TEST_KAFKA_PORT}",
        topic="notebook-fleet",
        home=HOME,
        lake_root=str(folder / "lake"),
        spark_master="local[2]",
        shuffle_partitions=2,
    )
    ensure_topic(settings)
    messages = fleet(random.Random(5), singles=300, batches=8).messages
    messages += [b"not json", dumps({"device_id": "dev-01", "readings": [{"timestamp": "soon", "value": 1}]})]
    send(settings, messages, folder / "fleet.ndjson")
    run(settings, available_now=True, spark=spark)
    return settings


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_paired_and_stripped(script: Path) -> None:
    import jupytext
    import nbformat

    notebook = script.with_suffix(".ipynb")
    assert notebook.exists(), f"{notebook.name} is missing: run `jupytext --sync {script}`"
    stored = nbformat.read(notebook, as_version=4)
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in stored.cells if c.cell_type == "code"
    ), f"{notebook.name} has outputs in git; strip them (jupytext --sync rewrites it without)"
    from_script = jupytext.read(script)
    assert [(c.cell_type, c.source) for c in from_script.cells] == [(c.cell_type, c.source) for c in stored.cells], (
        f"{notebook.name} and {script.name} differ: run `jupytext --sync {script}`"
    )


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_plots(
    script: Path, small_lake: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LAKEHOUSE_LAKE_ROOT", small_lake.lake_root)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    images = [
        o["data"]["image/png"]
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert images, f"{script.stem} drew no plot"
    for index, image in enumerate(images):
        (tmp_path / f"{script.stem}-{index}.png").write_bytes(base64.b64decode(image))
    nbformat.write(notebook, tmp_path / f"{script.stem}.ipynb")
    print(f"{script.stem}: {len(images)} plots in {tmp_path}")


def test_sql_export_opens_in_the_duckdb_cli(small_lake: Settings, tmp_path: Path) -> None:
    from lake.duck import connect

    target = tmp_path / "lake.duckdb"
    result = lakehouse(small_lake, "sql", "--export", str(target))
    assert result.returncode == 0, result.stderr
    cli = shutil.which("duckdb", path=str(Path(sys.executable).parent)) or shutil.which("duckdb")
    assert cli, "the duckdb command line is not installed (pip: duckdb-cli)"
    lake = connect(LakePaths.from_settings(small_lake))
    for table in Table:
        opened = subprocess.run(
            [cli, "-readonly", "-json", str(target), "-c", f"SELECT count(*) AS n FROM {table.value}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert opened.returncode == 0, opened.stderr
        assert json.loads(opened.stdout) == [{"n": lake.sql(f"SELECT count(*) FROM {table.value}").fetchone()[0]}]
    kpis = subprocess.run(
        [cli, "-readonly", "-json", str(target), "-c", "SELECT sum(reading_count)::BIGINT AS n FROM gold"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(kpis.stdout) == [{"n": lake.sql("SELECT count(*) FROM silver").fetchone()[0]}]


def test_maintain_while_the_stream_writes(lake_settings: Settings, topic: str, tmp_path: Path, spark) -> None:  # type: ignore[no-untyped-def]
    from lake.duck import connect
    from lake.maintenance import data_files

    settings = lake_settings.model_copy(update={"max_offsets_per_trigger": 15, "trigger_interval": "200 milliseconds"})
    paths = LakePaths.from_settings(settings)
    sent = fleet(random.Random(9), singles=240, batches=12)
    messages, reference = sent.messages, sent.reference()
    third = len(messages) // 3
    send(settings, messages[:third], tmp_path / "a.ndjson")
    log = tmp_path / "pipeline.log"
    stream = start_lakehouse(settings, "pipeline", log=log)
    try:
        for _ in range(4):
            wait_for_new_commit(paths, Table.SILVER, stream)
        files_before = {t: data_files(paths.table(t)) for t in Table}
        send(settings, messages[third : 2 * third], tmp_path / "b.ndjson")
        maintained = lakehouse(settings, "maintain")
        assert maintained.returncode == 0, maintained.stderr[-3000:]
        assert stream.poll() is None, "the stream stopped while maintenance ran:\n" + log.read_text()[-3000:]
        print(maintained.stdout)
        from delta.tables import DeltaTable

        for table in (Table.BRONZE, Table.SILVER):
            optimized = (
                DeltaTable.forPath(spark, paths.table(table)).history().where("operation = 'OPTIMIZE'").collect()
            )
            assert optimized, f"no OPTIMIZE in {table.value}'s history"
            metrics = optimized[0]["operationMetrics"]  # delta-rs's names, not Spark's numRemovedFiles
            assert int(metrics["numFilesRemoved"]) > int(metrics["numFilesAdded"]), (table, metrics)
        print(f"data files on disk before maintenance {files_before}")

        # The stream goes on with what arrives after maintenance.
        send(settings, messages[2 * third :], tmp_path / "c.ndjson")
        deadline = time.monotonic() + 600
        lake = connect(paths)
        while lake.sql("SELECT count(*) FROM bronze").fetchone()[0] < len(messages):
            assert stream.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the stream did not catch up"
            time.sleep(1)
    finally:
        stop_group(stream, signal.SIGKILL)
    finished = lakehouse(settings, "pipeline", "--available-now")  # completes a batch the kill may have cut
    assert finished.returncode == 0, finished.stderr[-3000:]

    # A zero retention deletes files that a running writer has not committed yet: refused unless asked for.
    refused = lakehouse(settings, "maintain", "--retain-hours", "0")
    assert refused.returncode == 1 and "corrupting the table" in refused.stderr
    # With no writer running, it removes every file the tables no longer use.
    on_disk = {t: data_files(paths.table(t)) for t in Table}
    vacuumed = lakehouse(settings, "maintain", "--retain-hours", "0", "--unsafe-retention")
    assert vacuumed.returncode == 0, vacuumed.stderr[-3000:]
    after = {t: data_files(paths.table(t)) for t in Table}
    assert after[Table.BRONZE] < on_disk[Table.BRONZE] and after[Table.SILVER] < on_disk[Table.SILVER]
    print(f"data files on disk before the final vacuum {on_disk}, after {after}")

    lake = connect(paths)
    gold = gold_kpis(lake)
    expected = reference.buckets()
    assert set(gold) == set(expected)
    for second, want in expected.items():
        assert_kpis_equal(gold[second], want, f"gold {second}")
    # Spark reads every table too, and sees what DuckDB sees.
    for table in Table:
        assert (
            spark.read.format("delta").load(paths.table(table)).count()
            == lake.sql(f"SELECT count(*) FROM {table.value}").fetchone()[0]
        )
    # And so does the API.
    with running_api(settings) as base:
        second, want = next(iter(expected.items()))
        answer = httpx.get(f"{base}/kpis/{second.strftime('%Y-%m-%dT%H:%M:%SZ')}", timeout=5)
        assert answer.status_code == 200
        assert_kpis_equal(answer.json(), want, "API after maintenance")
