"""Configuration: defaults < TOML file < ``LMGATE_*`` environment < command-line flags.

Every setting is declared once in ``_SETTINGS``; the same declaration parses a TOML value, an
environment string and a CLI flag, so all three give the same error for the same mistake, and
that error names the key (``server.port``) and where the bad value came from.
Secrets never live here: they are read through :mod:`tray_app.secret_store.base`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tray_app.errors import ConfigError
from tray_app.paths import user_config_dir

ENV_PREFIX = "LMGATE_"
CONFIG_FILE_ENV = "LMGATE_CONFIG"

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Config:
    """The validated settings. Frozen: the running gateway never sees a half-changed config."""

    upstream_url: str = "http://127.0.0.1:1234"
    upstream_connect_timeout: float = 10.0
    # Idle, not total: a long generation may run for many minutes, but a silent upstream for
    # this long is dead. Generous because prompt processing on big contexts can take minutes.
    upstream_idle_timeout: float = 600.0
    server_host: str = "127.0.0.1"
    server_port: int = 8787
    # Image inputs arrive base64-encoded inside JSON; 32 MiB fits several large photos.
    max_body_bytes: int = 32 * MIB
    max_response_bytes: int = 256 * MIB
    # One SSE event from LM Studio; a stream event is a few hundred bytes.
    max_event_bytes: int = 1 * MIB
    # SSE comments sent while LM Studio is still processing the prompt, so that proxies and
    # phones do not drop an idle connection. 0 turns them off.
    heartbeat_interval: float = 15.0
    # How long in-flight requests may run on after a stop before they are closed.
    shutdown_grace: float = 10.0
    # Slow or silent clients: a connection must deliver its request head within
    # header_timeout and its body within body_timeout; an idle keep-alive connection closes
    # after keepalive_timeout. None of them limits how long an answer may stream.
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 30.0
    # A client that reads nothing of its answer for this long (its socket buffer full) is
    # cut off: a stream it stopped reading, or pipelined requests it never reads.
    write_timeout: float = 60.0
    # Open client connections: 0 = derived from the process's file-descriptor limit, so the
    # gateway refuses new connections before it runs out of descriptors.
    max_connections: int = 0
    max_connections_per_client: int = 64
    # Host names (besides this machine's addresses, localhost and the tunnel's public name)
    # that requests may be addressed to; a browser tricked by DNS rebinding sends another one.
    allowed_hosts: tuple[str, ...] = ()
    enable_responses: bool = False
    enable_messages: bool = False
    log_level: str = "info"
    # Identity
    dev_mode: bool = False
    token_ttl: float = 86400.0  # default lifetime of `lmgate token create`
    device_token_ttl: float = 30 * 86400.0
    pairing_code_ttl: float = 600.0
    # Limits per principal and per client address
    requests_per_minute: int = 120
    concurrent_requests: int = 4
    auth_failures_per_minute: int = 10
    pairing_attempts_per_minute: int = 5
    # Proxies whose X-Forwarded-For is believed (nginx in front). The running tunnel's own
    # agent is trusted while it runs, without being listed: loopback alone proves nothing.
    trusted_proxies: tuple[str, ...] = ()
    cors_allowed_origins: tuple[str, ...] = ()
    data_dir: str = ""  # "" = the platform's user data directory
    secret_store: str = "keyring"  # noqa: S105 - a backend name, not a secret
    secret_file_dir: str = ""  # "" = <data_dir>/secrets (only with secret_store = "file")
    # Going public
    tunnel_provider: str = "none"
    ngrok_path: str = ""  # "" = `ngrok` on PATH, or pyngrok's usual install location
    ngrok_domain: str = ""  # a reserved/dev domain keeps the URL (and QR code) across restarts
    ngrok_region: str = ""
    lan_address: str = ""  # "" = detect
    lan_port: int = 0  # 0 = the gateway's own port
    tunnel_health_interval: float = 30.0
    go_public_at_start: bool = False
    # Models the tray's pairing codes, snippets and app keys may use (empty = all).
    allowed_models: tuple[str, ...] = ()
    # /api/chat sends the newest history that fits this many characters (~4 per token).
    chat_context_chars: int = 16_000


def default_config_path() -> Path:
    return user_config_dir() / "config.toml"


# ---- value parsers: each takes the raw value (TOML-typed or a string) and returns the typed
# ---- value, or raises ValueError with a message written for the user.


def _parse_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _number(raw: object, *, integer: bool) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"must be a number, got {raw!r}")
    if isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(int(raw.strip())) if integer else float(raw.strip())
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise ValueError(f"must be {kind}, got {raw!r}") from None
    else:
        raise ValueError(f"must be a number, got {raw!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {raw!r}")
    if integer and value != int(value):
        raise ValueError(f"must be an integer, got {raw!r}")
    return value


def _int_in(low: int, high: int) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        value = int(_number(raw, integer=True))
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _seconds(low: float, high: float) -> Callable[[object], float]:
    def parse(raw: object) -> float:
        value = _number(raw, integer=False)
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g} seconds, got {value:g}")
        return value

    return parse


def _upstream_url(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"must be a URL like http://127.0.0.1:1234, got {raw!r}")
    url = raw.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"}:
        raise ValueError(f"must start with http:// or https://, got {raw!r}")
    if not parts.hostname:
        raise ValueError(f"has no host name: {raw!r}")
    if parts.username or parts.password:
        # Credentials in a URL end up in logs and process listings; the LM Studio token
        # belongs in the secret store.
        raise ValueError(
            "must not contain a user name or password; "
            "store the LM Studio token in the secret store instead"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"must not contain a query or fragment: {raw!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"has an invalid port: {raw!r}") from None
    if parts.path not in {"", "/"}:
        raise ValueError(
            f"must be the server root URL with no path (like http://127.0.0.1:1234), got {raw!r}"
        )
    return url


def _bind_host(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"must be an IP address or host name, got {raw!r}")
    host = raw.strip()
    if host == "localhost":
        return host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"must be an IP address such as 127.0.0.1 or 0.0.0.0, got {raw!r}"
        ) from None
    return host


def _log_level(raw: object) -> str:
    levels = ("debug", "info", "warning", "error")
    if isinstance(raw, str) and raw.strip().lower() in levels:
        return raw.strip().lower()
    raise ValueError(f"must be one of {', '.join(levels)}, got {raw!r}")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(raw: object) -> float:
    """Seconds from a number or a string like ``90``, ``15m``, ``24h``, ``30d``, ``2w``."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, str) and raw.strip():
        text = raw.strip().lower()
        unit = _DURATION_UNITS.get(text[-1])
        number = text[:-1] if unit else text
        try:
            value = float(number) * (unit or 1)
        except ValueError:
            raise ValueError(f"must be a duration like 90, 15m, 24h or 30d, got {raw!r}") from None
    else:
        raise ValueError(f"must be a duration like 90, 15m, 24h or 30d, got {raw!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive duration, got {raw!r}")
    return value


def _duration_in(low: float, high: float) -> Callable[[object], float]:
    def parse(raw: object) -> float:
        value = parse_duration(raw)
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g} seconds, got {value:g}")
        return value

    return parse


def _string_list(raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        items = [item.strip() for item in raw.split(",")]
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = [item.strip() for item in raw]
    else:
        raise ValueError(f"must be a list of strings (or comma-separated), got {raw!r}")
    return tuple(item for item in items if item)


def _networks(raw: object) -> tuple[str, ...]:
    items = _string_list(raw)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network like 10.0.0.0/8") from None
    return items


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


def _host_names(raw: object) -> tuple[str, ...]:
    items = tuple(item.lower().rstrip(".") for item in _string_list(raw))
    for item in items:
        if not _HOST_NAME.match(item):
            raise ValueError(f"{item!r} is not a host name like llm.example.com")
    return items


def _origins(raw: object) -> tuple[str, ...]:
    items = _string_list(raw)
    for item in items:
        parts = urlsplit(item)
        if parts.scheme not in {"http", "https"} or not parts.netloc or parts.path not in {"", "/"}:
            raise ValueError(f"{item!r} is not an origin like https://app.example.com")
        if item.strip() == "*":
            raise ValueError("'*' is not allowed: list the origins that may call LM Gate")
    return items


def _path_or_default(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be a directory path, got {raw!r}")
    return str(Path(raw).expanduser()) if raw.strip() else ""


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if isinstance(raw, str) and raw.strip().lower() in choices:
            return raw.strip().lower()
        raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")

    return parse


def _domain(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be a domain like my-name.ngrok-free.app, got {raw!r}")
    text = raw.strip()
    if not text:
        return ""
    parts = urlsplit(text if "://" in text else f"https://{text}")
    if parts.scheme not in {"http", "https"} or not parts.hostname or parts.path not in {"", "/"}:
        raise ValueError(f"must be a domain like my-name.ngrok-free.app, got {raw!r}")
    return text.rstrip("/")


def _optional_ip(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be an IP address, got {raw!r}")
    if not raw.strip():
        return ""
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise ValueError(f"must be an IP address such as 192.168.1.20, got {raw!r}") from None


def _region(raw: object) -> str:
    if isinstance(raw, str) and re.fullmatch(r"[a-z]{0,4}", raw.strip().lower()):
        return raw.strip().lower()
    raise ValueError(
        f"must be an ngrok region code such as eu, us, ap, au, sa, jp, in; got {raw!r}"
    )


@dataclass(frozen=True, slots=True)
class _Setting:
    key: str  # dotted TOML key, e.g. "server.port"
    field: str  # Config attribute
    parse: Callable[[object], Any]
    help: str

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.key.replace(".", "_").upper()


_SETTINGS: tuple[_Setting, ...] = (
    _Setting("upstream.url", "upstream_url", _upstream_url, "LM Studio server URL"),
    _Setting(
        "upstream.connect_timeout",
        "upstream_connect_timeout",
        _seconds(0.1, 300),
        "seconds to wait for a TCP connection to LM Studio",
    ),
    _Setting(
        "upstream.idle_timeout",
        "upstream_idle_timeout",
        _seconds(1, 86400),
        "seconds LM Studio may stay silent (prompt processing) before the request fails",
    ),
    _Setting("server.host", "server_host", _bind_host, "address the gateway listens on"),
    _Setting(
        "server.port",
        "server_port",
        _int_in(0, 65535),
        "port the gateway listens on (0 = any free port)",
    ),
    _Setting(
        "limits.max_body_bytes",
        "max_body_bytes",
        _int_in(1024, 1024 * MIB),
        "largest accepted request body in bytes",
    ),
    _Setting(
        "limits.max_response_bytes",
        "max_response_bytes",
        _int_in(1024, 16 * 1024 * MIB),
        "largest non-streamed LM Studio response in bytes",
    ),
    _Setting(
        "limits.max_event_bytes",
        "max_event_bytes",
        _int_in(1024, 1024 * MIB),
        "largest single SSE event LM Studio may send in a stream, in bytes",
    ),
    _Setting(
        "streaming.heartbeat_interval",
        "heartbeat_interval",
        _seconds(0, 3600),
        "seconds between SSE keep-alive comments while the prompt is processed (0 = off)",
    ),
    _Setting(
        "server.shutdown_grace",
        "shutdown_grace",
        _seconds(0, 3600),
        "seconds in-flight requests may finish after a stop",
    ),
    _Setting(
        "server.header_timeout",
        "header_timeout",
        _seconds(0.5, 600),
        "seconds a client may take to send a request's headers",
    ),
    _Setting(
        "server.body_timeout",
        "body_timeout",
        _seconds(1, 3600),
        "seconds a client may take to send a request's body",
    ),
    _Setting(
        "server.keepalive_timeout",
        "keepalive_timeout",
        _seconds(1, 3600),
        "seconds an idle keep-alive connection stays open",
    ),
    _Setting(
        "server.write_timeout",
        "write_timeout",
        _seconds(1, 3600),
        "seconds a client may leave its answer unread (its socket full) before it is cut off",
    ),
    _Setting(
        "server.max_connections",
        "max_connections",
        _int_in(0, 1_000_000),
        "open client connections at most (0 = from the file-descriptor limit)",
    ),
    _Setting(
        "server.max_connections_per_client",
        "max_connections_per_client",
        _int_in(1, 1_000_000),
        "open connections at most from one address (the running tunnel agent excepted)",
    ),
    _Setting(
        "server.allowed_hosts",
        "allowed_hosts",
        _host_names,
        "host names requests may be addressed to, besides IP addresses, localhost and the "
        "tunnel's public name (e.g. llm.example.com behind nginx)",
    ),
    _Setting(
        "routes.enable_responses",
        "enable_responses",
        _parse_bool,
        "forward POST /v1/responses (MCP tools removed)",
    ),
    _Setting(
        "routes.enable_messages",
        "enable_messages",
        _parse_bool,
        "forward POST /v1/messages (Anthropic-style; MCP tools removed)",
    ),
    _Setting("log.level", "log_level", _log_level, "log level"),
    _Setting(
        "auth.dev_mode",
        "dev_mode",
        _parse_bool,
        "accept X-User-Id from this machine instead of a token (never with a tunnel)",
    ),
    _Setting(
        "auth.token_ttl",
        "token_ttl",
        _duration_in(60, 366 * 86400),
        "default lifetime of `lmgate token create` (seconds, or 15m, 24h, 30d)",
    ),
    _Setting(
        "auth.device_token_ttl",
        "device_token_ttl",
        _duration_in(60, 366 * 86400),
        "lifetime of a paired device's token",
    ),
    _Setting(
        "auth.pairing_code_ttl",
        "pairing_code_ttl",
        _duration_in(30, 86400),
        "how long a pairing code (QR code) stays valid",
    ),
    _Setting(
        "limits.requests_per_minute",
        "requests_per_minute",
        _int_in(1, 100_000_000),
        "requests per minute per principal (token bucket)",
    ),
    _Setting(
        "limits.concurrent_requests",
        "concurrent_requests",
        _int_in(1, 10_000),
        "requests or streams one principal may run at once",
    ),
    _Setting(
        "limits.auth_failures_per_minute",
        "auth_failures_per_minute",
        _int_in(1, 10_000),
        "failed authentications per minute per client address before 429",
    ),
    _Setting(
        "limits.pairing_attempts_per_minute",
        "pairing_attempts_per_minute",
        _int_in(1, 10_000),
        "failed pairing attempts per minute per client address",
    ),
    _Setting(
        "server.trusted_proxies",
        "trusted_proxies",
        _networks,
        "proxies whose X-Forwarded-For is believed, e.g. nginx (the running tunnel's agent "
        "is trusted without being listed)",
    ),
    _Setting(
        "cors.allowed_origins",
        "cors_allowed_origins",
        _origins,
        "other web origins allowed to call LM Gate from a browser",
    ),
    _Setting(
        "storage.data_dir",
        "data_dir",
        _path_or_default,
        "directory for LM Gate's database (empty = the platform's user data dir)",
    ),
    _Setting(
        "secrets.store",
        "secret_store",
        _choice("keyring", "file", "env"),
        "where secrets live: the OS keyring, a private file, or LMGATE_SECRET_* variables",
    ),
    _Setting(
        "secrets.file_dir",
        "secret_file_dir",
        _path_or_default,
        "directory for secrets when secrets.store = file (empty = <data dir>/secrets)",
    ),
    _Setting(
        "tunnel.provider",
        "tunnel_provider",
        _choice("none", "ngrok", "lan"),
        "how `serve` goes public: none (this machine only), ngrok, or lan",
    ),
    _Setting(
        "tunnel.ngrok_path",
        "ngrok_path",
        _path_or_default,
        "the ngrok agent binary (empty = ngrok on PATH)",
    ),
    _Setting(
        "tunnel.ngrok_domain",
        "ngrok_domain",
        _domain,
        "your reserved ngrok domain: the public URL and QR code stay the same",
    ),
    _Setting("tunnel.ngrok_region", "ngrok_region", _region, "ngrok region code (empty = nearest)"),
    _Setting(
        "tunnel.lan_address",
        "lan_address",
        _optional_ip,
        "the LAN address to listen on in LAN mode (empty = detect)",
    ),
    _Setting(
        "tunnel.lan_port",
        "lan_port",
        _int_in(0, 65535),
        "port for LAN mode (0 = the gateway's own port)",
    ),
    _Setting(
        "tunnel.health_interval",
        "tunnel_health_interval",
        _seconds(1, 3600),
        "seconds between checks that the public URL still works",
    ),
    _Setting(
        "tunnel.go_public_at_start",
        "go_public_at_start",
        _parse_bool,
        "the tray app goes public as soon as it starts",
    ),
    _Setting(
        "auth.allowed_models",
        "allowed_models",
        _string_list,
        "models paired devices and copied curl snippets may use, checked on every request, "
        "and that keys copied from the tray are made with (empty = all)",
    ),
    _Setting(
        "chat.context_chars",
        "chat_context_chars",
        _int_in(500, 10_000_000),
        "characters of history /api/chat sends with a message (newest first)",
    ),
)

SETTINGS_BY_KEY: Mapping[str, _Setting] = {s.key: s for s in _SETTINGS}


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _apply(values: dict[str, Any], key: str, raw: object, source: str) -> None:
    setting = SETTINGS_BY_KEY.get(key)
    if setting is None:
        known = ", ".join(sorted(SETTINGS_BY_KEY))
        raise ConfigError(key, f"unknown setting (known: {known})", source)
    try:
        values[setting.field] = setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(key, str(exc), source) from None


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


def load_config(
    *,
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Build the effective config.

    ``path`` defaults to ``$LMGATE_CONFIG`` or the platform's user config dir; ``overrides`` are
    dotted keys from CLI flags. Raises :class:`ConfigError` naming the first bad key.
    """
    env = os.environ if environ is None else environ
    if path is None:
        path = Path(env[CONFIG_FILE_ENV]) if env.get(CONFIG_FILE_ENV) else default_config_path()
    values: dict[str, Any] = {}
    for key, raw in read_config_file(path).items():
        _apply(values, key, raw, str(path))
    for setting in _SETTINGS:
        if setting.env_var in env:
            _apply(values, setting.key, env[setting.env_var], setting.env_var)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            _apply(values, key, raw, "command line")
    config = Config(**values)
    check_combinations(config)
    return config


def check_combinations(config: Config) -> None:
    """Settings that are fine alone but unsafe together."""
    if config.dev_mode and not _is_loopback_host(config.server_host):
        raise ConfigError(
            "auth.dev_mode",
            "cannot be on while server.host is not a loopback "
            f"address ({config.server_host}): anyone could claim to be anyone",
        )


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe_settings() -> list[tuple[str, str, object, str]]:
    """(key, env var, default, help) for every setting, for ``--help`` and the README."""
    defaults = Config()
    return [(s.key, s.env_var, getattr(defaults, s.field), s.help) for s in _SETTINGS]


def with_changes(config: Config, **changes: Any) -> Config:
    return dataclasses.replace(config, **changes)


def format_default(value: object) -> str:
    """A default as a person would write it in TOML or an environment variable."""
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value) or "(none)"
    if value == "":
        return "(auto)"
    return str(value)


def ensure_public_exposure_allowed(config: Config) -> None:
    """Called before any tunnel or LAN bind opens: dev mode trusts a header, so it must never
    face the network."""
    if config.dev_mode:
        raise ConfigError(
            "auth.dev_mode",
            "is on, so LM Gate refuses to open a tunnel or listen "
            "on the network; turn dev mode off to go public",
        )


def dump_settings(values: Mapping[str, object]) -> str:
    """TOML text for dotted keys (as the settings window saves them); values are validated."""
    sections: dict[str, list[str]] = {}
    for key, value in sorted(values.items()):
        setting = SETTINGS_BY_KEY.get(key)
        if setting is None:
            raise ConfigError(key, "unknown setting")
        try:
            setting.parse(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        section, _, name = key.partition(".")
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
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} to TOML")
