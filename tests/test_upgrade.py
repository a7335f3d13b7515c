"""A lake written before metrics existed (tests/data/lake-before-metrics: the Delta tables the release before metrics
wrote from `input.ndjson`, and what its `lakehouse sql` read from them) is upgraded in place, once, by whichever of
`lakehouse sql`, the API or the pipeline meets it first, also after a crash in the middle of the upgrade; its
answers for metric `value` are what they were, and the pipeline goes on writing it."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.processes import lakehouse
from lake import deltalog, upgrade
from lake.settings import Settings
from lake.tables import LakePaths, Table
from tests.conftest import HOME
from tests.stream import dumps

BEFORE = Path(__file__).parent / "data" / "lake-before-metrics"
TABLES = ("bronze", "silver", "gold", "rollups", "quarantine")
# Columns the old code's export left out or that name when a row was written, not what it holds.
_WHEN = {"updated_at", "quarantined_at", "ingested_at"}


def old_lake(folder: Path) -> Settings:
    root = folder / "lake"
    root.mkdir(parents=True)
    for table in TABLES:
        shutil.copytree(BEFORE / table, root / table)
    return Settings(lake_root=str(root), home=HOME)


def expected(table: str) -> list[dict[str, object]]:
    """What the release before metrics read from the table, with the metric it reads as now."""
    rows = [json.loads(line) for line in (BEFORE / f"expected-{table}.ndjson").read_text().splitlines()]
    for row in rows:
        # Gold, the rollups and silver read as metric `value`; a quarantine row of that time names no metric.
        row["metric"] = None if table == "quarantine" else "value"
    return rows


def read(settings: Settings, table: str, env: dict[str, str] | None = None) -> list[dict[str, object]]:
    result = lakehouse(settings, "sql", "--output", "json", f"SELECT * FROM {table}", env_extra=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return [{k: v for k, v in row.items() if k not in _WHEN} for row in rows]


def _key(row: dict[str, object]) -> str:
    return json.dumps(row, sort_keys=True, default=str)


def versions(settings: Settings) -> dict[str, int | None]:
    paths = LakePaths.from_settings(settings)
    found = {}
    for table in Table:
        latest = deltalog.latest_version(paths.table(table))
        found[table.value] = None if latest is None else latest.version
    return found


def test_sql_upgrades_an_old_lake_once_even_after_a_crash_and_its_answers_stay(tmp_path: Path) -> None:
    settings = old_lake(tmp_path)
    paths = LakePaths.from_settings(settings)
    assert upgrade.pending(paths) == [Table.SILVER, Table.GOLD, Table.ROLLUPS, Table.QUARANTINE]

    # Killed after gold's rows took their metric, before gold was marked done and before the rollups were touched.
    crashed = lakehouse(settings, "sql", "SELECT 1", env_extra={"LAKEHOUSE_TEST_CRASH_AFTER": "upgrade_gold_filled"})
    assert crashed.returncode != 0
    assert upgrade.pending(paths) == [Table.GOLD, Table.ROLLUPS, Table.QUARANTINE]

    for table in ("gold", "rollups", "silver", "quarantine"):
        got = read(settings, table)
        assert sorted(map(_key, got)) == sorted(map(_key, expected(table))), table
    assert upgrade.pending(paths) == []
    assert read(settings, "metrics")[0]["metric"] == "value"

    # Once: a later start changes no table.
    before = versions(settings)
    assert read(settings, "gold")
    assert versions(settings) == before


def test_the_api_upgrades_an_old_lake_and_answers_as_before(tmp_path: Path) -> None:
    from litestar.testing import TestClient

    from serve.app import create_app
    from tests.serve_lake import api_settings

    settings = old_lake(tmp_path)
    gold = {row["timestamp"]: row for row in expected("gold")}
    with TestClient(create_app(api_settings(settings.lake_root))) as client:
        for timestamp, row in gold.items():
            instant = datetime.fromisoformat(str(timestamp)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for query in ({}, {"metric": "value"}):
                answer = client.get(f"/kpis/{instant}", params=query)
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert body["metric"] == "value"
                for field in ("reading_count", "device_count", "average_value", "min_value", "max_value"):
                    assert body[field] == row[field], (instant, field)
        unknown = client.get(f"/kpis/{instant}", params={"metric": "pressure_bar"})
        assert unknown.status_code == 404 and "value" in unknown.text
    assert upgrade.pending(LakePaths.from_settings(settings)) == []


@pytest.mark.kafka
@pytest.mark.spark
def test_the_pipeline_finishes_an_upgrade_and_corrects_an_old_reading(
    tmp_path: Path, lake_settings: Settings, topic: str
) -> None:
    """The pipeline meets a lake whose upgrade crashed after silver's column: it finishes the upgrade, and a
    correction of a reading written before metrics replaces it (silver's old rows are metric `value`), beside a new
    metric of the same device and instant."""
    root = Path(lake_settings.lake_root)
    root.mkdir(parents=True)
    for table in TABLES:
        shutil.copytree(BEFORE / table, root / table)
    crashed = lakehouse(
        lake_settings, "sql", "SELECT 1", env_extra={"LAKEHOUSE_TEST_CRASH_AFTER": "upgrade_silver_column"}
    )
    assert crashed.returncode != 0
    # pump-2's reading at 10:00:00.5 was 13.0 (a correction of 12.0 in the old lake); now 14.0, and its flow too.
    at = "2026-11-30T10:00:00.500Z"
    corrections = [
        dumps({"device_id": "pump-2", "timestamp": at, "value": 14.0}),
        dumps({"device_id": "pump-2", "timestamp": at, "metric": "flow_m3h", "value": 3.5}),
    ]
    path = tmp_path / "more.ndjson"
    path.write_bytes(b"\n".join(corrections) + b"\n")
    sent = lakehouse(lake_settings, "produce", str(path))
    assert sent.returncode == 0, sent.stderr[-3000:]
    run = lakehouse(lake_settings, "pipeline", "--available-now")
    assert run.returncode == 0, run.stderr[-5000:]
    assert upgrade.pending(LakePaths.from_settings(lake_settings)) == []

    silver = read(lake_settings, "silver")
    at_half = [
        r for r in silver if r["device_id"] == "pump-2" and str(r["timestamp"]).startswith("2026-11-30 10:00:00.5")
    ]
    assert sorted((r["metric"], r["value"]) for r in at_half) == [("flow_m3h", 3.5), ("value", 14.0)]
    assert len(silver) == len(expected("silver")) + 1
    gold = {(r["metric"], str(r["timestamp"])): r for r in read(lake_settings, "gold")}
    second = "2026-11-30 10:00:00+00:00"
    assert gold[("value", second)]["sum_value"] == 10.5 + 14.0 and gold[("value", second)]["revision"] == 1
    assert gold[("flow_m3h", second)]["reading_count"] == 1
    rollups = {
        (r["grain"], r["metric"], r["device_id"], str(r["timestamp"])): r for r in read(lake_settings, "rollups")
    }
    assert rollups[("minute", "value", None, second)]["max_value"] == 14.0
    assert rollups[("day", "flow_m3h", "pump-2", "2026-11-30 00:00:00+00:00")]["sum_value"] == 3.5
