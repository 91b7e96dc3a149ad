"""The model servers behind the gateway, as the config file lists them.

``upstream.url`` is the first one, named :data:`LOCAL` (so a config of one URL keeps working
as a list of one); each ``[upstreams.NAME]`` table adds another, and ``[upstreams.local]`` may
set the first one's weight or switch it off (its URL stays ``upstream.url``)::

    [upstream]
    url = "http://127.0.0.1:1234"

    [upstreams.desk]
    url = "http://192.168.1.20:1234"
    weight = 3

The fields of a table are declared once, in :data:`FIELDS`: the config file, ``lmgate
upstream add`` and the Settings window parse them with the same parser, so each gives the
same error for the same mistake. An upstream's API token is never here: it lives in the
secret store (see :func:`token_secret_name`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tray_app.config import parsers as p
from tray_app.errors import ConfigError

LOCAL = "local"
PREFIX = "upstreams."
WEIGHT_MAX = 100
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")
NAME_RULE = "1-31 lower-case letters, digits or '-', starting with a letter or digit"
# What the first upstream's token has always been called; the others' follow the pattern.
LOCAL_TOKEN_SECRET = "lmstudio-api-token"  # noqa: S105 - a name, not a secret
TOKEN_SECRET_PREFIX = "upstream-token-"  # noqa: S105 - a name, not a secret


@dataclass(frozen=True, slots=True)
class UpstreamEntry:
    name: str
    url: str
    weight: int = 1
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Field:
    parse: Callable[[object], Any]
    help: str


FIELDS: Mapping[str, Field] = {
    "url": Field(p.upstream_url, "the server's root URL (any OpenAI-compatible server)"),
    "weight": Field(
        p.int_in(1, WEIGHT_MAX), "preference among equally busy upstreams (higher first)"
    ),
    "enabled": Field(p.boolean, "false keeps it configured but sends it nothing"),
}
DEFAULTS = {"weight": 1, "enabled": True}


def token_secret_name(upstream: str) -> str:
    """The secret-store entry of ``upstream``'s API token: one per upstream, never shared."""
    return LOCAL_TOKEN_SECRET if upstream == LOCAL else TOKEN_SECRET_PREFIX + upstream


def is_token_secret_name(secret: str) -> bool:
    """Whether ``secret`` is some upstream's token entry (what `lmgate secret set` may set)."""
    if secret == LOCAL_TOKEN_SECRET:
        return True
    name = secret.removeprefix(TOKEN_SECRET_PREFIX)
    return name != secret and name != LOCAL and NAME_PATTERN.fullmatch(name) is not None


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"an upstream's name must be {NAME_RULE}, got {name!r}")
    return name


def is_upstream_key(key: str) -> bool:
    return key.startswith(PREFIX)


def parse_upstreams(
    flat: Mapping[str, object], local_url: str, source: str
) -> tuple[UpstreamEntry, ...]:
    """The upstreams from a config file's ``upstreams.NAME.FIELD`` keys, ``local`` first.
    Raises ConfigError naming the first bad key."""
    tables: dict[str, dict[str, Any]] = {}
    for key, raw in flat.items():
        if not is_upstream_key(key):
            continue
        name, dot, field = key[len(PREFIX) :].partition(".")
        try:
            check_name(name)
        except ValueError as exc:
            raise ConfigError(key, str(exc), source) from None
        declared = FIELDS.get(field) if dot else None
        if declared is None:
            known = ", ".join(f"{PREFIX}{name}.{f}" for f in FIELDS)
            raise ConfigError(key, f"unknown upstream setting (known: {known})", source)
        if name == LOCAL and field == "url":
            raise ConfigError(key, "the local upstream's URL is upstream.url", source)
        try:
            tables.setdefault(name, {})[field] = declared.parse(raw)
        except ValueError as exc:
            raise ConfigError(key, str(exc), source) from None
    local = UpstreamEntry(LOCAL, local_url, **tables.pop(LOCAL, {}))
    entries = [local]
    for name, fields in sorted(tables.items()):
        if "url" not in fields:
            raise ConfigError(
                f"{PREFIX}{name}.url", "is missing (every upstream needs one)", source
            )
        entries.append(UpstreamEntry(name, **fields))
    return tuple(entries)


def server_identity(url: str) -> str:
    """The server ``url`` reaches, as ``scheme://host:port`` (the default port spelled out,
    every loopback address one host, an IPv4-mapped IPv6 address its IPv4 one): two URLs with
    the same identity are one machine."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost":
            host = "loopback"
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        host = "loopback" if address.is_loopback or address.is_unspecified else str(address)
        if ":" in host:
            host = f"[{host}]"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{host}:{port}"


def check_distinct_servers(entries: Iterable[UpstreamEntry], source: str) -> None:
    """ConfigError naming both upstreams if two enabled ones are one server, however the
    file, upstream.url, its environment variable or ``serve --upstream`` spelled them: one
    machine under two names would get twice its generation slots and two model guards that
    cannot see each other's answers (the eviction the guard exists to prevent). A switched-off
    one is sent nothing, so it may keep a machine's address for later."""
    seen: dict[str, UpstreamEntry] = {}
    for entry in entries:
        if not entry.enabled:
            continue
        server = server_identity(entry.url)
        other = seen.setdefault(server, entry)
        if other is not entry:
            # local comes first: the second of the two is always a table.
            raise ConfigError(
                f"{PREFIX}{entry.name}.url",
                f"{entry.url} is the server upstream {other.name!r} is already ({other.url}): "
                "one machine is one upstream; remove one of its tables from the config file "
                "by hand, or switch it off there (enabled = false)",
                source,
            )


def upstream_keys(entry: UpstreamEntry) -> dict[str, object]:
    """``entry`` as the config file's dotted keys (defaults left out), for writing it back."""
    keys: dict[str, object] = {}
    if entry.name != LOCAL:
        keys[f"{PREFIX}{entry.name}.url"] = entry.url
    for field, default in DEFAULTS.items():
        value = getattr(entry, field)
        if value != default:
            keys[f"{PREFIX}{entry.name}.{field}"] = value
    return keys
