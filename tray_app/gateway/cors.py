"""CORS: which web pages may call the gateway from a browser.

The gateway's own page (same host) is always allowed; other origins only when listed. Preflights
are answered here and never forwarded. Requests from an origin that is not allowed are refused
outright (403), not merely left without CORS headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

ALLOWED_HEADERS = "Authorization, Content-Type, X-API-Key, X-Request-ID, ngrok-skip-browser-warning"
# X-Conversation-ID: a browser client of /api/chat learns which conversation a stream started.
EXPOSED_HEADERS = "X-Request-ID, Retry-After, X-Conversation-ID"
MAX_AGE = "600"


def normalise_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class CorsPolicy:
    def __init__(self, allowed_origins: Iterable[str] = ()) -> None:
        self._allowed = frozenset(normalise_origin(o) for o in allowed_origins if o.strip())

    def allows(self, origin: str, host: str | None) -> bool:
        normalised = normalise_origin(origin)
        if normalised in self._allowed:
            return True
        parts = urlsplit(normalised)
        # Same origin: the gateway's own page (host and port match the Host header).
        return (
            host is not None and parts.scheme in {"http", "https"} and parts.netloc == host.lower()
        )

    @staticmethod
    def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
        return (
            method == "OPTIONS"
            and "Origin" in headers
            and "Access-Control-Request-Method" in headers
        )

    @staticmethod
    def preflight_headers(origin: str, methods: str) -> dict[str, str]:
        """``methods``: what the path itself answers (its ``Allow``), so a preflight never
        promises a method the endpoint refuses."""
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": f"{methods}, OPTIONS",
            "Access-Control-Allow-Headers": ALLOWED_HEADERS,
            "Access-Control-Max-Age": MAX_AGE,
            "Vary": "Origin",
        }

    @staticmethod
    def response_headers(origin: str) -> dict[str, str]:
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
            "Vary": "Origin",
        }
