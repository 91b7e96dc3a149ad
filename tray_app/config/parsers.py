"""Value parsers: each takes a raw value (TOML-typed, or a string from the environment or a
flag) and returns the typed value, or raises ValueError with a message written for the user.

The same parser reads all three sources, so one mistake gets one wording wherever it is made.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import urlsplit

MIB = 1024 * 1024

E = TypeVar("E", bound=StrEnum)


class TunnelProvider(StrEnum):
    """How LM Gate goes public. A StrEnum, so ``provider == "ngrok"`` keeps working."""

    # In the order the Settings form offers them: no account first.
    NONE = "none"
    CLOUDFLARE_QUICK = "cloudflare-quick"
    NGROK = "ngrok"
    CLOUDFLARE_NAMED = "cloudflare-named"
    TAILSCALE_SERVE = "tailscale-serve"
    TAILSCALE_FUNNEL = "tailscale-funnel"
    LAN = "lan"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(StrEnum):
    AUTO = "auto"  # short text lines at a terminal, JSON anywhere else
    TEXT = "text"
    JSON = "json"


class ModelSwitch(StrEnum):
    """What a request for a model LM Studio has not loaded does while others generate."""

    WAIT = "wait"  # until the other models' generations end, then load it once
    REFUSE = "refuse"  # 503 model_switch_refused at once
    OFF = "off"  # no guard: LM Studio loads (and may evict) as it likes


class SecretStoreKind(StrEnum):
    KEYRING = "keyring"
    FILE = "file"
    ENV = "env"


class StateBackend(StrEnum):
    """Where LM Gate keeps what must outlive a request: one machine's SQLite file, or PostgreSQL
    and Redis shared by several replicas."""

    SQLITE = "sqlite"
    POSTGRES = "postgres"


class WhenRedisIsDown(StrEnum):
    """What the shared limits do while Redis cannot be reached: refuse (closed) or let requests
    through unlimited (open); never count per replica, which would multiply every limit."""

    CLOSED = "closed"
    OPEN = "open"


class IntRange:
    """An integer between ``low`` and ``high``; the bounds are public so a form's number field
    can offer exactly the values the config accepts."""

    def __init__(self, low: int, high: int) -> None:
        self.low = low
        self.high = high

    def __call__(self, raw: object) -> int:
        value = int(_number(raw, integer=True))
        if not self.low <= value <= self.high:
            raise ValueError(f"must be between {self.low} and {self.high}, got {value}")
        return value


def int_in(low: int, high: int) -> IntRange:
    return IntRange(low, high)


class OneOf(Generic[E]):
    """One member of a StrEnum, case-insensitive; ``choices`` feeds argparse and forms."""

    def __init__(self, kind: type[E]) -> None:
        self.kind = kind
        self.choices: tuple[str, ...] = tuple(member.value for member in kind)

    def __call__(self, raw: object) -> E:
        if isinstance(raw, str) and raw.strip().lower() in self.choices:
            return self.kind(raw.strip().lower())
        raise ValueError(f"must be one of {', '.join(self.choices)}, got {raw!r}")


def boolean(raw: object) -> bool:
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


def seconds(low: float, high: float) -> Callable[[object], float]:
    def parse(raw: object) -> float:
        value = _number(raw, integer=False)
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g} seconds, got {value:g}")
        return value

    return parse


def upstream_url(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"must be a URL like http://127.0.0.1:1234, got {raw!r}")
    url = raw.strip().rstrip("/")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        # urlsplit drops tabs and newlines silently; what is written must be what is used.
        raise ValueError(f"must not contain spaces or control characters, got {raw!r}")
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


def bind_host(raw: object) -> str:
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


def duration_in(low: float, high: float) -> Callable[[object], float]:
    def parse(raw: object) -> float:
        value = parse_duration(raw)
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g} seconds, got {value:g}")
        return value

    return parse


def string_list(raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        items = [item.strip() for item in raw.split(",")]
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = [item.strip() for item in raw]
    else:
        raise ValueError(f"must be a list of strings (or comma-separated), got {raw!r}")
    return tuple(item for item in items if item)


def networks(raw: object) -> tuple[str, ...]:
    items = string_list(raw)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network like 10.0.0.0/8") from None
    return items


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


def host_names(raw: object) -> tuple[str, ...]:
    items = tuple(item.lower().rstrip(".") for item in string_list(raw))
    for item in items:
        if not _HOST_NAME.match(item):
            raise ValueError(f"{item!r} is not a host name like llm.example.com")
    return items


def origins(raw: object) -> tuple[str, ...]:
    items = string_list(raw)
    for item in items:
        parts = urlsplit(item)
        if parts.scheme not in {"http", "https"} or not parts.netloc or parts.path not in {"", "/"}:
            raise ValueError(f"{item!r} is not an origin like https://app.example.com")
        if item.strip() == "*":
            raise ValueError("'*' is not allowed: list the origins that may call LM Gate")
    return items


def path_or_default(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be a directory path, got {raw!r}")
    return str(Path(raw).expanduser()) if raw.strip() else ""


def domain(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be a domain like my-name.ngrok-free.app, got {raw!r}")
    text = raw.strip()
    if not text:
        return ""
    parts = urlsplit(text if "://" in text else f"https://{text}")
    if parts.scheme not in {"http", "https"} or not parts.hostname or parts.path not in {"", "/"}:
        raise ValueError(f"must be a domain like my-name.ngrok-free.app, got {raw!r}")
    return text.rstrip("/")


def hostname(raw: object) -> str:
    """A bare host name (``chat.example.com``), or empty: what a named Cloudflare tunnel is
    routed to. A scheme, port or path is refused, not dropped: the URL people get is built
    from it."""
    shape = "must be a host name like chat.example.com"
    if not isinstance(raw, str):
        raise ValueError(f"{shape}, got {raw!r}")
    text = raw.strip().lower().rstrip(".")
    if not text:
        return ""
    label = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
    if len(text) > 253 or not re.fullmatch(rf"{label}(?:\.{label})+", text):
        raise ValueError(f"{shape}, got {raw!r}")
    return text


def download_url(raw: object) -> str:
    """Where a program may be downloaded from: https, or plain http only from this computer
    (a local mirror: nothing crosses a network unencrypted); empty = the vendor's own."""
    shape = "must be an https:// URL (or http:// on this computer), with no user name or spaces"
    if not isinstance(raw, str):
        raise ValueError(f"{shape}, got {raw!r}")
    text = raw.strip()
    if not text:
        return ""
    if download_url_allowed(text):
        return text
    raise ValueError(f"{shape}, got {raw!r}")


def download_url_allowed(url: str) -> bool:
    """Whether ``url`` may be downloaded from: https to a named host, or plain http only to
    this computer (localhost or a loopback address). Refused as well: any user name or
    password (``http://evil.com@127.0.0.1/`` is loopback to ``urlsplit`` but ``evil.com@...``
    to urllib's connection) and any whitespace or control character, so that the host checked
    here is the host that is connected to. Shared by the setting and the ngrok installer
    (checked again at every redirect)."""
    if any(char.isspace() or not char.isprintable() for char in url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - an invalid port raises ValueError
    except ValueError:
        return False
    if "@" in parts.netloc:
        return False
    host = parts.hostname or ""
    if parts.scheme == "https":
        return bool(host)
    return parts.scheme == "http" and (host == "localhost" or _is_loopback_ip(host))


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def optional_ip(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be an IP address, got {raw!r}")
    if not raw.strip():
        return ""
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise ValueError(f"must be an IP address such as 192.168.1.20, got {raw!r}") from None


def ngrok_region(raw: object) -> str:
    if isinstance(raw, str) and re.fullmatch(r"[a-z]{0,4}", raw.strip().lower()):
        return raw.strip().lower()
    raise ValueError(
        f"must be an ngrok region code such as eu, us, ap, au, sa, jp, in; got {raw!r}"
    )
