"""Which headers cross the gateway, in each direction.

Both directions use an allowlist: hop-by-hop headers, the client's credentials (Authorization,
X-API-Key, Cookie), its Origin, and anything else unknown never reach LM Studio; LM Studio's own
CORS, cookies and connection headers never reach the internet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

# Request headers LM Studio may need to serve an inference request.
_TO_UPSTREAM = frozenset(
    {
        "content-type",
        "accept",
        "accept-language",
        "user-agent",
        "openai-beta",
        "anthropic-version",
        "anthropic-beta",
    }
)
# Response headers a client may need from LM Studio.
_TO_CLIENT = frozenset({"content-type", "content-encoding", "content-language", "retry-after"})

# fullmatch, not "^...$": "$" also matches before a trailing newline.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def _connection_listed(headers: Mapping[str, str]) -> set[str]:
    """Headers the sender marked hop-by-hop through ``Connection: a, b``."""
    listed: set[str] = set()
    for value in _all_named(headers, "connection"):
        listed.update(token.strip().lower() for token in value.split(","))
    return listed


def _all_named(headers: Mapping[str, str], lowered: str) -> list[str]:
    """Every value of the header named ``lowered`` (any case), repeated ones included."""
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        # What aiohttp gives: looked up by its case-insensitive index, not by a walk over
        # every header (this runs three times a request).
        return headers.getall(lowered, [])
    return [value for name, value in headers.items() if name.lower() == lowered]


def upstream_request_headers(
    client: Mapping[str, str], *, request_id: str, lmstudio_token: str | None
) -> CIMultiDict[str]:
    listed = _connection_listed(client)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in client.items():
        lowered = name.lower()
        if lowered in _TO_UPSTREAM and lowered not in listed:
            out.add(name, value)
    out["Content-Type"] = "application/json"
    # Compression buys nothing on loopback and would stop the gateway from reading usage.
    out["Accept-Encoding"] = "identity"
    out["X-Request-ID"] = request_id
    if lmstudio_token:
        out["Authorization"] = f"Bearer {lmstudio_token}"
    return out


def client_response_headers(upstream: Mapping[str, str]) -> CIMultiDict[str]:
    listed = _connection_listed(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lowered = name.lower()
        if lowered in _TO_CLIENT and lowered not in listed:
            out.add(name, value)
    return out


def is_upgrade_request(headers: Mapping[str, str]) -> bool:
    if "upgrade" in _connection_listed(headers):
        return True
    return bool(_all_named(headers, "upgrade"))


def sane_request_id(candidate: str | None) -> str | None:
    """The client's X-Request-ID if it is safe to echo and log, else None."""
    if candidate and _SANE_REQUEST_ID.fullmatch(candidate):
        return candidate
    return None
