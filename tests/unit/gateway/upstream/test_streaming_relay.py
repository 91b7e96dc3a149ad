"""The stream relay's usage hiding on its own, over real loopback sockets but without the
gateway: a scripted upstream writes exactly the reads a test names, one StreamRelay relays
them, and the test sees both what the client got and what the relay recorded.

A stream whose usage LM Gate asked for must reach the client without it while the usage is
still counted; a stream nobody cuts must reach the client byte for byte; an observer sees
exactly what the client got.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from openai._streaming import SSEDecoder

from tests.helpers import sse_events
from tray_app.config.settings import Config
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.upstream.streaming import StreamRelay, _HeartbeatPump
from tray_app.gateway.upstream.usage import Usage

LIMIT = 1024
CONTENT = b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'
USAGE_ONLY = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n'
DONE = b"data: [DONE]\n\n"


@dataclass
class Rig:
    """Upstream reads to send (each written alone, a pause between), relay options, and the
    relays made, one per request."""

    reads: list[bytes] = field(default_factory=list)
    hide_usage: bool = False
    observe: bool = False
    observed: list[bytes] = field(default_factory=list)
    relays: list[StreamRelay] = field(default_factory=list)
    upstream_url: str = ""
    url: str = ""
    # The same relay on a server that does not cancel a handler whose client hung up
    # (aiohttp's default): the relay then learns it from a failing write.
    url_uncancelled: str = ""
    upstream_closed: asyncio.Event = field(default_factory=asyncio.Event)
    # For an upstream that answers without a stream: its status, body, and how long it thinks.
    plain: tuple[int, bytes] | None = None
    body_delay: float = 0.0  # between the plain answer's headers and its body
    header_delay: float = 0.0
    heartbeat: float = 0.0
    # The upstream drops its connection after its reads instead of ending the stream.
    breaks: bool = False
    # What reading a non-stream answer raises (LM Studio's answer too large, say).
    read_error: ApiError | None = None
    stopping: bool = False
    # The upstream keeps its stream open after its reads (until the test ends it).
    holds: bool = False
    upstream_called: asyncio.Event = field(default_factory=asyncio.Event)
    # LM Gate's idle timeout (sock_read on the upstream request), when a test needs one.
    idle: float | None = None
    # What opening the upstream raises (as Forwarder._open turns failures into ApiError).
    open_error: ApiError | None = None
    extra_headers: dict[str, str] | None = None
    # abort() is called with this error before run() (a credential revoked in between).
    abort_first: ApiError | None = None
    # abort() is called with this error once run() is over (the revocation came too late).
    abort_after: ApiError | None = None
    # What each relay reported as LM Studio's response (on_upstream).
    upstreams: list[aiohttp.ClientResponse] = field(default_factory=list)
    # How each relaying handler ended: "returned", or the name of what it raised.
    endings: list[str] = field(default_factory=list)

    async def fetch(self) -> tuple[int, bytes]:
        async with (
            aiohttp.ClientSession() as s,
            s.post(self.url, timeout=aiohttp.ClientTimeout(total=10)) as r,
        ):
            return r.status, await r.read()

    @property
    def relay(self) -> StreamRelay:
        return self.relays[-1]


async def _upstream(rig: Rig, request: web.Request) -> web.StreamResponse:
    rig.upstream_called.set()
    try:
        await asyncio.sleep(rig.header_delay)
    except asyncio.CancelledError:
        rig.upstream_closed.set()
        raise
    if rig.plain is not None:
        status, body = rig.plain
        if not rig.body_delay:
            return web.Response(status=status, body=body, content_type="application/json")
        slow = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        slow.content_length = len(body)
        await slow.prepare(request)
        await asyncio.sleep(rig.body_delay)
        await slow.write(body)
        return slow
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        for read in rig.reads:
            await response.write(read)
            await asyncio.sleep(0.02)  # so that each write is one read on the other side
        if rig.breaks:
            assert request.transport is not None
            request.transport.close()
        if rig.holds:
            await asyncio.sleep(30)
    except (ConnectionResetError, asyncio.CancelledError):
        rig.upstream_closed.set()
        raise
    return response


async def _serve(app: web.Application, *, cancel: bool = True) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=cancel)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/"


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    rig = Rig()

    async def read_whole(upstream: aiohttp.ClientResponse) -> web.Response:
        body = await upstream.read()
        if rig.read_error is not None:
            raise rig.read_error
        return web.Response(status=upstream.status, body=body)

    async def open_upstream() -> aiohttp.ClientResponse:
        if rig.open_error is not None:
            await asyncio.sleep(rig.header_delay)
            raise rig.open_error
        timeout = aiohttp.ClientTimeout(sock_read=rig.idle)
        return await session.post(rig.upstream_url, timeout=timeout)

    async def handle(request: web.Request) -> web.StreamResponse:
        config = Config(
            streaming_heartbeat_interval=rig.heartbeat,
            limits_max_event_bytes=LIMIT,
            upstream_idle_timeout=rig.idle or 600.0,
        )
        observer: Callable[[bytes], None] | None = rig.observed.append if rig.observe else None
        # Said only when true: a relay told nothing must not cut the stream (the default).
        hiding = {"hide_usage": True} if rig.hide_usage else {}
        relay = StreamRelay(
            request,
            "req-relay",
            config=config,
            on_upstream=rig.upstreams.append,
            read_whole=read_whole,
            is_stopping=lambda: rig.stopping,
            observer=observer,
            extra_headers=rig.extra_headers,
            **hiding,
        )
        rig.relays.append(relay)
        if rig.abort_first is not None:
            relay.abort(rig.abort_first)
        try:
            response = await relay.run(open_upstream)
        except ApiError as err:  # what the gateway's error middleware does
            response = err.to_response("req-relay")
        except BaseException as exc:
            rig.endings.append(type(exc).__name__)
            raise
        if rig.abort_after is not None:
            relay.abort(rig.abort_after)
            await asyncio.sleep(0.01)  # the handler goes on (the access log is written here)
        rig.endings.append("returned")
        return response

    async def handle_upstream(request: web.Request) -> web.StreamResponse:
        return await _upstream(rig, request)

    upstream = web.Application()
    upstream.router.add_post("/", handle_upstream)
    relaying = web.Application()
    relaying.router.add_post("/", handle)
    async with aiohttp.ClientSession() as session:
        up_runner, rig.upstream_url = await _serve(upstream)
        runner, rig.url = await _serve(relaying)
        plain_runner, rig.url_uncancelled = await _serve(relaying, cancel=False)
        try:
            yield rig
        finally:
            await plain_runner.cleanup()
            await runner.cleanup()
            await up_runner.cleanup()


def _usage_in(body: bytes) -> bool:
    return b'"usage"' in body


# How a stream's usage may arrive: its own chunk, on the last content chunk, split over reads.
USAGE_STREAMS: dict[str, tuple[list[bytes], bytes]] = {
    "usage-chunk": ([CONTENT, CONTENT, USAGE_ONLY, DONE], CONTENT + CONTENT + DONE),
    "usage-on-content": (
        [
            CONTENT,
            b'data: {"choices":[{"delta":{"content":"end"}}],'
            b'"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n',
            DONE,
        ],
        CONTENT + b'data: {"choices": [{"delta": {"content": "end"}}]}\n\n' + DONE,
    ),
    "split-reads": (
        [CONTENT + USAGE_ONLY[:20], USAGE_ONLY[20:] + b"data: [DO", b"NE]\n\n"],
        CONTENT + DONE,
    ),
    "crlf": (
        [(CONTENT + USAGE_ONLY + DONE).replace(b"\n", b"\r\n")],
        CONTENT + DONE,
    ),
}


@pytest.mark.parametrize("observe", [False, True], ids=["alone", "observed"])
@pytest.mark.parametrize("stream", USAGE_STREAMS)
async def test_hidden_usage_does_not_reach_the_client_but_is_counted(
    rig: Rig, stream: str, observe: bool
) -> None:
    rig.reads, expected = USAGE_STREAMS[stream]
    rig.hide_usage = True
    rig.observe = observe
    status, body = await rig.fetch()
    assert status == 200
    assert body == expected
    assert not _usage_in(body)
    assert rig.relay.usage == Usage(3, 5)
    assert rig.relay.bytes_out == len(body)
    assert rig.relay.error is None
    assert rig.relay.status == 200
    assert b"".join(rig.observed) == (body if observe else b"")
    [upstream] = rig.upstreams  # the response the access log reads LM Studio's side from
    assert upstream.status == 200
    assert upstream.headers["Content-Type"] == "text/event-stream"


async def test_usage_hidden_early_in_a_long_stream_is_still_counted(rig: Rig) -> None:
    # The usage event is long gone from the last reads when the stream ends: the cutter's
    # count is the one that holds.
    rig.reads = [CONTENT, USAGE_ONLY, *[CONTENT] * 8, DONE]
    rig.hide_usage = True
    status, body = await rig.fetch()
    assert status == 200
    assert body == CONTENT * 9 + DONE
    assert rig.relay.usage == Usage(3, 5)


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
async def test_a_stream_nobody_cuts_reaches_the_client_byte_for_byte(rig: Rig, end: bytes) -> None:
    reads = [
        read.replace(b"\n", end) for read in [CONTENT, CONTENT[:9], CONTENT[9:], USAGE_ONLY, DONE]
    ]
    rig.reads = reads
    status, body = await rig.fetch()
    assert status == 200
    assert body == b"".join(reads)  # the client asked for the usage: it gets it, as sent
    assert rig.relay.usage == Usage(3, 5)  # counted from the stream's last reads
    assert rig.relay.bytes_out == len(body)


async def test_an_observer_sees_whole_events_exactly_as_the_client_gets_them(rig: Rig) -> None:
    rig.reads = [CONTENT[:10], CONTENT[10:] + USAGE_ONLY[:5], USAGE_ONLY[5:], DONE + b"data: x"]
    rig.observe = True
    status, body = await rig.fetch()
    assert status == 200
    # The usage the client asked for stays; the unfinished last event is relayed as it is.
    assert body == CONTENT + USAGE_ONLY + DONE + b"data: x"
    assert rig.observed[:3] == [CONTENT, USAGE_ONLY, DONE]
    assert b"".join(rig.observed) == body
    assert rig.relay.usage == Usage(3, 5)
    assert rig.relay.bytes_out == len(body)


async def test_a_stream_without_usage_counts_none(rig: Rig) -> None:
    rig.reads = [CONTENT, DONE]
    rig.hide_usage = True
    status, body = await rig.fetch()
    assert (status, body) == (200, CONTENT + DONE)
    assert rig.relay.usage is None


# A stream nobody cuts (no usage hidden, no observer) is relayed as it comes, whatever its
# events: the client's own parser bounds them.
@pytest.mark.parametrize(
    ("hide_usage", "observe"),
    [(True, False), (True, True), (False, True)],
    ids=["usage-hidden", "usage-hidden-observed", "observed"],
)
async def test_an_event_larger_than_the_limit_ends_the_stream_with_an_error(
    rig: Rig, hide_usage: bool, observe: bool
) -> None:
    big = b"data: " + b"x" * LIMIT + b"\n\n"
    rig.reads = [CONTENT, big, CONTENT, DONE]
    rig.hide_usage = hide_usage
    rig.observe = observe
    status, body = await rig.fetch()
    assert status == 200
    assert body.startswith(CONTENT)
    events = sse_events(body)
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_event_too_large"
    assert f"larger than {LIMIT} bytes" in error["message"]
    assert error["param"] is None
    assert error["request_id"] == "req-relay"
    assert b"x" * 100 not in body
    assert rig.relay.error == "upstream_event_too_large"
    await asyncio.wait_for(rig.upstream_closed.wait(), 5)  # the generation is stopped too


async def test_an_empty_stream_is_an_empty_answer(rig: Rig) -> None:
    rig.reads = []
    rig.hide_usage = True
    status, body = await rig.fetch()
    assert (status, body) == (200, b"")
    assert rig.relay.usage is None
    assert rig.relay.bytes_out == 0


# ---- LM Studio answers without a stream -----------------------------------------------------

ERROR_BODY = b'{"error":\n  "model not loaded"}'


@pytest.mark.parametrize("status", [200, 400, 503])
async def test_an_answer_before_any_heartbeat_is_passed_on_as_it_is(rig: Rig, status: int) -> None:
    rig.plain = (status, ERROR_BODY)
    assert await rig.fetch() == (status, ERROR_BODY)
    assert rig.relay.status == status
    assert not rig.relay.committed


async def test_a_plain_answer_after_heartbeats_becomes_one_event_and_done(rig: Rig) -> None:
    rig.plain = (200, b'{"choices":\n[{"text":"hi"}]}')
    rig.heartbeat, rig.header_delay = 0.05, 0.3
    status, body = await rig.fetch()
    assert status == 200
    beats, _, rest = body.rpartition(b": keep-alive\n\n")
    assert beats.replace(b": keep-alive\n\n", b"") == b""
    assert rest == b'data: {"choices":[{"text":"hi"}]}\n\ndata: [DONE]\n\n'
    assert rig.relay.committed
    assert rig.relay.error is None
    assert rig.relay.bytes_out == len(body)


@pytest.mark.parametrize("status", [400, 404, 500])
async def test_an_error_after_heartbeats_becomes_an_error_event(rig: Rig, status: int) -> None:
    rig.plain = (status, ERROR_BODY + b"\xff")
    rig.heartbeat, rig.header_delay = 0.05, 0.3
    got, body = await rig.fetch()
    assert got == 200  # the headers went out with the first heartbeat
    assert body.startswith(b": keep-alive\n\n")
    error = json.loads(sse_events(body)[-1])["error"]
    assert error["code"] == "upstream_error"
    assert error["param"] is None
    assert error["message"] == (ERROR_BODY + b"\xff").decode("utf-8", errors="replace")
    assert error["request_id"] == "req-relay"
    assert rig.relay.error == "upstream_error"


# ---- a heartbeat that fails -----------------------------------------------------------------


class _FailingRelay:
    def __init__(self) -> None:
        self.calls = 0

    async def heartbeat(self) -> None:
        self.calls += 1
        raise RuntimeError("socket in a bad state")


async def test_a_failed_heartbeat_is_logged_with_its_cause_and_not_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = _FailingRelay()
    with caplog.at_level(logging.WARNING, logger="lmgate.streaming"):
        pump = _HeartbeatPump(relay, 0.01)  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        await pump.stop()
    assert relay.calls == 1
    [record] = [r for r in caplog.records if r.name == "lmgate.streaming"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "SSE heartbeat failed: RuntimeError"
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


# ---- heartbeats and a broken stream -------------------------------------------------------


@pytest.mark.parametrize("hide_usage", [False, True], ids=["plain", "whole-events"])
async def test_heartbeats_stop_at_the_first_chunk(rig: Rig, hide_usage: bool) -> None:
    rig.reads = [CONTENT] * 12 + [DONE]  # about 0.25 s of stream, five heartbeat intervals
    rig.heartbeat, rig.hide_usage = 0.05, hide_usage
    status, body = await rig.fetch()
    assert (status, body) == (200, CONTENT * 12 + DONE)


@pytest.mark.parametrize("hide_usage", [False, True], ids=["plain", "whole-events"])
@pytest.mark.parametrize(
    ("stopping", "code"), [(False, "upstream_stream_failed"), (True, "shutting_down")]
)
async def test_a_stream_that_breaks_off_ends_with_an_error_event(
    rig: Rig, hide_usage: bool, stopping: bool, code: str
) -> None:
    rig.reads = [CONTENT, CONTENT]
    rig.breaks, rig.stopping, rig.hide_usage = True, stopping, hide_usage
    status, body = await rig.fetch()
    assert status == 200
    assert body.startswith(CONTENT)
    error = json.loads(sse_events(body)[-1])["error"]
    assert (error["code"], error["param"], error["request_id"]) == (code, None, "req-relay")
    assert rig.relay.error == code
    if not stopping:  # the failure is named, for whoever reads the client's error
        assert "broke off (its answer arrived broken)" in error["message"]


TOO_LARGE = ApiError(502, "LM Studio's answer is too large.", type="server_error", code="too_big")


@pytest.mark.parametrize("heartbeat", [0.0, 0.05], ids=["before-headers", "after-heartbeats"])
async def test_a_plain_answer_that_cannot_be_read_ends_with_its_error(
    rig: Rig, heartbeat: float
) -> None:
    rig.plain = (200, b"{}")
    rig.heartbeat, rig.header_delay, rig.read_error = heartbeat, 0.3, TOO_LARGE
    status, body = await rig.fetch()
    if heartbeat:
        assert status == 200  # committed: the error is the stream's last event
        error = json.loads(sse_events(body)[-1])["error"]
        assert rig.relay.error == "too_big"
    else:
        assert status == 502  # nothing sent yet: the error is the whole answer
        error = json.loads(body)["error"]
    assert (error["code"], error["param"], error["request_id"]) == ("too_big", None, "req-relay")


def _client_events(body: bytes) -> list[str]:
    """The events an SSE client reads from ``body``: the OpenAI SDK's own parser (unlike
    sse_events, which only picks data lines, it sees where each event ends)."""
    return [event.data for event in SSEDecoder().iter_bytes(iter([body]))]


# How the last read of a stream can stop: inside an event (then the relay ends that event
# before its error event) or right after one (then nothing is added).
PARTIAL = b'data: {"choices":[{"delta":{"content":"half'
STOPS: dict[str, tuple[bytes, bool]] = {
    "mid-line": (PARTIAL, True),
    "after-LF": (PARTIAL + b'"}}]}\n', True),
    "after-CRLF": (PARTIAL + b'"}}]}\r\n', True),
    "after-CR": (PARTIAL + b'"}}]}\r', True),
    "event-LF": (CONTENT, False),
    "event-CRLF": (CONTENT.replace(b"\n", b"\r\n"), False),
    "event-CR": (CONTENT.replace(b"\n", b"\r"), False),
    "event-LF-CR": (CONTENT[:-1] + b"\r", False),
    "event-LF-CRLF": (CONTENT[:-1] + b"\r\n", False),
    "blank-line-alone": (b"\n", False),  # a read of one byte still ends the event before it
}


@pytest.mark.parametrize("stop", STOPS)
async def test_a_stream_broken_mid_event_still_ends_with_an_error_the_client_can_read(
    rig: Rig, stop: str
) -> None:
    last, unfinished = STOPS[stop]
    rig.reads = [CONTENT, last]
    rig.breaks = True
    status, body = await rig.fetch()
    assert status == 200
    sent = CONTENT + last
    assert body.startswith(sent)
    ending = b"\n\n" if unfinished else b""
    assert body[len(sent) :].startswith(ending + b'data: {"error"')
    events = _client_events(body)
    error = json.loads(events[-1])["error"]  # its own event, whole JSON
    assert (error["code"], error["param"], error["request_id"]) == (
        "upstream_stream_failed",
        None,
        "req-relay",
    )
    assert "broke off (its answer arrived broken)" in error["message"]
    # What came before the error reads as it was sent; an unfinished event is ended, not lost.
    assert events[:-1] == _client_events(sent + ending)
    if unfinished:
        assert events[-2].startswith(PARTIAL[len(b"data: ") :].decode())
    assert rig.relay.bytes_out == len(body)


async def test_a_stream_broken_before_its_first_byte_is_only_its_error(rig: Rig) -> None:
    rig.reads, rig.breaks = [], True
    rig.heartbeat, rig.header_delay = 0.05, 0.2  # committed: the error is an event
    status, body = await rig.fetch()
    assert status == 200
    beats, _, rest = body.rpartition(b": keep-alive\n\n")
    assert beats.replace(b": keep-alive\n\n", b"") == b""
    assert rest.startswith(b'data: {"error"')  # no blank line: no event was begun
    assert json.loads(_client_events(body)[-1])["error"]["code"] == "upstream_stream_failed"


REVOKED = ApiError(401, "The credential was revoked.", type="invalid_request_error", code="revoked")


@pytest.mark.parametrize("stop", ["mid-line", "event-LF"])
async def test_an_abort_mid_event_ends_that_event_before_its_error(rig: Rig, stop: str) -> None:
    last, unfinished = STOPS[stop]
    rig.reads, rig.holds = [CONTENT, last], True
    fetching = asyncio.create_task(rig.fetch())
    sent = CONTENT + last
    async with asyncio.timeout(5):
        while not rig.relays or rig.relay.bytes_out < len(sent):
            await asyncio.sleep(0.01)
    rig.relay.abort(REVOKED)
    status, body = await asyncio.wait_for(fetching, 5)
    assert status == 200
    ending = b"\n\n" if unfinished else b""
    assert body == sent + ending + REVOKED.sse_event("req-relay")
    assert json.loads(_client_events(body)[-1])["error"]["code"] == "revoked"


# ---- what the plain relay keeps -------------------------------------------------------------


@pytest.mark.parametrize(("after", "found"), [(3, True), (4, False)])
async def test_the_plain_relay_keeps_only_the_last_four_reads_for_the_usage(
    rig: Rig, after: int, found: bool
) -> None:
    # The usage survives three later reads (a split event, an empty one, [DONE]); beyond
    # that memory stays bounded: only the last four reads are kept, not the whole stream.
    rig.reads = [CONTENT, USAGE_ONLY, *[CONTENT] * (after - 1), DONE]
    status, body = await rig.fetch()
    assert (status, body) == (200, b"".join(rig.reads))
    assert rig.relay.usage == (Usage(3, 5) if found else None)


# ---- the heartbeat task -----------------------------------------------------------------------


class _BlockedRelay:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def heartbeat(self) -> None:
        await self.release.wait()


async def test_a_heartbeat_is_written_by_a_task_named_for_it() -> None:
    # A task dump (asyncio debug mode, a hung shutdown) must say what a pending task is.
    relay = _BlockedRelay()
    pump = _HeartbeatPump(relay, 0.001)  # type: ignore[arg-type]
    async with asyncio.timeout(2):
        while not any(t.get_name() == "sse-heartbeat" for t in asyncio.all_tasks()):
            await asyncio.sleep(0.001)
    relay.release.set()
    await pump.stop()


# ---- LM Studio goes silent, or cannot be reached ------------------------------------------


@pytest.mark.parametrize("hide_usage", [False, True], ids=["plain", "whole-events"])
async def test_a_stream_that_goes_silent_ends_with_the_idle_error(
    rig: Rig, hide_usage: bool
) -> None:
    rig.reads, rig.holds, rig.idle, rig.hide_usage = [CONTENT], True, 0.3, hide_usage
    status, body = await rig.fetch()
    assert status == 200
    assert body.startswith(CONTENT)
    error = json.loads(_client_events(body)[-1])["error"]
    assert (error["code"], error["param"], error["request_id"]) == (
        "upstream_timeout",
        None,
        "req-relay",
    )
    assert "sent nothing for 0.3 s" in error["message"]
    assert rig.relay.error == "upstream_timeout"
    await asyncio.wait_for(rig.upstream_closed.wait(), 5)  # the generation is stopped too


UNREACHABLE = ApiError(502, "LM Studio is not running.", type="server_error", code="no_lm")


@pytest.mark.parametrize("heartbeat", [0.0, 0.05], ids=["before-headers", "after-heartbeats"])
async def test_an_upstream_that_cannot_be_opened_ends_with_its_error(
    rig: Rig, heartbeat: float
) -> None:
    rig.open_error, rig.heartbeat, rig.header_delay = UNREACHABLE, heartbeat, 0.3
    status, body = await rig.fetch()
    if heartbeat:
        assert status == 200  # committed by the heartbeats: the error is the last event
        beats, _, rest = body.rpartition(b": keep-alive\n\n")
        assert beats.replace(b": keep-alive\n\n", b"") == b""
        assert rest == UNREACHABLE.sse_event("req-relay")
        assert rig.relay.error == "no_lm"
    else:
        assert status == 502  # nothing sent yet: the error is the whole answer
        assert json.loads(body)["error"]["code"] == "no_lm"
        assert not rig.relay.committed


# ---- abort from outside, in every phase --------------------------------------------------------


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("hide_usage", [False, True], ids=["plain", "whole-events"])
@pytest.mark.parametrize(
    ("phase", "heartbeat"),
    [
        ("before-headers", 0.0),
        ("before-headers", 0.05),
        ("before-first-token", 0.0),
        ("before-first-token", 0.05),
        ("mid-stream", 0.0),
    ],
)
async def test_abort_ends_the_stream_with_its_error_and_stops_the_upstream(
    rig: Rig, phase: str, heartbeat: float, hide_usage: bool
) -> None:
    rig.heartbeat, rig.hide_usage, rig.holds = heartbeat, hide_usage, True
    if phase == "before-headers":
        rig.header_delay = 30
    elif phase == "mid-stream":
        rig.reads = [CONTENT]
    fetching = asyncio.create_task(rig.fetch())
    await asyncio.wait_for(rig.upstream_called.wait(), 5)
    if phase == "mid-stream":
        await _until(lambda: rig.relay.bytes_out >= len(CONTENT))
    else:
        await asyncio.sleep(0.2)  # LM Studio is "processing the prompt"; heartbeats go out
    rig.relay.abort(REVOKED)
    status, body = await asyncio.wait_for(fetching, 5)
    assert status == 200
    beats, _, rest = body.rpartition(b": keep-alive\n\n")
    assert beats.replace(b": keep-alive\n\n", b"") == b""
    sent = CONTENT if phase == "mid-stream" else b""
    assert rest == sent + REVOKED.sse_event("req-relay")
    assert bool(beats or rest != body) == bool(heartbeat)
    assert rig.relay.error == "revoked"
    assert rig.relay.usage is None
    await asyncio.wait_for(rig.upstream_closed.wait(), 5)


async def test_abort_after_the_stream_ended_changes_nothing(rig: Rig) -> None:
    rig.reads = [CONTENT, DONE]
    assert await rig.fetch() == (200, CONTENT + DONE)
    rig.relay.abort(REVOKED)
    assert rig.relay.error is None
    assert rig.relay.bytes_out == len(CONTENT + DONE)


async def test_a_second_abort_is_ignored(rig: Rig) -> None:
    rig.holds = True
    fetching = asyncio.create_task(rig.fetch())
    await asyncio.wait_for(rig.upstream_called.wait(), 5)
    await asyncio.sleep(0.05)
    rig.relay.abort(REVOKED)
    rig.relay.abort(UNREACHABLE)
    status, body = await asyncio.wait_for(fetching, 5)
    assert (status, body) == (200, REVOKED.sse_event("req-relay"))
    assert rig.relay.error == "revoked"


# ---- the client hangs up ------------------------------------------------------------------


async def _hang_up(url: str, *, after_first_read: bool) -> None:
    if after_first_read:
        async with aiohttp.ClientSession() as s:
            r = await s.post(url)
            await r.content.readany()
            r.close()
        return
    port = int(url.rsplit(":", 1)[1].strip("/"))
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.2)  # LM Studio is "processing the prompt"
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("hide_usage", [False, True], ids=["plain", "whole-events"])
@pytest.mark.parametrize("heartbeat", [0.0, 0.05], ids=["no-heartbeat", "heartbeat"])
@pytest.mark.parametrize("phase", ["before-headers", "before-first-token", "mid-stream"])
async def test_hanging_up_stops_the_upstream_at_once(
    rig: Rig, phase: str, heartbeat: float, hide_usage: bool
) -> None:
    rig.heartbeat, rig.hide_usage, rig.holds = heartbeat, hide_usage, True
    if phase == "before-headers":
        rig.header_delay = 30
    elif phase == "mid-stream":
        rig.reads = [CONTENT] * 100
    await _hang_up(rig.url, after_first_read=phase == "mid-stream")
    await asyncio.wait_for(rig.upstream_closed.wait(), 1)
    await _until(lambda: bool(rig.endings))
    assert rig.endings == ["CancelledError"]  # aiohttp's cancellation is let through
    if phase != "mid-stream" and not heartbeat:
        assert rig.relay.status == 0  # nothing was sent: the access log says so


@pytest.mark.parametrize("hide_usage", [False, True], ids=["plain", "whole-events"])
async def test_a_client_gone_mid_stream_is_recorded_and_stops_the_upstream(
    rig: Rig, hide_usage: bool
) -> None:
    rig.reads, rig.hide_usage, rig.holds = [CONTENT] * 100, hide_usage, True
    await _hang_up(rig.url_uncancelled, after_first_read=True)
    await asyncio.wait_for(rig.upstream_closed.wait(), 2)
    await _until(lambda: rig.relay.status == 499)
    assert rig.relay.error == "client_disconnected"
    await _until(lambda: bool(rig.endings))
    assert rig.endings == ["returned"]  # nothing raised: aiohttp finds the transport closed
    assert 0 < rig.relay.bytes_out < 100 * len(CONTENT)


# ---- the stream's headers ----------------------------------------------------------------------


@pytest.mark.parametrize("heartbeat", [0.0, 0.05], ids=["first-chunk", "first-heartbeat"])
async def test_a_stream_goes_out_as_unbuffered_uncached_sse_with_its_headers(
    rig: Rig, heartbeat: float
) -> None:
    rig.reads, rig.heartbeat, rig.header_delay = [CONTENT, DONE], heartbeat, 0.2
    rig.extra_headers = {"X-LMGate-Note": "kept"}
    async with aiohttp.ClientSession() as s, s.post(rig.url) as r:
        assert r.status == 200
        # Proxies (nginx, ngrok's edge) must neither buffer nor cache a token stream.
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Accel-Buffering"] == "no"
        assert r.headers["X-Request-ID"] == "req-relay"
        assert r.headers["X-LMGate-Note"] == "kept"
        assert (await r.read()).endswith(CONTENT + DONE)


async def test_abort_before_the_relay_runs_sends_only_its_error(rig: Rig) -> None:
    rig.reads, rig.abort_first = [CONTENT, DONE], REVOKED
    assert await rig.fetch() == (200, REVOKED.sse_event("req-relay"))
    assert not rig.upstream_called.is_set()  # LM Studio is never asked
    assert rig.relay.error == "revoked"


async def test_stopping_the_pump_waits_for_a_heartbeat_being_written() -> None:
    # The relay writes its own first bytes only after stop() returns: a beat half-written
    # then would interleave with them, or prepare the response a second time.
    relay = _BlockedRelay()
    pump = _HeartbeatPump(relay, 0.001)  # type: ignore[arg-type]
    async with asyncio.timeout(2):
        while pump._beat is None:
            await asyncio.sleep(0.001)
    await asyncio.sleep(0)  # the beat task runs into relay.heartbeat() and blocks there
    stopping = asyncio.create_task(pump.stop())
    await asyncio.sleep(0.02)
    assert not stopping.done()
    relay.release.set()
    await asyncio.wait_for(stopping, 1)


@pytest.mark.parametrize("heartbeat", [0.0, 0.05], ids=["refused", "error-event"])
async def test_an_abort_after_the_relay_ended_leaves_the_handler_alone(
    rig: Rig, heartbeat: float
) -> None:
    # LM Studio could not be reached, so the relay never had an upstream to close: a late
    # abort must not cancel the handler, which is still finishing the request.
    rig.open_error, rig.heartbeat, rig.header_delay = UNREACHABLE, heartbeat, 0.2
    rig.abort_after = REVOKED
    status, body = await rig.fetch()
    assert status == (200 if heartbeat else 502)
    assert b"revoked" not in body
    assert rig.endings == ["returned"]
    assert rig.relay.error == ("no_lm" if heartbeat else None)


async def test_an_answer_without_a_content_type_is_no_stream(rig: Rig) -> None:
    # aiohttp always names a type, so a bare socket plays LM Studio here.
    answer = b'{"choices":[]}'

    async def bare(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(bare, "127.0.0.1", 0)
    rig.upstream_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    async with server:
        assert await rig.fetch() == (200, answer)  # passed on whole, not relayed as SSE
    assert not rig.relay.committed
    assert rig.relay.status == 200


async def test_an_observer_gets_no_empty_rest_after_a_stream_that_ends_whole(rig: Rig) -> None:
    rig.reads, rig.observe = [CONTENT, DONE], True
    assert await rig.fetch() == (200, CONTENT + DONE)
    assert rig.observed == [CONTENT, DONE]


async def test_a_stream_of_a_few_bytes_that_ends_whole_gets_no_extra_blank_line(rig: Rig) -> None:
    rig.reads, rig.breaks = [b":\r\r"], True  # a comment, then CR CR: a whole (empty) event
    status, body = await rig.fetch()
    assert status == 200
    assert body.startswith(b':\r\rdata: {"error"')


async def test_heartbeats_stop_when_lm_studio_answers_without_a_stream(rig: Rig) -> None:
    # The answer's body may take a while to read: no heartbeat may commit the response as a
    # 200 stream meanwhile, or LM Studio's own status would be lost.
    rig.plain, rig.body_delay, rig.heartbeat = (400, ERROR_BODY), 0.3, 0.05
    assert await rig.fetch() == (400, ERROR_BODY)
    assert not rig.relay.committed


async def test_a_hang_up_together_with_an_abort_still_cancels_the_handler(rig: Rig) -> None:
    # abort() cancels the wait for LM Studio's headers; aiohttp cancelling the handler in the
    # same moment (the client left too) must not be swallowed with it.
    rig.header_delay = 30
    fetching = asyncio.create_task(rig.fetch())
    await asyncio.wait_for(rig.upstream_called.wait(), 5)
    relay = rig.relay
    relay.abort(REVOKED)
    assert relay._task is not None
    relay._task.cancel()  # what aiohttp does when the client hangs up
    await _until(lambda: bool(rig.endings))
    assert rig.endings == ["CancelledError"]
    fetching.cancel()
    await asyncio.gather(fetching, return_exceptions=True)


# ---- usage from the first event (/v1/messages' message_start) -----------------------------

MSG_START = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"usage":{"input_tokens":23,"output_tokens":1}}}'
    b"\n\n"
)
MSG_TEXT = b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{}}\n\n'
MSG_DELTA = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":15}}\n\n'
MSG_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
MESSAGES_STREAM = [MSG_START, *[MSG_TEXT] * 6, MSG_DELTA, MSG_STOP]


def _pieces(event: bytes, count: int) -> list[bytes]:
    size = -(-len(event) // count)
    return [event[i : i + size] for i in range(0, len(event), size)]


class TestTheFirstEventsUsage:
    """A /v1/messages stream says its prompt's input_tokens only in its first event and its
    output_tokens in its last: the relay reads both, or the budget charges no prompt."""

    @pytest.mark.parametrize("observe", [False, True], ids=["plain", "whole-events"])
    async def test_the_prompt_from_the_first_event_and_the_answer_from_the_last(
        self, rig: Rig, observe: bool
    ) -> None:
        rig.reads = MESSAGES_STREAM
        rig.observe = observe
        status, body = await rig.fetch()
        assert (status, body) == (200, b"".join(MESSAGES_STREAM))
        assert rig.relay.usage == Usage(23, 15)
        assert rig.relay.bytes_out == len(body)

    @pytest.mark.parametrize("observe", [False, True], ids=["plain", "whole-events"])
    @pytest.mark.parametrize("count", [2, 3, 4])
    async def test_a_first_event_in_up_to_four_reads_is_read_whole(
        self, rig: Rig, count: int, observe: bool
    ) -> None:
        rig.reads = [*_pieces(MSG_START, count), *MESSAGES_STREAM[1:]]
        assert len(rig.reads) == len(MESSAGES_STREAM) + count - 1
        rig.observe = observe
        status, body = await rig.fetch()
        assert (status, body) == (200, b"".join(MESSAGES_STREAM))
        assert rig.relay.usage == Usage(23, 15)
        assert rig.relay.bytes_out == len(body)

    async def test_the_plain_relay_looks_at_no_more_than_four_first_reads(self, rig: Rig) -> None:
        # Bounded like the tail: a first event dripped in more reads is passed on, unread.
        rig.reads = [*_pieces(MSG_START, 5), *MESSAGES_STREAM[1:]]
        status, body = await rig.fetch()
        assert (status, body) == (200, b"".join(MESSAGES_STREAM))
        assert rig.relay.usage == Usage(0, 15)

    async def test_whole_events_keep_the_first_however_many_reads_it_took(self, rig: Rig) -> None:
        rig.reads = [*_pieces(MSG_START, 6), *MESSAGES_STREAM[1:]]
        rig.observe = True
        status, body = await rig.fetch()
        assert (status, body) == (200, b"".join(MESSAGES_STREAM))
        assert rig.relay.usage == Usage(23, 15)

    @pytest.mark.parametrize("observe", [False, True], ids=["plain", "whole-events"])
    async def test_only_the_first_event_is_the_head(self, rig: Rig, observe: bool) -> None:
        # A usage in a later event, long before the tail, is not the first event's.
        later = b'data: {"usage":{"input_tokens":99,"output_tokens":99}}\n\n'
        rig.reads = [MSG_TEXT, later, *[MSG_TEXT] * 5, MSG_DELTA, MSG_STOP]
        rig.observe = observe
        status, _ = await rig.fetch()
        assert status == 200
        assert rig.relay.usage == Usage(0, 15)

    @pytest.mark.parametrize("count", [1, 2])
    async def test_a_stream_that_is_only_its_first_event(self, rig: Rig, count: int) -> None:
        rig.reads = _pieces(MSG_START, count)
        status, body = await rig.fetch()
        assert (status, body) == (200, MSG_START)
        assert rig.relay.usage == Usage(23, 1)

    async def test_a_stream_that_ends_inside_its_first_event(self, rig: Rig) -> None:
        rig.reads = _pieces(MSG_START[:-2], 2)
        status, body = await rig.fetch()
        assert (status, body) == (200, MSG_START[:-2])
        assert rig.relay.bytes_out == len(body)

    async def test_a_break_right_after_a_first_event_read_in_two_adds_no_blank_line(
        self, rig: Rig
    ) -> None:
        # The second read, which ends the event, is among the reads the error event follows.
        rig.reads = [MSG_START[:-1], b"\n"]
        rig.breaks = True
        status, body = await rig.fetch()
        assert status == 200
        assert body.startswith(MSG_START + b'data: {"error"')
        assert rig.relay.bytes_out == len(body)

    async def test_a_first_event_ended_across_two_reads_ends_the_head(self, rig: Rig) -> None:
        # Its blank line's two LFs in two reads: the head stops there, and a usage in the
        # next read (no tail's either) is not taken for the first event's.
        later = b'data: {"usage":{"input_tokens":99,"output_tokens":99}}\n\n'
        rig.reads = [MSG_TEXT[:-1], b"\n", later, *[MSG_TEXT] * 5, MSG_DELTA, MSG_STOP]
        status, _ = await rig.fetch()
        assert status == 200
        assert rig.relay.usage == Usage(0, 15)

    @pytest.mark.parametrize(("extra", "found"), [(0, True), (1, False)])
    async def test_only_max_event_bytes_of_the_head_are_read(
        self, rig: Rig, extra: int, found: bool
    ) -> None:
        # A first read with a comment before message_start: its data line is parsed only if
        # it ends within limits.max_event_bytes (no event the relay looks for is larger).
        size = LIMIT - (len(MSG_START) - 2) + extra
        comment = b": " + b"x" * (size - 4) + b"\n\n"
        assert len(comment) == size
        rig.reads = [comment + MSG_START, *[MSG_TEXT] * 5, MSG_DELTA, MSG_STOP]
        status, _ = await rig.fetch()
        assert status == 200
        assert rig.relay.usage == Usage(23 if found else 0, 15)
