"""Default-deny routing: which requests may reach LM Studio, decided on a normalised path.

The upstream URL is always built from the matched route's own canonical path, never from what
the client sent, so no encoding or normalisation trick can make LM Studio see another path.
Anything that does not normalise cleanly is refused outright.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from tray_app.identity.principal import SCOPE_CHAT, SCOPE_EMBEDDINGS, SCOPE_MODELS


@dataclass(frozen=True, slots=True)
class Route:
    """One LM Studio endpoint the gateway forwards."""

    path: str
    method: str
    scope: str
    needs_model: bool
    option: str | None = None  # config flag that must be on, or None when always on


FORWARDED_ROUTES: tuple[Route, ...] = (
    Route("/v1/models", "GET", SCOPE_MODELS, needs_model=False),
    Route("/v1/chat/completions", "POST", SCOPE_CHAT, needs_model=True),
    Route("/v1/completions", "POST", SCOPE_CHAT, needs_model=True),
    Route("/v1/embeddings", "POST", SCOPE_EMBEDDINGS, needs_model=True),
    Route(
        "/v1/responses",
        "POST",
        SCOPE_CHAT,
        needs_model=True,
        option="routes.enable_responses",
    ),
    Route(
        "/v1/messages",
        "POST",
        SCOPE_CHAT,
        needs_model=True,
        option="routes.enable_messages",
    ),
)


# Segments of letters, digits, '_' and '-' only: no encoding, dots or empty segments to fold.
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9_\-]+)+")


def normalise_path(raw_target: str) -> str | None:
    """The canonical form of a request target's path, or None when it must be refused.

    Refused: no leading slash (absolute-form targets), encoded slashes or backslashes, any
    backslash, double encoding, control characters, invalid UTF-8, and ``..`` that climbs
    above the root. Accepted and folded: ``//``, ``/./``, ``..`` inside the path, a trailing slash.
    """
    path = raw_target.split("?", 1)[0].split("#", 1)[0]
    if _PLAIN_PATH.fullmatch(path):
        return path  # nothing to decode or fold: the common case, decided by one regex
    return fold_path(path)


def fold_path(path: str) -> str | None:
    """:func:`normalise_path`'s full rules for a path without query or fragment."""
    if not path.startswith("/"):
        return None
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in path:
        return None
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None
    if "%" in decoded or "\\" in decoded:
        return None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in decoded):
        return None
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in {"", "."}:
            continue
        if segment == "..":
            if not segments:
                return None
            segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the gateway answers itself; LM Studio never hears of it."""

    status: int
    message: str
    code: str
    allow: str | None = None  # for 405: the Allow header


_ALWAYS_FORWARDED = ", ".join(f"{r.method} {r.path}" for r in FORWARDED_ROUTES if r.option is None)


class RouteTable:
    """Resolves (method, raw target) to a forwarded :class:`Route` or a :class:`Refusal`."""

    def __init__(self, enabled_options: frozenset[str] = frozenset()) -> None:
        self._by_path: dict[str, Route] = {}
        self._disabled: dict[str, Route] = {}
        for route in FORWARDED_ROUTES:
            if route.option is None or route.option in enabled_options:
                self._by_path[route.path] = route
            else:
                self._disabled[route.path] = route

    @property
    def routes(self) -> Mapping[str, Route]:
        return self._by_path

    def resolve(self, method: str, path: str | None) -> Route | Refusal:
        """``path`` is the result of :func:`normalise_path` (None = unparseable)."""
        if path is None:
            return Refusal(404, "This path is not allowed by LM Gate.", "path_not_allowed")
        route = self._by_path.get(path)
        if route is not None:
            if method != route.method:
                return Refusal(
                    405,
                    f"Method {method} is not allowed on {path}; use {route.method}.",
                    "method_not_allowed",
                    allow=route.method,
                )
            return route
        disabled = self._disabled.get(path)
        if disabled is not None:
            return Refusal(
                404,
                f"{path} is turned off in LM Gate; enable it with the setting {disabled.option}.",
                "route_disabled",
            )
        if path == "/api" or path.startswith("/api/"):
            return Refusal(
                404,
                "LM Studio's native /api endpoints (model download, load, unload) are never "
                f"exposed by LM Gate. Forwarded: {_ALWAYS_FORWARDED}.",
                "path_not_allowed",
            )
        return Refusal(
            404,
            f"Unknown path {path[:100]}. LM Gate forwards only: {_ALWAYS_FORWARDED}.",
            "unknown_path",
        )
