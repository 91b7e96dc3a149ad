"""The settings as reference text: the README's configuration table, read from the
declarations so the documentation cannot fall behind the code (tests/shipping checks it)."""

from __future__ import annotations

from tray_app.config.settings import SETTINGS, Config, format_default

TABLE_HEADER = (
    "| setting | environment variable | flag | default | meaning |\n|---|---|---|---|---|\n"
)


def markdown_table() -> str:
    """Every setting as one Markdown table row, in declaration order."""
    defaults = Config()
    rows = []
    for s in SETTINGS:
        flag = f"`{s.flag.name}`" if s.flag is not None else ""
        default = format_default(getattr(defaults, s.attribute))
        rows.append(f"| `{s.key}` | `{s.env_var}` | {flag} | `{default}` | {s.help} |\n")
    return TABLE_HEADER + "".join(rows)
