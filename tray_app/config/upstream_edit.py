"""Adding and removing an ``[upstreams.NAME]`` table in the config file.

``lmgate upstream add|remove`` and the Settings window both edit the file here, so a name, URL
or weight is refused with the same words wherever it was typed (the words are the parsers' of
:mod:`tray_app.config.upstreams`). The API token is not the file's business: callers put it in
the secret store under ``token_secret_name(name)``.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from collections.abc import Iterable
from pathlib import Path

from tray_app.config.files import read_config_file
from tray_app.config.settings import dump_settings
from tray_app.config.upstreams import (
    FIELDS,
    LOCAL,
    PREFIX,
    UpstreamEntry,
    check_name,
    server_identity,
    upstream_keys,
)

LOCAL_IS_UPSTREAM_URL = (
    "'local' is upstream.url: change that setting instead, or switch it off with "
    "[upstreams.local] enabled = false"
)
LOCAL_CANNOT_BE_REMOVED = (
    "'local' is upstream.url and cannot be removed; switch it off with "
    "[upstreams.local] enabled = false"
)


def new_entry(name: str, url: object, weight: object = 1, enabled: bool = True) -> UpstreamEntry:
    """An upstream to add, each field through its own parser. Raises ValueError in their words,
    naming the field."""
    checked = check_name(name)
    if checked == LOCAL:
        raise ValueError(LOCAL_IS_UPSTREAM_URL)
    parsed: dict[str, object] = {}
    for field, raw in (("url", url), ("weight", weight)):
        try:
            parsed[field] = FIELDS[field].parse(raw)
        except ValueError as exc:
            raise ValueError(f"the {field} {exc}") from None
    return UpstreamEntry(checked, str(parsed["url"]), int(str(parsed["weight"])), bool(enabled))


def ensure_new_server(entry: UpstreamEntry, configured: Iterable[UpstreamEntry]) -> None:
    """ValueError if ``entry`` points at a server another upstream is already: one machine
    under two names would get twice its generation slots and two model guards that cannot
    see each other's answers (the eviction the guard exists to prevent)."""
    for other in configured:
        if other.name != entry.name and server_identity(other.url) == server_identity(entry.url):
            raise ValueError(
                f"{entry.url} is the server upstream {other.name!r} is already "
                f"({other.url}): one machine is one upstream"
            )


def _table_keys(flat: dict[str, object], name: str) -> list[str]:
    return [key for key in flat if key.startswith(f"{PREFIX}{name}.")]


def ensure_unused(path: Path, name: str) -> None:
    """ValueError if the file at ``path`` has an upstream named ``name`` already."""
    if _table_keys(read_config_file(path), name):
        raise ValueError(f"an upstream is named {name!r} already: remove it first")


def add_upstream(
    path: Path, entry: UpstreamEntry, configured: Iterable[UpstreamEntry] = ()
) -> None:
    """Append ``entry``'s table to the file at ``path``, leaving the rest of it (comments
    included) as it was; ValueError if the name is taken or ``configured`` has its server."""
    ensure_unused(path, entry.name)
    ensure_new_server(entry, configured)
    dump_settings(upstream_keys(entry))  # the same checks as every write
    lines = [f"[{PREFIX}{entry.name}]", f"url = {_quoted(entry.url)}"]
    if entry.weight != 1:
        lines.append(f"weight = {entry.weight}")
    if not entry.enabled:
        lines.append("enabled = false")
    before = path.read_text(encoding="utf-8") if path.exists() else ""
    if before and not before.endswith("\n"):
        before += "\n"
    _replace(path, before + ("\n" if before else "") + "\n".join(lines) + "\n")


def remove_upstream(path: Path, name: str) -> None:
    """Take ``name``'s table out of the file at ``path``; ValueError if there is none."""
    check_name(name)
    if name == LOCAL:
        raise ValueError(LOCAL_CANNOT_BE_REMOVED)
    flat = read_config_file(path)
    gone = set(_table_keys(flat, name))
    if not gone:
        raise ValueError(f"no upstream is named {name!r} (`lmgate upstream list` shows them)")
    write_config(path, {key: value for key, value in flat.items() if key not in gone})


def write_config(path: Path, flat: dict[str, object]) -> None:
    """Replace the file with ``flat``'s settings, all or nothing (its comments are not kept:
    the file is written from the settings)."""
    _replace(path, dump_settings(flat))  # raises ConfigError naming a bad key: nothing written


def _quoted(value: str) -> str:
    # A TOML basic string; characters beyond ASCII as themselves (TOML has no surrogate pairs).
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _replace(path: Path, text: str) -> None:
    """Write ``text`` in place of the file, all or nothing, keeping the file's permissions
    (a new file is the owner's alone). Text that is not valid TOML is never written."""
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(
            f"the config file would not be valid TOML ({exc}); nothing was written"
        ) from None
    path = path.resolve()  # a symlinked config file (dotfiles) stays a link to its target
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        written = Path(temporary)
        written.chmod(mode)
        written.replace(path)  # never a half-written config file
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
