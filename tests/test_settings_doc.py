"""README's settings table says what the `Settings` model does: each setting's variable, flags and default."""

from __future__ import annotations

import re
from pathlib import Path

from lake.settings import setting_flags

README = Path(__file__).resolve().parent.parent / "README.md"


def settings_table() -> dict[str, tuple[str, str]]:
    """The rows of README's "## Settings" table: variable -> (flag cell, default cell)."""
    section = README.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("| `LAKEHOUSE_"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def test_every_setting_is_in_the_readme_with_its_variable_flag_and_default() -> None:
    table = settings_table()
    for flag in setting_flags():
        assert flag.env in table, f"README's settings table lacks {flag.env}"
        flag_cell, default_cell = table[flag.env]
        assert f"`{flag.flag}`" in flag_cell, f"{flag.env}: README gives {flag_cell}, the CLI has {flag.flag}"
        if flag.serve_flag is not None:
            assert f"`serve {flag.serve_flag}`" in flag_cell, f"{flag.env}: README lacks serve {flag.serve_flag}"
        shown_default = default_cell.replace("`", "")
        assert shown_default.startswith(flag.default), (
            f"{flag.env}: README's default {default_cell}, the model's {flag.default}"
        )


def test_the_readme_names_no_setting_that_does_not_exist() -> None:
    known = {flag.env for flag in setting_flags()}
    assert set(settings_table()) - known == set()


def test_every_lakehouse_variable_the_readme_mentions_is_a_setting() -> None:
    known = {flag.env for flag in setting_flags()} | {"LAKEHOUSE_TEST_CRASH_AFTER"}  # the crash tests' own hook
    mentioned = set(re.findall(r"LAKEHOUSE_[A-Z_]+\b(?!\*)", README.read_text()))
    assert mentioned - known == set()
