"""Lifecycle: the gateway runs inside another program's thread and stops gracefully."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import openai
import pytest

from tests.conftest import CLIENT_KEY, LMSTUDIO_TOKEN, auth_headers
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.fakes import StaticKeyAuthenticator
from tests.helpers import sse_events
from tray_app.config.settings import Config
from tray_app.control.loop_thread import LoopThread
from tray_app.gateway.app import Gateway
from tray_app.gateway.server.runner import GatewayServer
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore

CHAT = {"model": "m", "messages": [], "stream": True}


def test_gateway_runs_in_a_loop_thread_driven_from_the_main_thread() -> None:
    loop_thread = LoopThread()
    loop_thread.start()
    try:
        fake = FakeLMStudio()
        loop_thread.submit(fake.start()).result(5)
        config = Config(upstream_url=fake.url, server_port=0, streaming_heartbeat_interval=0)
        gateway = Gateway(
            config,
            StaticKeyAuthenticator(CLIENT_KEY),
            secrets=MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN}),
        )
        server = GatewayServer(gateway)
        loop_thread.submit(server.start()).result(5)
        assert loop_thread.loop is not None
        assert threading.current_thread() is threading.main_thread()
        # The synchronous client blocks this thread while the loop thread serves it.
        with openai.OpenAI(base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0) as c:
            assert [m.id for m in c.models.list().data] == list(MODELS)
            stream = c.chat.completions.create(model=MODELS[0], messages=[], stream=True)
            assert "".join(x.choices[0].delta.content or "" for x in stream if x.choices)
        loop_thread.submit(server.stop()).result(10)
        loop_thread.submit(fake.stop()).result(5)
    finally:
        loop_thread.stop()
    assert not any(t.name == "lmgate-loop" for t in threading.enumerate())


def test_loop_thread_cancels_leftover_tasks_on_stop() -> None:
    loop_thread = LoopThread()
    loop_thread.start()
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    future = loop_thread.submit(forever())
    time.sleep(0.05)
    loop_thread.stop(timeout=5)
    assert cancelled.is_set()
    assert future.cancelled()


async def test_stop_lets_a_running_stream_finish_within_the_grace(
    fake_lmstudio: FakeLMStudio,
) -> None:
    config = Config(
        upstream_url=fake_lmstudio.url,
        server_port=0,
        streaming_heartbeat_interval=0,
        server_shutdown_grace=5,
    )
    server = GatewayServer(
        Gateway(config, StaticKeyAuthenticator(CLIENT_KEY), secrets=MemorySecretStore())
    )
    await server.start()
    fake_lmstudio.behaviour.chunks = 10
    fake_lmstudio.behaviour.chunk_delay = 0.1
    async with aiohttp.ClientSession() as s:
        r = await s.post(server.url + "/v1/chat/completions", json=CHAT, headers=auth_headers())
        first = await r.content.readany()
        stopping = asyncio.create_task(server.stop())
        rest = await r.read()
        await stopping
    events = sse_events(first + rest)
    assert events[-1] == "[DONE]"
    assert len([e for e in events if "tok" in e]) == 10


async def test_stop_closes_streams_that_outlive_the_grace(fake_lmstudio: FakeLMStudio) -> None:
    config = Config(
        upstream_url=fake_lmstudio.url,
        server_port=0,
        streaming_heartbeat_interval=0,
        server_shutdown_grace=0.3,
    )
    server = GatewayServer(
        Gateway(config, StaticKeyAuthenticator(CLIENT_KEY), secrets=MemorySecretStore())
    )
    await server.start()
    fake_lmstudio.behaviour.chunks = 1000
    fake_lmstudio.behaviour.chunk_delay = 0.05
    async with aiohttp.ClientSession() as s:
        r = await s.post(server.url + "/v1/chat/completions", json=CHAT, headers=auth_headers())
        first = await r.content.readany()
        started = time.monotonic()
        stopping = asyncio.create_task(server.stop())
        rest = await asyncio.wait_for(r.read(), 5)
        await stopping
    assert time.monotonic() - started < 2.0
    last = json.loads(sse_events(first + rest)[-1])
    assert last["error"]["code"] == "shutting_down"
    await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 1.0)


@pytest.mark.parametrize("heartbeat", [0.0, 0.1], ids=["plain", "heartbeats-sent"])
async def test_stop_answers_a_request_still_waiting_for_lm_studio(
    fake_lmstudio: FakeLMStudio, heartbeat: float
) -> None:
    config = Config(
        upstream_url=fake_lmstudio.url,
        server_port=0,
        streaming_heartbeat_interval=heartbeat,
        server_shutdown_grace=0.3,
    )
    server = GatewayServer(
        Gateway(config, StaticKeyAuthenticator(CLIENT_KEY), secrets=MemorySecretStore())
    )
    await server.start()
    fake_lmstudio.behaviour.header_delay = 30
    async with aiohttp.ClientSession() as s:
        r = (
            await s.post(server.url + "/v1/chat/completions", json=CHAT, headers=auth_headers())
            if heartbeat
            else None
        )
        pending = (
            None
            if r
            else asyncio.create_task(
                s.post(
                    server.url + "/v1/chat/completions", json={"model": "m"}, headers=auth_headers()
                )
            )
        )
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 2.0
        if r is None:
            assert pending is not None
            r = await asyncio.wait_for(pending, 5)
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "shutting_down"
        else:
            events = sse_events(await r.read())
            assert json.loads(events[-1])["error"]["code"] == "shutting_down"
        r.release()
    await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 1.0)
