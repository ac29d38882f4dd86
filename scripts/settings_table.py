"""Write the README's configuration table from the settings classes (``python scripts/settings_table.py``;
``--print`` prints it instead).

tests/unit/test_readme.py checks the README holds exactly this table.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from middleware.settings import GatewaySettings, SchedulerSettings
from workers.settings import WorkerSettings

SETTINGS_CLASSES = {"scheduler": SchedulerSettings, "worker": WorkerSettings, "gateway": GatewaySettings}


def settings_rows() -> list[tuple[str, str, str, str]]:
    """(env var, default, processes, description) for every field, one row per env var."""
    rows: dict[str, list[str]] = {}
    for role, cls in SETTINGS_CLASSES.items():
        for name, field in cls.model_fields.items():
            env = f"ALIGNQ_{name.upper()}"
            default = field.get_default(call_default_factory=True)
            default_text = "—" if default is None else json.dumps(default) if not isinstance(default, str) else default
            if env in rows:
                rows[env][2] += f", {role}"
            else:
                rows[env] = [env, default_text, role, field.description or ""]
    return [tuple(row) for row in sorted(rows.values())]  # type: ignore[misc]


def render_table() -> str:
    lines = ["| variable | default | used by | meaning |", "| --- | --- | --- | --- |"]
    for env, default, roles, description in settings_rows():
        lines.append(f"| `{env}` | `{default}` | {roles} | {description} |".replace("`—`", "—"))
    return "\n".join(lines)


README = Path(__file__).resolve().parents[1] / "README.md"


def write_readme(path: Path = README) -> None:
    """Replace the table between the README's settings-table markers."""
    text = path.read_text()
    pattern = re.compile(r"(<!-- settings-table -->\n).*?(\n<!-- /settings-table -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit("README lacks the settings-table markers")
    path.write_text(pattern.sub(lambda m: m.group(1) + render_table() + m.group(2), text, count=1))


if __name__ == "__main__":
    if "--print" in sys.argv:
        print(render_table())
    else:
        write_readme()
