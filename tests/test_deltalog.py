"""lake.deltalog finds a table's newest version by asking for commit files by name, so that a reader polling the
log pays the same whatever the log's length."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lake import deltalog


def commit(log: Path, version: int, millis: int | None = None) -> None:
    info = {"commitInfo": {"timestamp": millis if millis is not None else 1_700_000_000_000 + version}}
    (log / f"{version:020d}.json").write_text(json.dumps(info) + '\n{"add": {}}\n')


@pytest.fixture
def log(tmp_path: Path) -> Path:
    folder = tmp_path / "gold" / "_delta_log"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def no_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: object) -> list[str]:
        raise AssertionError(f"listed {path}")

    monkeypatch.setattr(os, "listdir", refuse)


def test_newest_version_and_commit_time(log: Path, no_listing: None) -> None:
    table = str(log.parent)
    assert deltalog.latest_version(str(log.parent.parent / "silver")) is None  # no table
    for version in range(37):
        commit(log, version)
    found = deltalog.latest_version(table)
    assert found == deltalog.TableVersion(36, datetime.fromtimestamp(1_700_000_000.036, UTC))
    for known in (0, 17, 35, 36):
        assert deltalog.latest_version(table, known=known) == found
    commit(log, 37)
    assert deltalog.latest_version(table, known=36).version == 37  # type: ignore[union-attr]


def test_log_cleaned_up_to_a_checkpoint(log: Path, no_listing: None) -> None:
    """Old commits deleted by log cleanup: the search starts at the last checkpoint."""
    for version in range(1000, 1013):
        commit(log, version)
    (log / "_last_checkpoint").write_text(json.dumps({"version": 1010, "size": 3}))
    assert deltalog.latest_version(str(log.parent)).version == 1012  # type: ignore[union-attr]
    assert deltalog.latest_version(str(log.parent), known=1011).version == 1012  # type: ignore[union-attr]


def test_a_table_made_anew_with_fewer_versions(log: Path, no_listing: None) -> None:
    for version in range(3):
        commit(log, version)
    assert deltalog.latest_version(str(log.parent), known=40).version == 2  # type: ignore[union-attr]


def test_no_pointer_and_no_first_commit_lists_once(log: Path) -> None:
    """A log without version 0 and without `_last_checkpoint` (written by another tool) is listed."""
    for version in (5, 6):
        commit(log, version)
    assert deltalog.latest_version(str(log.parent)).version == 6  # type: ignore[union-attr]


def test_cost_does_not_follow_the_log_length(log: Path, no_listing: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that knows the current version asks for one file when nothing changed, and a few when a few
    commits came: however long the log."""
    for version in range(2000):
        (log / f"{version:020d}.json").touch()
    commit(log, 1999)
    asked: list[str] = []
    is_file = Path.is_file

    def counted(path: Path) -> bool:
        asked.append(path.name)
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", counted)
    assert deltalog.latest_version(str(log.parent), known=1999).version == 1999  # type: ignore[union-attr]
    assert len(asked) == 2  # the known version, and the next one
    asked.clear()
    for version in range(2000, 2003):
        commit(log, version)
    assert deltalog.latest_version(str(log.parent), known=1999).version == 2002  # type: ignore[union-attr]
    assert len(asked) <= 6
