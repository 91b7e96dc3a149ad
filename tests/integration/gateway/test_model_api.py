"""LM Studio's model API as the gateway reads it, and the model guard in front of the fake LM
Studio over real sockets: with the guard, another caller's first request for another model no
longer cuts off a running answer (LM Studio's #671), and simultaneous first requests load the
model once (#1751)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiohttp
import pytest

from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import sse_events
from tests.integration.gateway.test_probe import closed_port
from tray_app.clock import SystemClock
from tray_app.config.settings import ModelSwitch
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.upstream import model_api
from tray_app.gateway.upstream.model_api import (
    LMStudioModelApi,
    ModelStates,
    own_model_api,
)
from tray_app.gateway.upstream.model_guard import ModelGuard
from tray_app.gateway.upstream.probe import MODEL_LIST_MAX_BYTES

QWEN, LLAMA, EMBED = MODELS
TOKEN = "sk-lm-model-api"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def api_for(fake: FakeLMStudio, session: aiohttp.ClientSession, path: str = "") -> LMStudioModelApi:
    return LMStudioModelApi(fake.url + path, lambda: TOKEN, session)


async def failure(api_call: Coroutine[Any, Any, object]) -> ApiError:
    with pytest.raises(ApiError) as raised:
        await api_call
    return raised.value


class TestReadingWhatIsLoaded:
    async def test_reads_the_states_with_lm_studio_s_token(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        fake_lmstudio.behaviour.require_token = TOKEN
        states = await api_for(fake_lmstudio, session).loaded()
        assert states == ModelStates(frozenset(MODELS), frozenset({QWEN}))
        sent = fake_lmstudio.native[0]
        assert (sent.path, sent.headers["Authorization"]) == ("/api/v0/models", f"Bearer {TOKEN}")
        assert sent.headers["Accept-Encoding"] == "identity"

    async def test_the_token_is_read_at_each_call(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        tokens = iter([None, "sk-lm-new"])
        api = LMStudioModelApi(fake_lmstudio.url + "/", lambda: next(tokens), session)
        await api.loaded()
        await api.loaded()
        first, second = fake_lmstudio.native
        assert "Authorization" not in first.headers and first.path == "/api/v0/models"
        assert second.headers["Authorization"] == "Bearer sk-lm-new"

    async def test_a_refused_token_says_so(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.behaviour.require_token = "another"
        refused = await failure(api_for(fake_lmstudio, session).loaded())
        assert (refused.status, refused.code) == (502, "upstream_auth_failed")

    async def test_a_server_without_the_api_has_no_states(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.behaviour.native_api = False
        assert await api_for(fake_lmstudio, session).loaded() is None

    async def test_a_server_answering_every_path_with_200_has_no_states(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        # Under /old every path is the fake's catch-all, as on LM Studio before 0.3.6.
        assert await api_for(fake_lmstudio, session, "/old").loaded() is None

    async def test_a_failing_server_says_its_status(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.behaviour.status = 500  # the fake applies it under /v1/
        failed = await failure(api_for(fake_lmstudio, session, "/v1").loaded())
        assert (failed.status, failed.code) == (500, "upstream_error")

    async def test_nothing_listening_is_unreachable(self, session: aiohttp.ClientSession) -> None:
        url = f"http://127.0.0.1:{closed_port()}"
        failed = await failure(LMStudioModelApi(url, lambda: None, session).loaded())
        # Named for the owner's own commands (warm-up): the forwarder never relays it.
        assert failed.code == "upstream_unreachable" and url in failed.message

    async def test_a_hung_server_is_given_up_on(
        self,
        fake_lmstudio: FakeLMStudio,
        session: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(model_api, "MODEL_STATES_TIMEOUT", 0.1)
        fake_lmstudio.behaviour.native_delay = 1.0
        failed = await failure(api_for(fake_lmstudio, session).loaded())
        assert failed.code == "upstream_failed" and "no answer in time" in failed.message

    async def test_a_compressed_list_is_read(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.loaded = [LLAMA]
        fake_lmstudio.behaviour.compress = "gzip"
        states = await api_for(fake_lmstudio, session).loaded()
        assert states is not None and states.loaded == {LLAMA}

    async def test_a_list_just_within_the_bound_is_read(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.behaviour.json_bytes = MODEL_LIST_MAX_BYTES
        states = await api_for(fake_lmstudio, session).loaded()
        assert states is not None and states.downloaded == set(MODELS)

    async def test_a_list_past_the_bound_is_not_read(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.behaviour.json_bytes = MODEL_LIST_MAX_BYTES + 1
        failed = await failure(api_for(fake_lmstudio, session).loaded())
        assert failed.code == "upstream_response_too_large"


class TestLoading:
    async def test_loads_a_model(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        fake_lmstudio.behaviour.require_token = TOKEN
        await api_for(fake_lmstudio, session).load(LLAMA, 5)
        assert fake_lmstudio.loaded == [LLAMA]
        sent = fake_lmstudio.native[0]
        assert (sent.path, sent.json()) == ("/api/v1/models/load", {"model": LLAMA})
        assert sent.headers["Authorization"] == f"Bearer {TOKEN}"

    async def test_an_unknown_model_fails_in_lm_studio_s_words(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        failed = await failure(api_for(fake_lmstudio, session).load("nope", 5))
        assert (failed.status, failed.code) == (502, "model_load_failed")
        assert failed.message == "LM Studio could not load 'nope': Model not found: nope"

    async def test_a_failed_load_says_lm_studio_s_reason(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.behaviour.load_error = "not enough memory"
        failed = await failure(api_for(fake_lmstudio, session).load(LLAMA, 5))
        assert failed.message.endswith(": not enough memory")

    async def test_a_plain_text_failure_is_quoted(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.behaviour.status = 503  # the fake applies it under /v1/
        fake_lmstudio.behaviour.error_body = b"  busy loading  "
        fake_lmstudio.behaviour.error_content_type = "text/plain"
        failed = await failure(api_for(fake_lmstudio, session, "/v1").load(LLAMA, 5))
        assert failed.message.endswith(": busy loading")

    async def test_a_failure_without_words_says_its_status(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.behaviour.status = 503
        fake_lmstudio.behaviour.error_body = b'{"error": {"code": 7}}'
        failed = await failure(api_for(fake_lmstudio, session, "/v1").load(LLAMA, 5))
        assert failed.message.endswith(": it answered 503")

    async def test_an_error_as_a_bare_string_is_quoted(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.behaviour.status = 400
        fake_lmstudio.behaviour.error_body = b'{"error": "no such model"}'
        failed = await failure(api_for(fake_lmstudio, session, "/v1").load(LLAMA, 5))
        assert failed.message.endswith(": no such model")

    async def test_a_refused_token_says_so(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.behaviour.require_token = "another"
        refused = await failure(api_for(fake_lmstudio, session).load(LLAMA, 5))
        assert refused.code == "upstream_auth_failed"
        assert not fake_lmstudio.loads

    async def test_a_load_answered_by_a_catch_all_is_no_load(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        failed = await failure(api_for(fake_lmstudio, session, "/old").load(LLAMA, 5))
        assert failed.code == "model_load_failed" and "LM Studio 0.4 or newer" in failed.message

    @pytest.mark.parametrize(
        "answer", [b"OK", b'{"model_instance_id": 7}', b'{"a": "b"}' + b" " * 70_000]
    )
    async def test_a_200_that_is_not_a_load_result_is_no_load(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession, answer: bytes
    ) -> None:
        fake_lmstudio.behaviour.status = 200  # the fake applies it under /v1/
        fake_lmstudio.behaviour.error_body = answer
        failed = await failure(api_for(fake_lmstudio, session, "/v1").load(LLAMA, 5))
        assert failed.code == "model_load_failed" and "did not answer like" in failed.message

    async def test_a_load_past_its_time_is_given_up_on(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.loaded = []
        fake_lmstudio.behaviour.load_delay = 1.0
        failed = await failure(api_for(fake_lmstudio, session).load(LLAMA, 0.1))
        assert (failed.status, failed.code) == (504, "model_load_timeout")

    async def test_nothing_listening_fails_the_load(self, session: aiohttp.ClientSession) -> None:
        url = f"http://127.0.0.1:{closed_port()}"
        failed = await failure(LMStudioModelApi(url, lambda: None, session).load(LLAMA, 5))
        assert failed.code == "model_load_failed"
        assert "nothing accepts connections there" in failed.message

    async def test_a_command_gets_a_session_of_its_own(self, fake_lmstudio: FakeLMStudio) -> None:
        fake_lmstudio.loaded = []
        fake_lmstudio.behaviour.require_token = TOKEN
        async with own_model_api(fake_lmstudio.url, TOKEN) as api:
            await api.load(QWEN, 5)
            states = await api.loaded()
        assert states is not None and states.loaded == {QWEN}


# ---- the guard in front of the fake: what it is for -------------------------------------------


class TestALoadAnswerNestedTooDeep:
    """60,000 "[" make json.loads raise RecursionError, no ValueError: the load still fails
    with a catalogue error instead of the exception escaping the guard."""

    DEEP = b'{"usage":' + b"[" * 60_000

    async def test_as_a_failure_it_is_quoted_as_text(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        assert len(self.DEEP) <= model_api.LOAD_ANSWER_MAX_BYTES
        fake_lmstudio.behaviour.status = 503
        fake_lmstudio.behaviour.error_body = self.DEEP
        failed = await failure(api_for(fake_lmstudio, session, "/v1").load(LLAMA, 5))
        assert failed.code == "model_load_failed"
        assert failed.message.endswith(': {"usage":' + "[" * 191)

    async def test_as_a_200_it_is_no_load(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.behaviour.status = 200
        fake_lmstudio.behaviour.error_body = self.DEEP
        failed = await failure(api_for(fake_lmstudio, session, "/v1").load(LLAMA, 5))
        assert failed.code == "model_load_failed" and "did not answer like" in failed.message


async def answer(
    guard: ModelGuard, fake: FakeLMStudio, session: aiohttp.ClientSession, model: str
) -> list[str]:
    """One caller's streamed answer, entered and left as the gateway does."""
    use = await guard.enter(model, max_wait=10)
    try:
        payload = {"model": model, "stream": True, "messages": []}
        async with session.post(fake.url + "/v1/chat/completions", json=payload) as r:
            return sse_events(await r.read())
    finally:
        guard.leave(use)


class TestNoModelEvictedMidAnswer:
    async def test_a_first_request_for_another_model_waits_for_the_running_answer(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        fake_lmstudio.behaviour.chunks = 20
        fake_lmstudio.behaviour.chunk_delay = 0.02
        fake_lmstudio.behaviour.load_delay = 0.1
        guard = ModelGuard(
            api_for(fake_lmstudio, session),
            policy=ModelSwitch.WAIT,
            load_timeout=5,
            clock=SystemClock(),
        )
        running = asyncio.ensure_future(answer(guard, fake_lmstudio, session, QWEN))
        while not fake_lmstudio.chunk_sent_at:
            await asyncio.sleep(0.01)
        other = await answer(guard, fake_lmstudio, session, LLAMA)
        first = await running
        assert first[-1] == other[-1] == "[DONE]"
        assert fake_lmstudio.streams_cut == []
        assert fake_lmstudio.loads == {LLAMA: 1} and fake_lmstudio.evicted == [QWEN]
        assert guard.loaded_models() == {LLAMA}

    async def test_refuse_leaves_the_running_answer_alone(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        fake_lmstudio.behaviour.chunks = 10
        fake_lmstudio.behaviour.chunk_delay = 0.02
        guard = ModelGuard(
            api_for(fake_lmstudio, session),
            policy=ModelSwitch.REFUSE,
            load_timeout=5,
            clock=SystemClock(),
        )
        running = asyncio.ensure_future(answer(guard, fake_lmstudio, session, QWEN))
        while not fake_lmstudio.chunk_sent_at:
            await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as refused:
            await answer(guard, fake_lmstudio, session, LLAMA)
        assert refused.value.code == "model_busy"
        assert (await running)[-1] == "[DONE]"
        assert fake_lmstudio.streams_cut == [] and not fake_lmstudio.loads

    async def test_simultaneous_first_requests_load_the_model_once(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.loaded = []
        fake_lmstudio.behaviour.load_delay = 0.2
        guard = ModelGuard(
            api_for(fake_lmstudio, session),
            policy=ModelSwitch.WAIT,
            load_timeout=5,
            clock=SystemClock(),
        )
        answers = await asyncio.gather(
            *(answer(guard, fake_lmstudio, session, QWEN) for _ in range(8))
        )
        assert all(events[-1] == "[DONE]" for events in answers)
        assert fake_lmstudio.loads == {QWEN: 1}

    async def test_warm_up_loads_before_anyone_asks(
        self, fake_lmstudio: FakeLMStudio, session: aiohttp.ClientSession
    ) -> None:
        fake_lmstudio.loaded = [QWEN]
        fake_lmstudio.behaviour.load_delay = 0.2
        guard = ModelGuard(
            api_for(fake_lmstudio, session),
            policy=ModelSwitch.WAIT,
            load_timeout=5,
            clock=SystemClock(),
        )
        assert await guard.warm_up(EMBED) >= 0.2
        assert await guard.warm_up(EMBED) == 0.0
        assert fake_lmstudio.loaded == [EMBED] and fake_lmstudio.loads == {EMBED: 1}
