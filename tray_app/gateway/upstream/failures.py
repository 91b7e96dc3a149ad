"""What went wrong on the way to LM Studio, in words a person reads (never an exception's
class name, which only a Python programmer can decode)."""

from __future__ import annotations

import aiohttp

# Most specific first: a DNS failure is also a connector error, a connector error an OS error.
_WORDS: tuple[tuple[type[BaseException], str], ...] = (
    (aiohttp.ClientConnectorDNSError, "its host name does not resolve"),
    (aiohttp.ClientConnectorCertificateError, "its TLS certificate was not accepted"),
    (aiohttp.ClientSSLError, "the TLS handshake failed"),
    (aiohttp.ClientConnectorError, "nothing accepts connections there"),
    (aiohttp.ServerDisconnectedError, "it closed the connection without answering"),
    (aiohttp.ClientPayloadError, "its answer arrived broken"),
    (aiohttp.InvalidURL, "the address is not a valid URL"),
    (aiohttp.ClientResponseError, "it did not answer like an HTTP server"),
    (TimeoutError, "no answer in time"),
    (aiohttp.ClientConnectionResetError, "the connection was reset"),
    (aiohttp.ClientOSError, "a network error"),
)


def describe_failure(exc: BaseException) -> str:
    for kind, words in _WORDS:
        if isinstance(exc, kind):
            return words
    return "a network error"
