"""Streaming: chunk by chunk, no total timeout, heartbeats, hang-ups close LM Studio's side."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

from tests.conftest import CLIENT_KEY, GatewayFactory, auth_headers
from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import sse_events
from tray_app.server import GatewayServer

CHAT = {
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
    server = await start_gateway(heartbeat_interval=0.2)
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
    server = await start_gateway(heartbeat_interval=0.1)
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
    server = await start_gateway(heartbeat_interval=heartbeat)
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
    server = await start_gateway(heartbeat_interval=heartbeat)
    if phase == "before-headers":
        fake_lmstudio.behaviour.header_delay = 30
    else:
        fake_lmstudio.behaviour.first_chunk_delay = 30
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    body = json.dumps(CHAT).encode()
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
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
        assert (await r.json())["error"]["message"] == "model not found"


async def test_upstream_error_after_heartbeats_becomes_an_error_event(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(heartbeat_interval=0.1)
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
    from tray_app.streaming import _HeartbeatPump

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
    from tray_app.streaming import _HeartbeatPump

    relay = _CountingRelay()
    pump = _HeartbeatPump(relay, 0.01)  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    await pump.stop()
    beats = relay.beats
    assert beats >= 3
    await asyncio.sleep(0.05)
    assert relay.beats == beats
