"""The fake LM Studio is itself tested, so the gateway tests stand on something honest."""

from __future__ import annotations

import asyncio
import contextlib
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
        s.post(fake_lmstudio.url + "/api/v1/models/unload", json={}) as r,
    ):
        assert r.status == 200
    assert fake_lmstudio.paths == ["/api/v1/models/unload"]


# ---- LM Studio's memory: what the model guard is tested against -------------------------------

QWEN, LLAMA, EMBED = MODELS


async def _native_states(fake: FakeLMStudio) -> dict[str, str]:
    async with aiohttp.ClientSession() as s, s.get(fake.url + "/api/v0/models") as r:
        assert r.status == 200
        body = await r.json()
    return {entry["id"]: entry["state"] for entry in body["data"]}


async def _stream(fake: FakeLMStudio, model: str) -> bytes:
    payload = {"model": model, "stream": True, "messages": []}
    async with (
        aiohttp.ClientSession() as s,
        s.post(fake.url + "/v1/chat/completions", json=payload) as r,
    ):
        return await r.read()


async def _load(fake: FakeLMStudio, model: object) -> tuple[int, object]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(fake.url + "/api/v1/models/load", json={"model": model}) as r,
    ):
        return r.status, await r.json()


class TestNativeModelList:
    async def test_without_simulated_memory_every_listed_model_is_loaded(
        self, fake_lmstudio: FakeLMStudio
    ) -> None:
        assert await _native_states(fake_lmstudio) == dict.fromkeys(MODELS, "loaded")

    async def test_says_which_models_are_in_memory(self, fake_lmstudio: FakeLMStudio) -> None:
        fake_lmstudio.loaded = [LLAMA]
        states = await _native_states(fake_lmstudio)
        assert states == {QWEN: "not-loaded", LLAMA: "loaded", EMBED: "not-loaded"}

    async def test_entries_have_lm_studio_s_fields(self, fake_lmstudio: FakeLMStudio) -> None:
        async with (
            aiohttp.ClientSession() as s,
            s.get(fake_lmstudio.url + "/api/v0/models") as r,
        ):
            entries = (await r.json())["data"]
        assert {e["type"] for e in entries} == {"llm", "embeddings"}
        assert set(entries[0]) == {
            "id",
            "object",
            "type",
            "publisher",
            "arch",
            "compatibility_type",
            "quantization",
            "state",
            "max_context_length",
        }

    async def test_a_server_without_the_native_api_answers_404(
        self, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.behaviour.native_api = False
        async with aiohttp.ClientSession() as s:
            async with s.get(fake_lmstudio.url + "/api/v0/models") as r:
                assert r.status == 404
            async with s.post(fake_lmstudio.url + "/api/v1/models/load", json={"model": QWEN}) as r:
                assert r.status == 404
        assert not fake_lmstudio.loads


class TestLoading:
    async def test_a_load_takes_its_time_and_evicts_the_oldest(
        self, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        fake_lmstudio.behaviour.load_delay = 0.2
        started = asyncio.get_running_loop().time()
        status, body = await _load(fake_lmstudio, LLAMA)
        assert asyncio.get_running_loop().time() - started >= 0.2
        assert status == 200
        assert isinstance(body, dict) and body["model_instance_id"] == LLAMA
        assert body["load_time_seconds"] >= 0.2
        assert fake_lmstudio.loaded == [LLAMA]
        assert fake_lmstudio.evicted == [QWEN]
        assert fake_lmstudio.loads == {LLAMA: 1}

    async def test_room_for_two_evicts_only_past_two(self, fake_lmstudio: FakeLMStudio) -> None:
        fake_lmstudio.loaded = [QWEN]
        fake_lmstudio.behaviour.max_loaded = 2
        await _load(fake_lmstudio, LLAMA)
        assert fake_lmstudio.loaded == [QWEN, LLAMA] and not fake_lmstudio.evicted
        await _load(fake_lmstudio, EMBED)
        assert fake_lmstudio.loaded == [LLAMA, EMBED]
        assert fake_lmstudio.evicted == [QWEN]

    async def test_loading_a_loaded_model_counts_a_second_copy(
        self, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        await _load(fake_lmstudio, QWEN)
        assert fake_lmstudio.loaded == [QWEN] and not fake_lmstudio.evicted
        assert fake_lmstudio.loads == {QWEN: 1}

    async def test_without_simulated_memory_a_load_only_counts(
        self, fake_lmstudio: FakeLMStudio
    ) -> None:
        status, _ = await _load(fake_lmstudio, QWEN)
        assert status == 200 and fake_lmstudio.loads == {QWEN: 1}
        assert fake_lmstudio.loaded is None

    async def test_an_unknown_model_is_not_found(self, fake_lmstudio: FakeLMStudio) -> None:
        fake_lmstudio.loaded = []
        assert await _load(fake_lmstudio, "nope") == (
            404,
            {"error": {"message": "Model not found: nope"}},
        )
        assert (await _load(fake_lmstudio, 7))[0] == 404
        assert not fake_lmstudio.loads

    async def test_a_failing_load_says_why(self, fake_lmstudio: FakeLMStudio) -> None:
        fake_lmstudio.loaded = [QWEN]
        fake_lmstudio.behaviour.load_error = "not enough memory"
        assert await _load(fake_lmstudio, LLAMA) == (
            500,
            {"error": {"message": "not enough memory"}},
        )
        assert fake_lmstudio.loaded == [QWEN]
        assert fake_lmstudio.loads == {LLAMA: 1}

    async def test_a_load_goes_on_when_the_asker_leaves(self, fake_lmstudio: FakeLMStudio) -> None:
        fake_lmstudio.loaded = []
        fake_lmstudio.behaviour.load_delay = 0.3
        async with aiohttp.ClientSession() as s:
            try:
                async with s.post(
                    fake_lmstudio.url + "/api/v1/models/load",
                    json={"model": QWEN},
                    timeout=aiohttp.ClientTimeout(total=0.05),
                ):
                    pass
            except TimeoutError:
                pass
            else:
                raise AssertionError("the load should have outlasted the timeout")
        assert fake_lmstudio.loaded == []
        for _ in range(100):
            if fake_lmstudio.loaded:
                break
            await asyncio.sleep(0.02)
        assert fake_lmstudio.loaded == [QWEN]

    async def test_stop_ends_a_load_under_way(self) -> None:
        fake = FakeLMStudio()
        await fake.start()
        fake.loaded = []
        fake.behaviour.load_delay = 30
        loading = asyncio.ensure_future(_load(fake, QWEN))
        while not fake.loads:
            await asyncio.sleep(0.01)
        await fake.stop()
        with contextlib.suppress(aiohttp.ClientError):
            await loading
        assert fake.loaded == []


class TestJustInTimeLoading:
    async def test_a_request_for_an_unloaded_model_loads_it(
        self, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        fake_lmstudio.behaviour.load_delay = 0.1
        body = await _stream(fake_lmstudio, LLAMA)
        assert sse_events(body)[-1] == "[DONE]"
        assert fake_lmstudio.loaded == [LLAMA]
        assert fake_lmstudio.evicted == [QWEN]
        assert fake_lmstudio.loads == {LLAMA: 1}

    async def test_embeddings_load_their_model_too(self, fake_lmstudio: FakeLMStudio) -> None:
        fake_lmstudio.loaded = [QWEN]
        async with (
            aiohttp.ClientSession() as s,
            s.post(fake_lmstudio.url + "/v1/embeddings", json={"model": EMBED, "input": "x"}) as r,
        ):
            assert r.status == 200
        assert fake_lmstudio.loaded == [EMBED]

    async def test_a_request_for_a_loaded_model_loads_nothing(
        self, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        await _stream(fake_lmstudio, QWEN)
        assert not fake_lmstudio.loads and not fake_lmstudio.evicted

    async def test_an_unknown_model_is_refused_like_lm_studio(
        self, fake_lmstudio: FakeLMStudio
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        payload = {"model": "nope", "messages": []}
        async with (
            aiohttp.ClientSession() as s,
            s.post(fake_lmstudio.url + "/v1/chat/completions", json=payload) as r,
        ):
            assert r.status == 404
        async with (
            aiohttp.ClientSession() as s,
            s.post(fake_lmstudio.url + "/v1/embeddings", json={"model": "x", "input": "y"}) as r,
        ):
            assert r.status == 404
        assert fake_lmstudio.loaded == [QWEN]

    async def test_simultaneous_first_requests_load_it_twice(
        self, fake_lmstudio: FakeLMStudio
    ) -> None:
        """LM Studio's #1751: what the guard's single flight prevents."""
        fake_lmstudio.loaded = []
        fake_lmstudio.behaviour.load_delay = 0.1
        await asyncio.gather(_stream(fake_lmstudio, QWEN), _stream(fake_lmstudio, QWEN))
        assert fake_lmstudio.loads == {QWEN: 2}
        assert fake_lmstudio.loaded == [QWEN]

    async def test_an_eviction_cuts_off_the_evicted_model_s_streams(
        self, fake_lmstudio: FakeLMStudio
    ) -> None:
        """LM Studio's #671: another caller's request evicts the model mid-answer."""
        fake_lmstudio.loaded = [QWEN]
        fake_lmstudio.behaviour.chunks = 40
        fake_lmstudio.behaviour.chunk_delay = 0.02
        first = asyncio.ensure_future(_stream(fake_lmstudio, QWEN))
        while not fake_lmstudio.chunk_sent_at:
            await asyncio.sleep(0.01)
        fake_lmstudio.behaviour.chunks = 2
        await _stream(fake_lmstudio, LLAMA)
        try:
            await first
        except aiohttp.ClientPayloadError:
            pass
        else:
            raise AssertionError("the evicted model's stream should have been cut off")
        assert fake_lmstudio.streams_cut == [QWEN]
        assert fake_lmstudio.evicted == [QWEN]
        assert fake_lmstudio.disconnects == [], "the cut was LM Studio's, not the client's"

    async def test_a_stream_that_ended_is_not_cut(self, fake_lmstudio: FakeLMStudio) -> None:
        fake_lmstudio.loaded = [QWEN]
        await _stream(fake_lmstudio, QWEN)
        await _stream(fake_lmstudio, LLAMA)
        assert fake_lmstudio.evicted == [QWEN] and fake_lmstudio.streams_cut == []
