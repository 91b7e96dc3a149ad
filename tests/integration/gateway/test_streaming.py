"""Streaming: chunk by chunk, no total timeout, heartbeats, hang-ups close LM Studio's side."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from openai._streaming import SSEDecoder

from tests.conftest import CLIENT_KEY, GatewayFactory, auth_headers
from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import sse_events
from tray_app.config.settings import Config
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.chat_api import CHAT_ROUTE
from tray_app.gateway.server.runner import GatewayServer
from tray_app.gateway.upstream.client import session_context
from tray_app.gateway.upstream.forwarding import Forwarder, Outcome
from tray_app.gateway.upstream.streaming import StreamRelay
from tray_app.gateway.upstream.usage import Usage

# Both a request body and the OpenAI client's keyword arguments.
CHAT: dict[str, Any] = {
    "model": "qwen2.5-7b-instruct",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}


async def test_chunks_arrive_as_they_are_produced(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    fake_lmstudio.behaviour.chunks = 6
    fake_lmstudio.behaviour.chunk_delay = 0.25
    received_at: list[float] = []
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=auth_headers()) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Accel-Buffering"] == "no"
        buffered = b""
        async for chunk in r.content.iter_any():
            buffered += chunk
            while b"tok" in buffered and b"\n\n" in buffered:
                event, _, buffered = buffered.partition(b"\n\n")
                if b'"content": "tok' in event:
                    received_at.append(time.monotonic())
    assert len(received_at) == 6
    # Each chunk reaches the client right after LM Studio wrote it, not at the end.
    for sent, got in zip(fake_lmstudio.chunk_sent_at, received_at, strict=True):
        assert got - sent < 0.1


async def test_no_total_timeout_on_a_long_stream(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(upstream_idle_timeout=1.0)
    fake_lmstudio.behaviour.chunks = 8
    fake_lmstudio.behaviour.chunk_delay = 0.4  # 2.8 s in all, each gap under the idle timeout
    async with openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0
    ) as client:
        stream = await client.chat.completions.create(**CHAT)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == "".join(f"tok{i} " for i in range(8))


async def test_heartbeats_while_the_prompt_is_processed(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(streaming_heartbeat_interval=0.2)
    fake_lmstudio.behaviour.header_delay = 0.5  # before LM Studio even answers
    fake_lmstudio.behaviour.first_chunk_delay = 0.5  # then silence before the first token
    fake_lmstudio.behaviour.chunks = 3
    async with (
        aiohttp.ClientSession() as s,
        s.post(server.url + "/v1/chat/completions", json=CHAT, headers=auth_headers()) as r,
    ):
        assert r.status == 200
        assert r.headers["X-Accel-Buffering"] == "no"
        body = await r.read()
    comments = [line for line in body.decode().splitlines() if line.startswith(":")]
    assert len(comments) >= 3
    assert sse_events(body)[-1] == "[DONE]"


async def test_heartbeats_are_harmless_to_the_openai_client(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(streaming_heartbeat_interval=0.1)
    fake_lmstudio.behaviour.header_delay = 0.35
    fake_lmstudio.behaviour.first_chunk_delay = 0.35
    fake_lmstudio.behaviour.chunks = 4
    async with openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0
    ) as client:
        stream = await client.chat.completions.create(**CHAT)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == "tok0 tok1 tok2 tok3 "


@pytest.mark.parametrize("heartbeat", [0.0, 0.2], ids=["no-heartbeat", "heartbeat"])
async def test_hanging_up_mid_stream_closes_lm_studios_request(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio, heartbeat: float
) -> None:
    server = await start_gateway(streaming_heartbeat_interval=heartbeat)
    fake_lmstudio.behaviour.chunks = 1000
    fake_lmstudio.behaviour.chunk_delay = 0.05
    async with aiohttp.ClientSession() as s:
        r = await s.post(server.url + "/v1/chat/completions", json=CHAT, headers=auth_headers())
        await r.content.readany()
        hung_up = time.monotonic()
        r.close()
    await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 1.0)
    assert fake_lmstudio.disconnects[0] - hung_up < 1.0
    assert len(fake_lmstudio.chunk_sent_at) < 100, "LM Studio kept generating"


@pytest.mark.parametrize("phase", ["before-headers", "before-first-token"])
@pytest.mark.parametrize("heartbeat", [0.0, 0.2], ids=["no-heartbeat", "heartbeat"])
async def test_hanging_up_during_prompt_processing_closes_lm_studios_request(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio, heartbeat: float, phase: str
) -> None:
    server = await start_gateway(streaming_heartbeat_interval=heartbeat)
    if phase == "before-headers":
        fake_lmstudio.behaviour.header_delay = 30
    else:
        fake_lmstudio.behaviour.first_chunk_delay = 30
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    body = json.dumps(CHAT).encode()
    writer.write(
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    await asyncio.sleep(0.5)  # LM Studio is now "processing the prompt"
    assert fake_lmstudio.received, "the request should have reached LM Studio"
    hung_up = time.monotonic()
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 1.0)
    assert fake_lmstudio.disconnects[0] - hung_up < 1.0


async def test_upstream_failure_mid_stream_ends_with_an_error_event(
    client: openai.AsyncOpenAI, fake_lmstudio: FakeLMStudio, gateway: GatewayServer
) -> None:
    fake_lmstudio.behaviour.chunks = 10
    fake_lmstudio.behaviour.fail_after = 3
    stream = await client.chat.completions.create(**CHAT)
    parts: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async with asyncio.timeout(5):  # an error, never a hang
            async for chunk in stream:
                parts.append(chunk.choices[0].delta.content or "")
    assert "".join(parts) == "tok0 tok1 tok2 "
    assert "broke off" in caught.value.message
    # The raw stream ends with one OpenAI-shaped error event carrying the request ID.
    fake_lmstudio.behaviour.fail_after = 1
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=auth_headers()) as r,
    ):
        events = sse_events(await r.read())
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_stream_failed"
    assert error["request_id"] == r.headers["X-Request-ID"]


async def test_idle_timeout_mid_stream_ends_with_an_error_event(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(upstream_idle_timeout=1.0)
    fake_lmstudio.behaviour.chunks = 3
    fake_lmstudio.behaviour.chunk_delay = 3.0
    async with (
        aiohttp.ClientSession() as s,
        s.post(server.url + "/v1/chat/completions", json=CHAT, headers=auth_headers()) as r,
    ):
        events = sse_events(await r.read())
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "tok0 "
    assert json.loads(events[-1])["error"]["code"] == "upstream_timeout"
    await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 1.0)


async def test_a_stream_cut_inside_an_event_still_ends_with_a_readable_error(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    # The client asks for the usage itself, so nothing is hidden and the stream is relayed
    # byte for byte; LM Studio then goes silent in the middle of an event. The relay must end
    # that event before its error event, or an SSE parser reads the two as one broken event.
    server = await start_gateway(upstream_idle_timeout=1.0)
    fake_lmstudio.behaviour.chunks = 2
    fake_lmstudio.behaviour.unterminated_event_bytes = 100
    fake_lmstudio.behaviour.hold_open = 5.0
    body = {**CHAT, "stream_options": {"include_usage": True}}
    async with (
        aiohttp.ClientSession() as s,
        s.post(server.url + "/v1/chat/completions", json=body, headers=auth_headers()) as r,
    ):
        assert r.status == 200
        raw = await r.read()
    assert b"x" * 94 + b"\n\ndata: {" in raw  # the event ended, then the error
    # The OpenAI SDK's own SSE parser: the cut event is one event, the error its own one.
    events = [e.data for e in SSEDecoder().iter_bytes(iter([raw]))]
    assert events[-2] == "x" * 94
    error = json.loads(events[-1])["error"]
    assert (error["code"], error["param"]) == ("upstream_timeout", None)
    assert error["request_id"] == r.headers["X-Request-ID"]


async def test_idle_timeout_before_any_answer_is_504(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(upstream_idle_timeout=1.0)
    fake_lmstudio.behaviour.header_delay = 3.0
    async with (
        aiohttp.ClientSession() as s,
        s.post(server.url + "/v1/chat/completions", json=CHAT, headers=auth_headers()) as r,
    ):
        assert r.status == 504
        assert (await r.json())["error"]["code"] == "upstream_timeout"


async def test_upstream_error_for_a_stream_request_keeps_its_status(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    fake_lmstudio.behaviour.status = 404
    fake_lmstudio.behaviour.error_body = b'{"error": {"message": "model not found"}}'
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=auth_headers()) as r,
    ):
        assert r.status == 404
        # LM Studio's own error passes through as it was: its message, no code LM Gate made up.
        assert (await r.json())["error"] == {"message": "model not found"}


async def test_upstream_error_after_heartbeats_becomes_an_error_event(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(streaming_heartbeat_interval=0.1)
    fake_lmstudio.behaviour.header_delay = 0.35
    fake_lmstudio.behaviour.status = 500
    async with (
        aiohttp.ClientSession() as s,
        s.post(server.url + "/v1/chat/completions", json=CHAT, headers=auth_headers()) as r,
    ):
        assert r.status == 200  # committed by the heartbeats before LM Studio answered
        events = sse_events(await r.read())
    assert "fake error 500" in json.loads(events[-1])["error"]["message"]


class _CountingRelay:
    def __init__(self) -> None:
        self.beats = 0

    async def heartbeat(self) -> None:
        self.beats += 1


async def test_a_beat_due_just_as_the_pump_stops_writes_nothing() -> None:
    # The timer fires and queues the beat's task; the relay stops the pump (LM Studio just
    # answered with an error, say) before that task's first step. A beat written then would
    # commit the response as a 200 stream. asyncio runs ready callbacks in order, so this
    # test's next step comes before the beat task's first one.
    from tray_app.gateway.upstream.streaming import _HeartbeatPump

    relay = _CountingRelay()
    pump = _HeartbeatPump(relay, 0.001)  # type: ignore[arg-type]
    for _ in range(10_000):
        await asyncio.sleep(0)
        if pump._beat is not None:
            break
    assert pump._beat is not None, "the heartbeat timer never fired"
    await pump.stop()
    assert relay.beats == 0
    await asyncio.sleep(0.01)
    assert relay.beats == 0  # and no later beat either


async def test_the_pump_beats_until_stopped() -> None:
    from tray_app.gateway.upstream.streaming import _HeartbeatPump

    relay = _CountingRelay()
    pump = _HeartbeatPump(relay, 0.01)  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    await pump.stop()
    beats = relay.beats
    assert beats >= 3
    await asyncio.sleep(0.05)
    assert relay.beats == beats


class RelayRig:
    """A real aiohttp server whose one handler forwards a chat stream through Forwarder.post
    (and so a StreamRelay), keeping each request's Outcome for the test to reach the relay."""

    def __init__(self, fake: FakeLMStudio, **settings: Any) -> None:
        settings.setdefault("streaming_heartbeat_interval", 0.0)
        self.config = Config(upstream_url=fake.url, **settings)
        self.forwarder = Forwarder(self.config, lambda: False)
        self.outcomes: list[Outcome] = []
        self.hide_usage = False
        self.observer: Callable[[bytes], None] | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.cleanup_ctx.append(session_context(self.config))
        app.router.add_post("/stream", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/stream"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        outcome = Outcome()
        self.outcomes.append(outcome)
        body = {**CHAT}
        if self.hide_usage:
            body["stream_options"] = {"include_usage": True}  # what LM Gate adds
        return await self.forwarder.post(
            request,
            "req-relay-test",
            CHAT_ROUTE,
            json.dumps(body).encode(),
            stream=True,
            outcome=outcome,
            extra_headers=None,
            hide_usage=self.hide_usage,
            observer=self.observer,
        )

    @property
    def relay(self) -> StreamRelay:
        assert self.outcomes and self.outcomes[-1].relay is not None
        return self.outcomes[-1].relay


@pytest.fixture
async def relay_rig(fake_lmstudio: FakeLMStudio) -> AsyncIterator[Callable[..., Any]]:
    rigs: list[RelayRig] = []

    async def start(**settings: Any) -> RelayRig:
        rig = RelayRig(fake_lmstudio, **settings)
        await rig.start()
        rigs.append(rig)
        return rig

    yield start
    for rig in rigs:
        await rig.stop()


REVOKED = ("This credential was revoked; the stream was ended.", "invalid_request_error", "revoked")


def revoked() -> ApiError:
    message, kind, code = REVOKED
    return ApiError(401, message, type=kind, code=code)


async def _eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _fetch(url: str, answering: asyncio.Event) -> tuple[int, bytes]:
    """POST and read the whole stream; ``answering`` is set once the second token is in."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, timeout=aiohttp.ClientTimeout(total=10)) as r,
    ):
        body = b""
        async for chunk in r.content.iter_any():
            body += chunk
            if b"tok1" in body:
                answering.set()
        return r.status, body


class TestRelayAbort:
    """StreamRelay.abort (issue 12, item 17): called from another task while the relay awaits
    LM Studio, it closes LM Studio's side at once and ends the client's stream with the given
    error event, in every phase of the stream and on both relay loops."""

    @pytest.mark.parametrize("hide_usage", [False, True], ids=["plain", "whole-events"])
    @pytest.mark.parametrize(
        ("phase", "heartbeat"),
        [
            ("before-headers", 0.0),
            ("before-headers", 0.1),
            ("before-first-token", 0.0),
            ("before-first-token", 0.1),
            ("mid-stream", 0.0),
        ],
    )
    async def test_abort_ends_the_stream_with_its_error_and_closes_lm_studio(
        self,
        relay_rig: Callable[..., Any],
        fake_lmstudio: FakeLMStudio,
        phase: str,
        heartbeat: float,
        hide_usage: bool,
    ) -> None:
        rig = await relay_rig(streaming_heartbeat_interval=heartbeat)
        rig.hide_usage = hide_usage
        if phase == "before-headers":
            fake_lmstudio.behaviour.header_delay = 30
        elif phase == "before-first-token":
            fake_lmstudio.behaviour.first_chunk_delay = 30
        else:
            fake_lmstudio.behaviour.chunks = 1000
            fake_lmstudio.behaviour.chunk_delay = 0.05
        answering = asyncio.Event()
        request = asyncio.create_task(_fetch(rig.url, answering))
        if phase == "mid-stream":
            await asyncio.wait_for(answering.wait(), 5)
        else:
            await _eventually(lambda: bool(fake_lmstudio.received))
            await asyncio.sleep(0.3)  # LM Studio is "processing the prompt"
        aborted = time.monotonic()
        rig.relay.abort(revoked())
        status, body = await asyncio.wait_for(request, 5)
        assert status == 200
        events = sse_events(body)
        error = json.loads(events[-1])["error"]
        assert (error["message"], error["type"], error["code"]) == REVOKED
        assert error["param"] is None
        assert error["request_id"] == "req-relay-test"
        if phase == "mid-stream":
            assert json.loads(events[0])["choices"][0]["delta"]["content"] == "tok0 "
        else:
            assert len(events) == 1
        await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 1.0)
        assert fake_lmstudio.disconnects[0] - aborted < 1.0
        assert rig.relay.error == "revoked"
        assert rig.outcomes[-1].error == "revoked"

    async def test_abort_after_the_stream_ended_changes_nothing(
        self, relay_rig: Callable[..., Any], fake_lmstudio: FakeLMStudio
    ) -> None:
        rig = await relay_rig()
        async with aiohttp.ClientSession() as s, s.post(rig.url) as r:
            body = await r.read()
        await _eventually(lambda: rig.outcomes[-1].status == 200)
        rig.relay.abort(revoked())
        assert sse_events(body)[-1] == "[DONE]"
        assert rig.relay.error is None

    async def test_a_second_abort_is_ignored(
        self, relay_rig: Callable[..., Any], fake_lmstudio: FakeLMStudio
    ) -> None:
        rig = await relay_rig()
        fake_lmstudio.behaviour.first_chunk_delay = 30
        request = asyncio.create_task(_fetch(rig.url, asyncio.Event()))
        await _eventually(lambda: bool(rig.outcomes) and rig.outcomes[-1].upstream is not None)
        rig.relay.abort(revoked())
        rig.relay.abort(ApiError(500, "other", type="server_error", code="other"))
        events = sse_events((await asyncio.wait_for(request, 5))[1])
        assert len(events) == 1
        assert json.loads(events[0])["error"]["code"] == "revoked"


class TestObserverWithHiddenUsage:
    """The phone's /api/chat streams hide the usage LM Gate asks for and keep the answer
    through an observer: the observer sees exactly what the client sees, in whole events."""

    @pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
    @pytest.mark.parametrize("hide_usage", [True, False], ids=["usage-hidden", "usage-kept"])
    async def test_the_observer_sees_what_the_client_sees(
        self,
        relay_rig: Callable[..., Any],
        fake_lmstudio: FakeLMStudio,
        line_end: bytes,
        hide_usage: bool,
    ) -> None:
        rig = await relay_rig()
        seen: list[bytes] = []
        rig.observer = seen.append
        rig.hide_usage = hide_usage
        fake_lmstudio.behaviour.line_end = line_end
        fake_lmstudio.behaviour.chunks = 3
        fake_lmstudio.behaviour.chunk_delay = 0.05
        async with aiohttp.ClientSession() as s, s.post(rig.url) as r:
            body = await r.read()
        await _eventually(lambda: rig.outcomes[-1].status == 200)
        assert b"".join(seen) == body
        assert all(part.endswith(b"\n\n") for part in seen), "whole events only"
        events = [json.loads(e) for e in sse_events(body)[:-1]]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == (
            "tok0 tok1 tok2 "
        )
        assert not any("usage" in e for e in events)
        assert rig.outcomes[-1].usage == (Usage(7, 3) if hide_usage else None)

    async def test_an_endless_event_never_reaches_the_observer(
        self, relay_rig: Callable[..., Any], fake_lmstudio: FakeLMStudio
    ) -> None:
        rig = await relay_rig(limits_max_event_bytes=64 * 1024)
        seen: list[bytes] = []
        rig.observer = seen.append
        rig.hide_usage = True
        fake_lmstudio.behaviour.chunks = 2
        fake_lmstudio.behaviour.unterminated_event_bytes = 4 * 1024 * 1024
        async with aiohttp.ClientSession() as s, s.post(rig.url) as r:
            body = await r.read()
        assert sum(map(len, seen)) < 1024
        assert json.loads(sse_events(body)[-1])["error"]["code"] == "upstream_event_too_large"
        await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 1.0)


async def test_a_broken_stream_says_why_in_words(
    client: openai.AsyncOpenAI, fake_lmstudio: FakeLMStudio
) -> None:
    # It once named the exception's class ("ClientPayloadError"), which tells a user nothing.
    fake_lmstudio.behaviour.chunks = 10
    fake_lmstudio.behaviour.fail_after = 2
    stream = await client.chat.completions.create(**CHAT)
    with pytest.raises(openai.APIError) as caught:
        async with asyncio.timeout(5):
            async for _ in stream:
                pass
    assert caught.value.message == (
        "LM Studio's stream broke off (its answer arrived broken); the answer is incomplete."
    )
    assert caught.value.code == "upstream_stream_failed"
