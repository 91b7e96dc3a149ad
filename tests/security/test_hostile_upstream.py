"""A hostile or broken LM Studio (issue 12, defect 11): valid SSE with CRLF or CR line ends,
an event larger than limits.max_event_bytes, one that never ends, compression bombs. The
gateway relays event by event, holds no more than its limits, answers in the OpenAI error
shape and stays healthy. All through real sockets, with the fake LM Studio sending each shape.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import resource
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import CLIENT_KEY, GatewayFactory, IdentityFactory, auth_headers
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import FixedPrincipalAuthenticator, LogCapture, sse_events
from tray_app.gateway.server.runner import GatewayServer
from tray_app.gateway.upstream.usage import EventCutter, Usage
from tray_app.identity.principal import ALL_SCOPES, Principal

MIB = 1024 * 1024
# Both a request body and the OpenAI client's keyword arguments.
CHAT: dict[str, Any] = {
    "model": MODELS[0],
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}
LINE_ENDS = pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])


async def identity_server(start: IdentityFactory, **settings: Any) -> tuple[GatewayServer, str]:
    """A gateway that counts usage, so it asks LM Studio for it and hides it from clients
    that did not ask: the path that relays whole events."""
    rig = await start(**settings)
    key, _ = rig.identity.api_keys.create("hostile", scopes=frozenset({"chat", "models"}))
    return rig.server, key


async def read_stream(server: GatewayServer, key: str, **extra: Any) -> tuple[list[str], str]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            server.url + "/v1/chat/completions",
            json={**CHAT, **extra},
            headers=auth_headers(key),
            timeout=aiohttp.ClientTimeout(total=10),
        ) as r,
    ):
        assert r.status == 200
        return sse_events(await r.read()), r.headers["X-Request-ID"]


async def assert_healthy(server: GatewayServer, key: str) -> None:
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, s.get(server.url + "/healthz") as r:
        assert r.status == 200
    assert time.monotonic() - started < 1.0
    async with openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key=key, max_retries=0
    ) as client:
        answer = await client.chat.completions.create(
            model=MODELS[0], messages=[{"role": "user", "content": "still there?"}]
        )
    assert answer.choices[0].message.content


def assert_event_too_large(events: list[str], request_id: str) -> None:
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_event_too_large"
    assert error["type"] == "upstream_error"
    assert error["param"] is None
    assert "limits.max_event_bytes" in error["message"]
    assert error["request_id"] == request_id


class TestSseLineEnds:
    """Every valid SSE line end is relayed event by event, whether LM Gate hides the usage
    it asked for (whole events) or the client asked for it (plain relay)."""

    @LINE_ENDS
    @pytest.mark.parametrize("usage", ["hidden", "asked"])
    async def test_each_event_arrives_as_it_is_produced(
        self,
        start_identity_gateway: IdentityFactory,
        fake_lmstudio: FakeLMStudio,
        line_end: bytes,
        usage: str,
    ) -> None:
        server, key = await identity_server(start_identity_gateway)
        fake_lmstudio.behaviour.line_end = line_end
        fake_lmstudio.behaviour.chunks = 4
        fake_lmstudio.behaviour.chunk_delay = 0.3
        extra: dict[str, Any] = {}
        if usage == "asked":
            extra["stream_options"] = {"include_usage": True}
        arrived: list[float] = []
        chunks = []
        with LogCapture() as logs:
            async with openai.AsyncOpenAI(
                base_url=server.url + "/v1", api_key=key, max_retries=0
            ) as client:
                stream = await client.chat.completions.create(**CHAT, **extra)
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        arrived.append(time.monotonic())
                    chunks.append(chunk)
            await eventually(lambda: bool(logs.access()))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "tok0 tok1 tok2 tok3 "
        # The first event reaches the client right after LM Studio wrote it, long before
        # the stream ends (0.9 s later).
        sent = fake_lmstudio.chunk_sent_at
        assert arrived[0] - sent[0] < 0.15
        assert arrived[0] < sent[-1]
        with_usage = [c for c in chunks if c.usage is not None]
        assert len(with_usage) == (1 if usage == "asked" else 0)
        (line,) = logs.access()
        assert (line["prompt_tokens"], line["completion_tokens"]) == (7, 4)


class TestEventSizeLimit:
    """limits.max_event_bytes on both sides, for an event that arrives whole and for one
    that never ends; LM Studio's side is closed when the limit is crossed."""

    LIMIT = 64 * 1024

    @pytest.mark.parametrize(
        ("size", "allowed"), [(LIMIT, True), (LIMIT + 1, False)], ids=["at-limit", "over"]
    )
    async def test_an_event_at_the_limit_passes_and_one_byte_more_ends_the_stream(
        self,
        start_identity_gateway: IdentityFactory,
        fake_lmstudio: FakeLMStudio,
        size: int,
        allowed: bool,
    ) -> None:
        server, key = await identity_server(
            start_identity_gateway, limits_max_event_bytes=self.LIMIT
        )
        fake_lmstudio.behaviour.event_bytes = size
        fake_lmstudio.behaviour.chunks = 3
        fake_lmstudio.behaviour.chunk_delay = 0.5  # still generating when the limit is hit
        events, request_id = await read_stream(server, key)
        if allowed:
            first = json.loads(events[0])
            assert len(b"data: " + events[0].encode() + b"\n\n") == size
            assert first["choices"][0]["delta"]["content"] == "tok0 "
            assert events[-1] == "[DONE]"
        else:
            assert len(events) == 1, "nothing of the oversized event may reach the client"
            assert_event_too_large(events, request_id)
            await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 1.0)
        await assert_healthy(server, key)

    @pytest.mark.parametrize(
        ("size", "allowed"),
        [(LIMIT - 1, True), (LIMIT, False), (4 * MIB, False)],
        ids=["just-under", "at-limit", "4MiB"],
    )
    async def test_an_event_that_never_ends_is_cut_at_the_limit(
        self,
        start_identity_gateway: IdentityFactory,
        fake_lmstudio: FakeLMStudio,
        size: int,
        allowed: bool,
    ) -> None:
        # Unfinished, an event of LIMIT - 1 bytes may still become one of LIMIT with its
        # line end; LIMIT bytes with no end yet can only become larger.
        server, key = await identity_server(
            start_identity_gateway, limits_max_event_bytes=self.LIMIT
        )
        fake_lmstudio.behaviour.chunks = 2
        fake_lmstudio.behaviour.unterminated_event_bytes = size
        fake_lmstudio.behaviour.hold_open = 1.5 if allowed else 30.0
        started = time.monotonic()
        events, request_id = await read_stream(server, key)
        assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == [
            "tok0 ",
            "tok1 ",
        ]
        if allowed:
            # Held until LM Studio ended the stream, then relayed as it was.
            assert events[2] == "x" * (size - len("data: "))
            assert not fake_lmstudio.disconnects
        else:
            assert len(events) == 3
            assert_event_too_large(events, request_id)
            assert time.monotonic() - started < 1.0, "the stream must end at the limit"
            await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 1.0)
        await assert_healthy(server, key)

    async def test_memory_stays_bounded_while_lm_studio_sends_an_endless_event(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        server, key = await identity_server(start_identity_gateway)  # max_event_bytes 1 MiB
        fake_lmstudio.behaviour.chunks = 1
        fake_lmstudio.behaviour.unterminated_event_bytes = 64 * MIB
        async with RssSampler() as rss:
            events, request_id = await read_stream(server, key)
        assert_event_too_large(events, request_id)
        assert rss.growth < 24 * MIB, f"RSS grew by {rss.growth / MIB:.0f} MiB"
        await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 1.0)
        await assert_healthy(server, key)


class RssSampler:
    """The largest growth of this process's resident memory (gateway and fake share it)
    while the block runs. Linux: sampled from /proc; elsewhere: the peak, which can only
    understate growth."""

    def __init__(self) -> None:
        self.growth = 0
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _now() -> int:
        if os.path.exists("/proc/self/statm"):
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

    async def _sample(self, baseline: int) -> None:
        while True:
            self.growth = max(self.growth, self._now() - baseline)
            await asyncio.sleep(0.002)

    async def __aenter__(self) -> RssSampler:
        self._baseline = self._now()
        self._task = asyncio.get_running_loop().create_task(self._sample(self._baseline))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.growth = max(self.growth, self._now() - self._baseline)


BOMB_LIMIT = 256 * 1024  # limits.max_response_bytes for these tests


@pytest.fixture
async def restricted_gateway(start_gateway: GatewayFactory) -> GatewayServer:
    # A models-restricted principal: its model list is decoded to be filtered.
    principal = Principal("p", ALL_SCOPES, models=frozenset({MODELS[0]}))
    return await start_gateway(
        authenticator=FixedPrincipalAuthenticator(CLIENT_KEY, principal),
        limits_max_response_bytes=BOMB_LIMIT,
    )


Call = Callable[[aiohttp.ClientSession, str], Awaitable[tuple[int, bytes, dict[str, str]]]]


async def _models(s: aiohttp.ClientSession, url: str) -> tuple[int, bytes, dict[str, str]]:
    async with s.get(url + "/v1/models", headers=auth_headers()) as r:
        return r.status, await r.read(), dict(r.headers)


async def _chat(s: aiohttp.ClientSession, url: str) -> tuple[int, bytes, dict[str, str]]:
    body = {**CHAT, "stream": False}
    async with s.post(url + "/v1/chat/completions", json=body, headers=auth_headers()) as r:
        return r.status, await r.read(), dict(r.headers)


def _decoded(body: bytes, encoding: str | None) -> Any:
    if encoding == "gzip":
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    return json.loads(body)


class TestCompressionBombs:
    """A compressed answer LM Gate must read is decoded to at most max_response_bytes, on
    every endpoint where it decodes (the filtered model list, usage of a JSON answer)."""

    @pytest.mark.parametrize("encoding", ["gzip", "deflate"])
    @pytest.mark.parametrize("call", [_models, _chat], ids=["models", "chat"])
    @pytest.mark.parametrize(
        ("decoded_size", "allowed"),
        [(BOMB_LIMIT, True), (BOMB_LIMIT + 1, False), (64 * MIB, False)],
        ids=["at-limit", "over", "bomb-64MiB"],
    )
    async def test_decoding_stops_at_the_response_limit(
        self,
        restricted_gateway: GatewayServer,
        fake_lmstudio: FakeLMStudio,
        encoding: str,
        call: Call,
        decoded_size: int,
        allowed: bool,
    ) -> None:
        fake_lmstudio.behaviour.compress = encoding
        fake_lmstudio.behaviour.json_bytes = decoded_size
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with RssSampler() as rss:
                status, body, headers = await call(s, restricted_gateway.url)
            if allowed:
                assert status == 200
                payload = _decoded(body, headers.get("Content-Encoding"))
                if call is _models:
                    assert [m["id"] for m in payload["data"]] == [MODELS[0]]
                else:
                    assert payload["object"] == "chat.completion"
            else:
                assert status == 502
                error = json.loads(body)["error"]
                assert error["code"] == "upstream_response_too_large"
                assert error["type"] == "upstream_error"
                assert error["param"] is None
                assert error["request_id"] == headers["X-Request-ID"]
                assert rss.growth < 32 * MIB, f"RSS grew by {rss.growth / MIB:.0f} MiB"
            fake_lmstudio.behaviour.compress = None
            fake_lmstudio.behaviour.json_bytes = None
            assert (await call(s, restricted_gateway.url))[0] == 200  # and it serves on


class TestAbortedStreamsAreLogged:
    """Defect 9 (part): a client that hangs up mid-stream is logged with what it was sent."""

    @pytest.mark.parametrize("path", ["plain", "whole-events"])
    async def test_bytes_sent_before_the_hang_up_are_logged(
        self,
        start_gateway: GatewayFactory,
        start_identity_gateway: IdentityFactory,
        fake_lmstudio: FakeLMStudio,
        path: str,
    ) -> None:
        if path == "plain":
            server, key = await start_gateway(), CLIENT_KEY
        else:
            server, key = await identity_server(start_identity_gateway)
        fake_lmstudio.behaviour.chunks = 1000
        fake_lmstudio.behaviour.chunk_delay = 0.02
        with LogCapture() as logs:
            async with aiohttp.ClientSession() as s:
                r = await s.post(
                    server.url + "/v1/chat/completions", json=CHAT, headers=auth_headers(key)
                )
                received = 0
                while received < 1000:
                    received += len(await r.content.readany())
                r.close()
            await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 2.0)
            await eventually(lambda: bool(logs.access()))
        (line,) = logs.access()
        assert line["status"] == 499
        assert line["error"] == "client_disconnected"
        assert line["stream"] is True
        assert line["bytes_out"] >= received


async def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _stream_bytes(eol: bytes) -> bytes:
    events = [
        b'data: {"choices": [{"delta": {"content": "a"}}]}',
        b'data: {"choices": [{"delta": {"content": "b"}}]}',
        b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}',
        b"data: [DONE]",
    ]
    return b"".join(event + eol + eol for event in events)


EXPECTED = (
    b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
    b'data: {"choices": [{"delta": {"content": "b"}}]}\n\n'
    b"data: [DONE]\n\n"
)


class TestEventCutter:
    """The cutting on its own, for the splits a socket cannot be made to produce: a line
    end torn between two reads (CR, then LF) at every position, and both ways an event can
    cross the size limit (unfinished in the buffer, or finished within one read)."""

    @LINE_ENDS
    def test_every_split_into_two_reads_gives_the_same_events(self, line_end: bytes) -> None:
        data = _stream_bytes(line_end)
        for at in range(len(data) + 1):
            cutter = EventCutter(1024, hide_usage=True)
            out = cutter.feed(data[:at]) + cutter.feed(data[at:]) + cutter.rest()
            assert out == EXPECTED, at
            assert cutter.usage == Usage(7, 2)

    @LINE_ENDS
    def test_one_byte_at_a_time_gives_the_same_events(self, line_end: bytes) -> None:
        data = _stream_bytes(line_end)
        cutter = EventCutter(1024, hide_usage=True)
        out = b"".join(cutter.feed(data[i : i + 1]) for i in range(len(data)))
        assert out + cutter.rest() == EXPECTED

    @pytest.mark.parametrize("arrival", ["one-read", "byte-by-byte"])
    @pytest.mark.parametrize(("size", "allowed"), [(1024, True), (1025, False)])
    def test_the_limit_holds_however_the_event_arrives(
        self, arrival: str, size: int, allowed: bool
    ) -> None:
        small = b"data: {}\n\n"
        big = b"data: " + b"x" * (size - 8) + b"\n\n"
        assert len(big) == size
        data = small + big + small
        cutter = EventCutter(1024, hide_usage=False)
        if arrival == "one-read":
            out = cutter.feed(data)
        else:
            out = b"".join(cutter.feed(data[i : i + 1]) for i in range(len(data)))
        assert cutter.too_large is not allowed
        assert out == (data if allowed else small), "events before the big one still go out"
