"""The config file as text: TOML read into flat dotted keys, and flat dotted keys written back.

Only the format lives here; which keys exist and what they accept is
:mod:`tray_app.config.settings`'.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tray_app.errors import ConfigError


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML file into flat dotted keys; a missing file is an empty config."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError("config file", f"cannot be read: {exc.strerror}", str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("config file", "is not UTF-8 text", str(path)) from None
    try:
        return _flatten(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config file", f"is not valid TOML: {exc}", str(path)) from None


def toml_text(values: Mapping[str, object]) -> str:
    """TOML text for dotted ``section.name`` keys (``table.name.field`` ones as
    ``[table.name]``), sections and names sorted."""
    sections: dict[str, list[str]] = {}
    for key, value in sorted(values.items()):
        section, _, name = key.rpartition(".")  # [upstreams.desk] url = ...
        sections.setdefault(section, []).append(f"{name} = {_toml_value(value)}")
    return "\n".join(
        f"[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sections.items()
    )


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string, if what is beyond ASCII stays itself:
        # JSON's surrogate-pair escapes for an emoji are not valid TOML.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} to TOML")
