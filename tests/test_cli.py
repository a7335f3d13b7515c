"""The `lakehouse` command line: one flag per setting, made from the `Settings` model, and a help that reads in
80 columns."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import typer
from typer.testing import CliRunner

import lakehouse
from bench.processes import LAKEHOUSE
from lake.settings import Settings, setting_flags

# flags that the Makefile, README, DEPLOY.md, the benchmark and the tests give
EXISTING_FLAGS = {
    "--kafka-bootstrap",
    "--topic",
    "--topic-partitions",
    "--topic-replication",
    "--topic-min-insync-replicas",
    "--kafka-properties",
    "--max-message-bytes",
    "--lake-root",
    "--checkpoint-root",
    "--home",
    "--spark-master",
    "--spark-driver-memory",
    "--spark-executor-memory",
    "--shuffle-partitions",
    "--trigger-interval",
    "--max-offsets-per-trigger",
    "--starting-offsets",
    "--extra-timestamp-format",
    "--fail-on-data-loss",
    "--no-fail-on-data-loss",
    "--http-host",
    "--http-port",
    "--verbose",
}
EXISTING_SERVE_FLAGS = {
    "--port",
    "--workers",
    "--refresh-seconds",
    "--rate-limit",
    "--cors-origins",
    "--max-range-buckets",
    "--kafka-timeout-seconds",
}


def help_text(*args: str) -> str:
    env = os.environ | {"COLUMNS": "80", "NO_COLOR": "1"}
    return subprocess.run([*LAKEHOUSE, *args, "--help"], env=env, capture_output=True, text=True, check=True).stdout


def words(text: str) -> str:
    """The help's words, one space apart, without the panels' borders: wrapped lines joined again."""
    return " ".join(text.replace("│", " ").split())


def option_names(command: object) -> set[str]:
    return {name for param in command.params for name in [*param.opts, *param.secondary_opts]}  # type: ignore[attr-defined]


def test_help_lists_the_commands_first_then_every_setting_by_group_in_80_columns() -> None:
    text = help_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    panels = [match.group(1) for match in re.finditer(r"╭─ (.+?) ─", text)]
    assert panels == ["Commands", "Options", "Kafka", "Lake", "Spark", "Streaming job", "API"]
    for flag in setting_flags():  # each whole, none cut at the panel's edge
        assert f" {flag.flag} " in words(text), flag.name
        assert f" {flag.env}, default {flag.default} " in words(text), flag.name


def test_serve_help_shows_the_api_settings_under_its_own_names() -> None:
    text = help_text("serve")
    assert max(len(line) for line in text.splitlines()) <= 80
    for flag in setting_flags():
        if flag.serve_flag is not None:
            assert f" {flag.serve_flag} " in words(text), flag.name
            assert f" {flag.env}, default {flag.default} " in words(text), flag.name


def test_flags_the_docs_give_still_work() -> None:
    root = typer.main.get_command(lakehouse.app)
    assert EXISTING_FLAGS <= option_names(root)
    assert EXISTING_SERVE_FLAGS <= option_names(root.commands["serve"])  # type: ignore[attr-defined]


def test_flags_win_over_variables_which_win_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    started: dict[str, object] = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **options: started.update(options))
    monkeypatch.setattr(os, "environ", os.environ.copy())  # serve exports the settings for its workers
    for variable in [name for name in os.environ if name.startswith("LAKEHOUSE_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("LAKEHOUSE_TOPIC", "from-variable")
    monkeypatch.setenv("LAKEHOUSE_HTTP_PORT", "9000")
    monkeypatch.setenv("LAKEHOUSE_API_RATE_LIMIT", "7")
    monkeypatch.setenv("LAKEHOUSE_SHUFFLE_PARTITIONS", "9")
    args = ["--http-host", "0.0.0.0", "--shuffle-partitions", "3", "--no-fail-on-data-loss"]
    args += ["--extra-timestamp-format", "%d/%m/%Y %H:%M", "--extra-timestamp-format", "%Y%m%d"]
    result = CliRunner().invoke(lakehouse.app, [*args, "serve", "--port", "9100", "--rate-limit", "5"])
    assert result.exit_code == 0, result.output
    assert started["host"] == "0.0.0.0" and started["port"] == 9100 and started["workers"] == 1
    exported = os.environ  # what the API's worker processes read
    assert exported["LAKEHOUSE_TOPIC"] == "from-variable"  # variable over default
    assert exported["LAKEHOUSE_SHUFFLE_PARTITIONS"] == "3"  # flag over variable
    assert exported["LAKEHOUSE_API_RATE_LIMIT"] == "5"  # serve's flag over variable
    assert exported["LAKEHOUSE_FAIL_ON_DATA_LOSS"] == "False"
    assert exported["LAKEHOUSE_EXTRA_TIMESTAMP_FORMATS"] == '["%d/%m/%Y %H:%M", "%Y%m%d"]'
    assert "LAKEHOUSE_API_REFRESH_SECONDS" not in exported  # unset: the API picks it by where the lake is


def test_the_api_refresh_follows_the_lake_store_unless_set() -> None:
    assert Settings(lake_root="/data/lake").api_refresh_interval == 0.25  # a lookup per table: about 1 ms
    assert Settings(lake_root="file:///data/lake").api_refresh_interval == 0.25
    assert Settings(lake_root="s3a://bucket/lake").api_refresh_interval == 1.0  # a billed request per table
    assert Settings(lake_root="s3a://bucket/lake", api_refresh_seconds=5).api_refresh_interval == 5


def test_a_bad_setting_is_one_error_naming_it() -> None:
    result = CliRunner().invoke(lakehouse.app, ["--starting-offsets", "middle", "sql", "SELECT 1"])
    assert result.exit_code == 1
    assert "error:" in result.output and "starting_offsets must be 'earliest' or 'latest'" in result.output


def test_a_lake_error_is_one_error_line_and_exit_status_1() -> None:
    result = CliRunner().invoke(
        lakehouse.app, ["--kafka-properties", "/nonexistent/client.properties", "produce", "-"], input='{"a": 1}\n'
    )
    assert result.exit_code == 1
    assert "error: cannot read LAKEHOUSE_KAFKA_PROPERTIES=/nonexistent/client.properties" in result.output
    assert "Traceback" not in result.output
