"""The phone page: a few static files from resources/web, served with a strict
Content-Security-Policy (no inline script, nothing from other sites)."""

from __future__ import annotations

from aiohttp import web

from tray_app.gateway.api_errors import REQUEST_ID_HEADER
from tray_app.paths import resource_path

JAVASCRIPT = "text/javascript; charset=utf-8"

FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", JAVASCRIPT),
    "/markdown.js": ("markdown.js", JAVASCRIPT),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/manifest.webmanifest": ("manifest.webmanifest", "application/manifest+json"),
    "/icon.svg": ("icon.svg", "image/svg+xml"),
    "/apple-touch-icon.png": ("apple-touch-icon.png", "image/png"),
    # Debian's builds of marked, DOMPurify and highlight.js (resources/web/vendor/README).
    "/vendor/marked-4.2.3.min.js": ("vendor/marked-4.2.3.min.js", JAVASCRIPT),
    "/vendor/purify-2.4.1.min.js": ("vendor/purify-2.4.1.min.js", JAVASCRIPT),
    "/vendor/highlight-9.18.5-common.js": ("vendor/highlight-9.18.5-common.js", JAVASCRIPT),
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


# The vendored libraries are named by version (a new version is a new URL), so a phone may keep
# them instead of fetching 190 kB again each time it opens the page.
VENDOR_PREFIX = "/vendor/"
VENDOR_CACHE_CONTROL = "max-age=31536000, immutable"


class WebPage:
    def __init__(self) -> None:
        # Read once: a handful of small files.
        self._files = {
            path: (resource_path("web", name).read_bytes(), kind)
            for path, (name, kind) in FILES.items()
        }

    @property
    def paths(self) -> frozenset[str]:
        return frozenset(self._files)

    def response(self, path: str, request_id: str) -> web.Response:
        body, kind = self._files[path]
        response = web.Response(
            body=body, headers={**SECURITY_HEADERS, REQUEST_ID_HEADER: request_id}
        )
        response.headers["Content-Type"] = kind
        if path.startswith(VENDOR_PREFIX):
            response.headers["Cache-Control"] = VENDOR_CACHE_CONTROL
        return response
