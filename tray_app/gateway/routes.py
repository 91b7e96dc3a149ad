"""Default-deny routing: one table of everything the gateway answers, decided on a normalised path.

:data:`ENDPOINTS` lists the gateway's own endpoints, the conversation API and the routes it
forwards to LM Studio. Routing, ``405`` with ``Allow``, CORS preflights and the list of
forwarded routes in error messages are all derived from it, so they cannot disagree.

The upstream URL is always built from the matched route's own canonical path, never from what
the client sent, so no encoding or normalisation trick can make LM Studio see another path.
Anything that does not normalise cleanly is refused outright.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import unquote

from tray_app.gateway import api_errors as errors
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.webpage import FILES as PAGE_FILES
from tray_app.identity.principal import SCOPE_CHAT, SCOPE_EMBEDDINGS, SCOPE_MODELS
from tray_app.stream_pacing import PATH as STREAM_CHECK_PATH


@dataclass(frozen=True, slots=True)
class Route:
    """One LM Studio endpoint the gateway forwards."""

    path: str
    method: str
    scope: str
    needs_model: bool
    option: str | None = None  # config flag that must be on, or None when always on
    # Answered by the gateway itself from what LM Studio has (or without asking it at all):
    # the route's path is never requested upstream.
    local: bool = False


class Part(Enum):
    """Which part of the gateway answers an endpoint. A gateway built without a part (no
    metrics registry, no pairing, no conversation store) does not serve its endpoints."""

    HEALTH = "health"
    READINESS = "readiness"
    METRICS = "metrics"
    PAIRING = "pairing"
    PHONE_PAGE = "phone page"  # pairs through /pair, so served only where pairing is
    CONVERSATIONS = "conversations"
    # A paced SSE stream that tells whether a tunnel streams; it never asks LM Studio.
    STREAM_CHECK = "stream check"
    LM_STUDIO = "lm studio"


ONE_SEGMENT = "{id}"
# One or more segments: LM Studio's model IDs often hold a slash ("qwen/qwen3-4b").
MODEL_ID = "{model}"
MODEL_PREFIX = "/v1/models/"
COUNT_TOKENS = "/v1/messages/count_tokens"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A path and the methods it answers; ``route`` for the ones forwarded to LM Studio. A path
    ending in :data:`ONE_SEGMENT` answers any single segment in its place, one ending in
    :data:`MODEL_ID` any number of segments."""

    path: str
    methods: tuple[str, ...]
    part: Part
    route: Route | None = None

    @property
    def prefix(self) -> str | None:
        """What a path must start with, for a path ending in a placeholder."""
        for placeholder in (ONE_SEGMENT, MODEL_ID):
            if self.path.endswith(placeholder):
                return self.path.removesuffix(placeholder)
        return None

    @property
    def allow(self) -> str:
        """The ``Allow`` header: exactly the methods this endpoint answers."""
        return ", ".join(self.methods)


def _forwarded(
    path: str,
    method: str,
    scope: str,
    *,
    needs_model: bool,
    option: str | None = None,
    local: bool = False,
) -> Endpoint:
    route = Route(path, method, scope, needs_model, option, local)
    return Endpoint(path, (method,), Part.LM_STUDIO, route)


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/healthz", ("GET",), Part.HEALTH),
    Endpoint("/readyz", ("GET",), Part.READINESS),
    Endpoint("/metrics", ("GET",), Part.METRICS),
    Endpoint("/pair", ("POST",), Part.PAIRING),
    Endpoint(STREAM_CHECK_PATH, ("POST",), Part.STREAM_CHECK),
    *(Endpoint(path, ("GET",), Part.PHONE_PAGE) for path in PAGE_FILES),
    Endpoint("/api/chat", ("POST",), Part.CONVERSATIONS),
    Endpoint("/api/conversations", ("GET",), Part.CONVERSATIONS),
    Endpoint("/api/conversations/{id}", ("GET", "DELETE"), Part.CONVERSATIONS),
    _forwarded("/v1/models", "GET", SCOPE_MODELS, needs_model=False),
    # Answered from the caller's filtered /v1/models list (openai's models.retrieve).
    _forwarded(MODEL_PREFIX + MODEL_ID, "GET", SCOPE_MODELS, needs_model=False, local=True),
    _forwarded("/v1/chat/completions", "POST", SCOPE_CHAT, needs_model=True),
    _forwarded("/v1/completions", "POST", SCOPE_CHAT, needs_model=True),
    _forwarded("/v1/embeddings", "POST", SCOPE_EMBEDDINGS, needs_model=True),
    _forwarded(
        "/v1/responses", "POST", SCOPE_CHAT, needs_model=True, option="routes.enable_responses"
    ),
    _forwarded(
        "/v1/messages", "POST", SCOPE_CHAT, needs_model=True, option="routes.enable_messages"
    ),
    # LM Studio has no token counter; Anthropic clients (Claude Code) call it before a turn.
    _forwarded(
        COUNT_TOKENS,
        "POST",
        SCOPE_CHAT,
        needs_model=True,
        option="routes.enable_messages",
        local=True,
    ),
)

# The routes whose path LM Studio itself is asked for.
FORWARDED_ROUTES: tuple[Route, ...] = tuple(
    e.route for e in ENDPOINTS if e.route is not None and not e.route.local
)


# Segments of letters, digits, '_' and '-' only: no encoding, dots or empty segments to fold.
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9_\-]+)+")
_ENCODED_SLASH = re.compile("%2f", re.IGNORECASE)


def normalise_path(raw_target: str) -> str | None:
    """The canonical form of a request target's path, or None when it must be refused.

    Refused: no leading slash (absolute-form targets), encoded slashes (but in a model ID)
    or backslashes, any backslash, double encoding, control characters, invalid UTF-8, and
    ``..`` that climbs above the root. Accepted and folded: ``//``, ``/./``, ``..`` inside the
    path, a trailing slash.
    """
    path = raw_target.split("?", 1)[0].split("#", 1)[0]
    if _PLAIN_PATH.fullmatch(path):
        return path  # nothing to decode or fold: the common case, decided by one regex
    if path.startswith(MODEL_PREFIX) and _ENCODED_SLASH.search(path):
        # openai's models.retrieve("qwen/qwen3-4b") encodes the ID's slash. The ID is only
        # looked up in a list, never sent on, so it may have one; it must not climb out.
        folded = fold_path(MODEL_PREFIX + _ENCODED_SLASH.sub("/", path[len(MODEL_PREFIX) :]))
        return folded if folded is not None and folded.startswith(MODEL_PREFIX) else None
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


class EndpointTable:
    """The endpoints one gateway serves: :data:`ENDPOINTS` less the parts it was built without
    and the forwarded routes whose option is off. Resolving a plain path is one dict lookup."""

    def __init__(
        self,
        enabled_options: frozenset[str] = frozenset(),
        parts: Iterable[Part] = tuple(Part),
    ) -> None:
        present = frozenset(parts)
        self._exact: dict[str, Endpoint] = {}
        self._prefixes: list[tuple[str, bool, Endpoint]] = []
        self._disabled: dict[str, Route] = {}
        for endpoint in ENDPOINTS:
            route = endpoint.route
            if endpoint.part not in present:
                continue
            if route is not None and route.option not in {None, *enabled_options}:
                self._disabled[endpoint.path] = route
            elif (prefix := endpoint.prefix) is not None:
                self._prefixes.append((prefix, endpoint.path.endswith(MODEL_ID), endpoint))
            else:
                self._exact[endpoint.path] = endpoint
        self.served: tuple[Endpoint, ...] = (
            *self._exact.values(),
            *(endpoint for _, _, endpoint in self._prefixes),
        )
        # What error messages list as forwarded: what this gateway really answers under /v1
        # (the routes answered here from LM Studio's list included; none that is off).
        self.forwarded_text = ", ".join(
            f"{e.route.method} {e.path}" for e in self.served if e.route is not None
        )

    @property
    def routes(self) -> Mapping[str, Route]:
        """The forwarded routes served, by path."""
        return {e.path: e.route for e in self.served if e.route is not None}

    def find(self, path: str | None) -> Endpoint | None:
        """The endpoint serving ``path`` (a :func:`normalise_path` result; None = unparseable)."""
        if path is None:
            return None
        endpoint = self._exact.get(path)
        if endpoint is not None:
            return endpoint
        for prefix, nested, endpoint in self._prefixes:
            rest = path.removeprefix(prefix)
            if rest != path and rest and (nested or "/" not in rest):
                return endpoint
        return None

    def refusal(self, path: str | None) -> ApiError:
        """Why ``path``, which :meth:`find` did not find, is not served."""
        if path is None:
            return errors.path_not_allowed()
        disabled = self._disabled.get(path)
        if disabled is not None and disabled.option is not None:
            return errors.route_disabled(path, disabled.option)
        if path == "/api" or path.startswith("/api/"):
            return errors.native_api_refused(self.forwarded_text)
        return errors.unknown_path(path, self.forwarded_text)
