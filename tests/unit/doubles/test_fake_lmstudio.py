"""The fake LM Studio is itself tested, so the gateway tests stand on something honest."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import sse_events


async def test_lists_models_and_records_requests(fake_lmstudio: FakeLMStudio) -> None:
    async with aiohttp.ClientSession() as s, s.get(fake_lmstudio.url + "/v1/models") as r:
        body = await r.json()
    assert [m["id"] for m in body["data"]] == list(MODELS)
    assert fake_lmstudio.paths == ["/v1/models"]


async def test_lists_no_model_when_none_is_loaded(fake_lmstudio: FakeLMStudio) -> None:
    fake_lmstudio.behaviour.models = ()
    async with aiohttp.ClientSession() as s, s.get(fake_lmstudio.url + "/v1/models") as r:
        body = await r.json()
    assert body == {"object": "list", "data": []}


async def test_streams_the_configured_chunks_then_done(fake_lmstudio: FakeLMStudio) -> None:
    fake_lmstudio.behaviour.chunks = 3
    payload = {
        "model": "m",
        "stream": True,
        "messages": [],
        "stream_options": {"include_usage": True},
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(fake_lmstudio.url + "/v1/chat/completions", json=payload) as r,
    ):
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await r.read())
    assert events[-1] == "[DONE]"
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:3]]
    assert contents == ["tok0 ", "tok1 ", "tok2 "]
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 3


async def test_fail_after_cuts_the_stream(fake_lmstudio: FakeLMStudio) -> None:
    fake_lmstudio.behaviour.fail_after = 2
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            fake_lmstudio.url + "/v1/chat/completions", json={"model": "m", "stream": True}
        ) as r,
    ):
        try:
            await r.read()
        except aiohttp.ClientPayloadError:
            pass
        else:
            raise AssertionError("the stream should have been cut")


async def test_notices_a_client_hanging_up(fake_lmstudio: FakeLMStudio) -> None:
    fake_lmstudio.behaviour.chunks = 100
    fake_lmstudio.behaviour.chunk_delay = 0.05
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            fake_lmstudio.url + "/v1/chat/completions", json={"model": "m", "stream": True}
        )
        await r.content.readany()
        r.close()
    await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 2)


async def test_unknown_paths_answer_200_like_lm_studio(fake_lmstudio: FakeLMStudio) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(fake_lmstudio.url + "/api/v1/models/load", json={}) as r,
    ):
        assert r.status == 200
    assert fake_lmstudio.paths == ["/api/v1/models/load"]
