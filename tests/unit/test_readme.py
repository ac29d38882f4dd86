"""The README stays true: its settings table matches the settings classes; its commands exist."""

from __future__ import annotations

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_settings_table_matches_settings_classes() -> None:
    render_table = runpy.run_path(str(ROOT / "scripts" / "settings_table.py"))["render_table"]
    match = re.search(r"<!-- settings-table -->\n(.*?)\n<!-- /settings-table -->", README, re.DOTALL)
    assert match, "README lacks the settings table markers"
    assert match.group(1).strip() == render_table().strip(), "run: .venv/bin/python scripts/settings_table.py"


def test_quick_start_commands_are_the_ci_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash setup.sh" in README and "bash setup.sh" in ci
    assert ".venv/bin/python -m pytest -q" in README and ".venv/bin/python -m pytest -q" in ci
