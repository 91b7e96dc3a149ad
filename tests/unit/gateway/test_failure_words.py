"""Network failures on the way to LM Studio are told in words, never as an exception's class
name: the API's upstream_failed and stream errors and `lmgate doctor` said
"ClientConnectorError" or "ServerDisconnectedError"."""

from __future__ import annotations

import re

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from tray_app.gateway.upstream.failures import describe_failure
from tray_app.gateway.upstream.probe import probe_lmstudio

KEY = ConnectionKey("h", 1, False, True, None, None, None)


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (aiohttp.ClientConnectorDNSError(KEY, OSError(-2, "x")), "its host name does not resolve"),
        (aiohttp.ClientConnectorError(KEY, OSError(111, "x")), "nothing accepts connections there"),
        (aiohttp.ServerDisconnectedError(), "it closed the connection without answering"),
        (aiohttp.ClientPayloadError("x"), "its answer arrived broken"),
        (aiohttp.InvalidURL("x"), "the address is not a valid URL"),
        (aiohttp.ClientResponseError(None, ()), "it did not answer like an HTTP server"),  # type: ignore[arg-type]
        (TimeoutError(), "no answer in time"),
        (aiohttp.ServerTimeoutError(), "no answer in time"),
        (aiohttp.ClientConnectionResetError(), "the connection was reset"),
        (aiohttp.ClientOSError(), "a network error"),
        (aiohttp.ClientError(), "a network error"),
    ],
)
def test_each_failure_has_words(exc: BaseException, words: str) -> None:
    assert describe_failure(exc) == words


async def test_a_probe_of_nothing_says_why_in_words() -> None:
    with socket_closed_port() as port:
        probe = await probe_lmstudio(f"http://127.0.0.1:{port}", None, within=2.0)
    assert probe.failure == "ClientConnectorError"  # for code that tells cases apart
    assert probe.reason == "nothing accepts connections there"
    assert not re.search(r"[a-z][A-Z]", probe.reason), "no CamelCase class name"


class socket_closed_port:
    """A loopback port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None
