"""The stream relay with a client that reads slowly, so that one of its writes waits for longer
than a heartbeat interval, as aiohttp's writes do when the client's socket is backed up.

Whatever ends a stream, its error event is the last thing the client gets, and it gets it once;
``bytes_out`` (the access log's figure) counts every byte handed to the client. LM Studio's side
is a real aiohttp server on loopback; the client's side is a writer double, because only it
can hold one chosen write for as long as a test needs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from tests.helpers import sse_events
from tray_app.config.settings import Config
from tray_app.gateway import api_errors as errors
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.upstream.streaming import HEARTBEAT, StreamRelay

BEAT = 0.02  # the heartbeat interval
HOLD = 0.15  # how long the held write waits: several beats
TOKENS = [f'data: {{"choices":[{{"delta":{{"content":"t{n}"}}}}]}}\n\n'.encode() for n in range(3)]
REVOKED = errors.credential_revoked()
DONE = b"data: [DONE]\n\n"
ERROR_MARK = b'"error"'  # in every error event, in no token or heartbeat


class SlowClient(AbstractStreamWriter):
    """The client's side of one response. A write is taken at once, as a transport buffers it
    (so a write cut short still reached the client), and the first write holding ``hold_on``
    then waits until ``release``."""

    def __init__(self) -> None:
        self.sent = bytearray()  # the response body as the client gets it
        self.headers_sent = 0
        self.hold_on: bytes | None = None
        self.hold_headers = False  # hold the headers' write instead
        self.holding = asyncio.Event()  # set while the held write waits
        self._released = asyncio.Event()

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        data = bytes(chunk)
        self.sent += data
        if self.hold_on is not None and self.hold_on in data:
            self.hold_on = None
            self.holding.set()
            await self._released.wait()

    def release(self) -> None:
        self._released.set()

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        self.headers_sent += 1
        if self.hold_headers:
            self.hold_headers = False
            self.holding.set()
            await self._released.wait()

    async def write_eof(self, chunk: bytes = b"") -> None:
        await self.write(chunk)

    async def drain(self) -> None:
        return None

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        raise AssertionError("the relay never compresses")

    def enable_chunking(self) -> None:
        return None


@dataclass
class Script:
    """What LM Studio does: think for ``delay`` seconds, then answer ``plain`` (status, JSON)
    or start a stream of ``reads``, wait ``pause`` seconds, and then end the stream, drop the
    connection, or hold it open."""

    delay: float = 0.0
    plain: tuple[int, bytes] | None = None
    reads: list[bytes] = field(default_factory=list)
    pause: float = 0.0
    then: Literal["end", "break", "hold"] = "hold"


@dataclass
class Upstream:
    url: str
    script: Script


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream("", Script())

    async def handle(request: web.Request) -> web.StreamResponse:
        script = up.script
        await asyncio.sleep(script.delay)
        if script.plain is not None:
            status, body = script.plain
            return web.Response(status=status, body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for read in script.reads:
            await response.write(read)
            await asyncio.sleep(0.02)  # each write is one read on the other side
        await asyncio.sleep(script.pause)
        if script.then == "break":
            assert request.transport is not None
            request.transport.close()
        elif script.then == "hold":
            await asyncio.sleep(30)  # until the relay lets go
        return response

    app = web.Application()
    app.router.add_post("/", handle)
    # Cancelled when the relay lets go, so that no handler outlives its test.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    up.url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    try:
        yield up
    finally:
        await runner.cleanup()


@dataclass
class Relayed:
    relay: StreamRelay
    client: SlowClient
    task: asyncio.Task[web.StreamResponse]


async def _start_relay(
    upstream: Upstream,
    client: SlowClient,
    *,
    open_error: ApiError | None = None,
    idle: float = 600.0,
    hide_usage: bool = False,
) -> Relayed:
    config = Config(
        streaming_heartbeat_interval=BEAT,
        limits_max_event_bytes=4096,
        upstream_idle_timeout=idle,
    )
    session = aiohttp.ClientSession()

    async def read_whole(response: aiohttp.ClientResponse) -> web.Response:
        return web.Response(status=response.status, body=await response.read())

    async def open_upstream() -> aiohttp.ClientResponse:
        if open_error is not None:
            await asyncio.sleep(upstream.script.delay)
            raise open_error
        return await session.post(upstream.url, timeout=aiohttp.ClientTimeout(sock_read=idle))

    relay = StreamRelay(
        make_mocked_request("POST", "/v1/chat/completions", writer=client),
        "req-slow",
        config=config,
        on_upstream=lambda _: None,
        read_whole=read_whole,
        is_stopping=lambda: False,
        hide_usage=hide_usage,
    )

    async def run() -> web.StreamResponse:
        try:
            return await relay.run(open_upstream)
        finally:
            await session.close()

    return Relayed(relay, client, asyncio.create_task(run()))


async def _finish(relayed: Relayed) -> bytes:
    """Lets the held write go after HOLD, waits for the relay, then a few beats more (a beat
    left running would write now), and returns what the client got."""
    await asyncio.wait_for(relayed.client.holding.wait(), 5)
    await asyncio.sleep(HOLD)
    relayed.client.release()
    await asyncio.wait_for(relayed.task, 5)
    await asyncio.sleep(HOLD)
    return bytes(relayed.client.sent)


def _without_beats(body: bytes) -> bytes:
    """The body without its leading heartbeats (due before the first token when LM Studio's
    answer is slow to arrive, as on a loaded machine)."""
    while body.startswith(HEARTBEAT):
        body = body.removeprefix(HEARTBEAT)
    return body


def _error_codes(body: bytes) -> list[str]:
    found = [json.loads(event) for event in sse_events(body) if event != "[DONE]"]
    return [event["error"]["code"] for event in found if "error" in event]


def _assert_ends_with_one_error(body: bytes, relay: StreamRelay, code: str) -> None:
    assert _error_codes(body) == [code]
    # From the last event's start to the end there is that event alone: no heartbeat after it.
    last_event = body[body.rindex(b"data: ") :]
    assert ERROR_MARK in last_event, body[-300:]
    assert last_event.endswith(b"\n\n") and last_event.count(b"\n\n") == 1, body[-300:]
    assert relay.error == code
    assert relay.bytes_out == len(body)


# Every way a stream can end in an error while heartbeats are being sent (before LM Studio's
# first token), and the code its error event carries.
Scenario = Callable[[Upstream, SlowClient], Awaitable[tuple[Relayed, str]]]


async def _open_fails(upstream: Upstream, client: SlowClient) -> tuple[Relayed, str]:
    upstream.script = Script(delay=3 * BEAT)
    failure = errors.upstream_unreachable()
    return await _start_relay(upstream, client, open_error=failure), failure.code


async def _answers_an_error(upstream: Upstream, client: SlowClient) -> tuple[Relayed, str]:
    upstream.script = Script(delay=3 * BEAT, plain=(500, b'{"error":"model crashed"}'))
    return await _start_relay(upstream, client), errors.stream_upstream_error("").code


async def _breaks_before_a_token(upstream: Upstream, client: SlowClient) -> tuple[Relayed, str]:
    upstream.script = Script(reads=[], pause=3 * BEAT, then="break")
    return await _start_relay(upstream, client), errors.stream_broke("").code


async def _idle_before_a_token(upstream: Upstream, client: SlowClient) -> tuple[Relayed, str]:
    upstream.script = Script(reads=[])  # headers, then nothing for longer than the idle limit
    return await _start_relay(upstream, client, idle=4 * BEAT), errors.stream_idle(0).code


async def _revoked_before_headers(upstream: Upstream, client: SlowClient) -> tuple[Relayed, str]:
    upstream.script = Script(delay=30)
    relayed = await _start_relay(upstream, client)
    await asyncio.sleep(3 * BEAT)
    relayed.relay.abort(REVOKED)
    return relayed, REVOKED.code


async def _revoked_before_a_token(upstream: Upstream, client: SlowClient) -> tuple[Relayed, str]:
    upstream.script = Script(delay=0, reads=[])  # headers, then nothing: the prompt is long
    relayed = await _start_relay(upstream, client)
    await asyncio.sleep(3 * BEAT)
    relayed.relay.abort(REVOKED)
    return relayed, REVOKED.code


SCENARIOS: dict[str, Scenario] = {
    "opening-fails": _open_fails,
    "lm-studio-answers-an-error": _answers_an_error,
    "breaks-before-a-token": _breaks_before_a_token,
    "idle-before-a-token": _idle_before_a_token,
    "revoked-before-headers": _revoked_before_headers,
    "revoked-before-a-token": _revoked_before_a_token,
}


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_no_heartbeat_follows_the_error_event_however_long_it_takes_to_write(
    upstream: Upstream, scenario: str
) -> None:
    client = SlowClient()
    client.hold_on = ERROR_MARK
    relayed, code = await SCENARIOS[scenario](upstream, client)
    body = await _finish(relayed)
    assert body.startswith(HEARTBEAT)  # the pump was beating when the stream failed
    _assert_ends_with_one_error(body, relayed.relay, code)
    assert client.headers_sent == 1


@pytest.mark.parametrize("hide_usage", [False, True], ids=["plain", "in-events"])
async def test_a_revocation_while_a_token_is_being_written_counts_that_token(
    upstream: Upstream, hide_usage: bool
) -> None:
    # The write that waits has reached the client (a transport holds it): the abort must let
    # it finish, not cut it off, or the access log undercounts what the client got.
    upstream.script = Script(reads=TOKENS)
    client = SlowClient()
    client.hold_on = TOKENS[1]
    relayed = await _start_relay(upstream, client, hide_usage=hide_usage)
    await asyncio.wait_for(client.holding.wait(), 5)
    relayed.relay.abort(REVOKED)
    body = await _finish(relayed)
    assert _without_beats(body).startswith(TOKENS[0] + TOKENS[1])
    _assert_ends_with_one_error(body, relayed.relay, REVOKED.code)


@pytest.mark.parametrize("ending", ["stream-breaks", "opening-fails"])
async def test_a_revocation_while_the_error_event_is_being_written_adds_no_second_one(
    upstream: Upstream, ending: str
) -> None:
    client = SlowClient()
    client.hold_on = ERROR_MARK
    if ending == "stream-breaks":  # LM Studio's response is open: the abort closes it
        upstream.script = Script(reads=TOKENS[:1], then="break")
        relayed, code = await _start_relay(upstream, client), errors.stream_broke("").code
    else:  # no response to close: the abort must not cancel the write in progress
        relayed, code = await _open_fails(upstream, client)
    await asyncio.wait_for(client.holding.wait(), 5)
    relayed.relay.abort(REVOKED)  # too late: the stream already ends with its own error
    body = await _finish(relayed)
    if ending == "stream-breaks":  # a beat may come first on a loaded machine
        assert _without_beats(body).startswith(TOKENS[0])
    else:
        assert body.startswith(HEARTBEAT)
    _assert_ends_with_one_error(body, relayed.relay, code)


@pytest.mark.parametrize("hide_usage", [False, True], ids=["plain", "in-events"])
async def test_no_heartbeat_comes_between_tokens_however_slow_the_client(
    upstream: Upstream, hide_usage: bool
) -> None:
    # A beat written between two reads of the plain relay can land inside an event.
    upstream.script = Script(delay=3 * BEAT, reads=[*TOKENS, DONE], then="end")
    client = SlowClient()
    client.hold_on = TOKENS[0]
    relayed = await _start_relay(upstream, client, hide_usage=hide_usage)
    body = await _finish(relayed)
    assert body.startswith(HEARTBEAT)
    assert body.removeprefix(HEARTBEAT * body.count(HEARTBEAT)) == b"".join(TOKENS) + DONE
    assert relayed.relay.error is None
    assert relayed.relay.bytes_out == len(body)


async def test_a_plain_answer_to_a_stream_request_is_the_last_thing_sent(
    upstream: Upstream,
) -> None:
    # LM Studio answered with JSON after heartbeats went out: the answer goes out as one event
    # and [DONE], and no beat after them.
    upstream.script = Script(delay=3 * BEAT, plain=(200, b'{"choices": []}'))
    client = SlowClient()
    client.hold_on = DONE
    relayed = await _start_relay(upstream, client)
    body = await _finish(relayed)
    assert body.startswith(HEARTBEAT)
    assert body.endswith(b'\n\ndata: {"choices": []}\n\n' + DONE)
    assert relayed.relay.bytes_out == len(body)


async def test_a_failure_to_open_while_a_beat_sends_the_headers_ends_as_an_event(
    upstream: Upstream,
) -> None:
    # The headers are on their way when opening LM Studio fails: the failure cannot be a plain
    # JSON answer any more, so the relay waits for the beat and sends an error event.
    client = SlowClient()
    client.hold_headers = True
    relayed, code = await _open_fails(upstream, client)
    body = await _finish(relayed)
    assert body.startswith(HEARTBEAT)
    _assert_ends_with_one_error(body, relayed.relay, code)
    assert client.headers_sent == 1
