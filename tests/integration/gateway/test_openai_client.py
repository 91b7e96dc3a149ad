"""The official openai client, through the gateway, against the fake LM Studio."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import CLIENT_KEY, LMSTUDIO_TOKEN
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tray_app.gateway.server.runner import GatewayServer


async def test_lists_models(client: openai.AsyncOpenAI, fake_lmstudio: FakeLMStudio) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == list(MODELS)
    assert fake_lmstudio.paths == ["/v1/models"]


async def test_chat_completion(client: openai.AsyncOpenAI, fake_lmstudio: FakeLMStudio) -> None:
    fake_lmstudio.behaviour.chunks = 3
    reply = await client.chat.completions.create(
        model=MODELS[0], messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "tok0 tok1 tok2"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    sent = fake_lmstudio.received[0]
    assert sent.json()["messages"] == [{"role": "user", "content": "hi"}]
    # LM Studio gets the gateway's own token, never the caller's key.
    assert sent.headers["Authorization"] == f"Bearer {LMSTUDIO_TOKEN}"
    assert CLIENT_KEY not in str(sent.headers)


async def test_streamed_chat(client: openai.AsyncOpenAI, fake_lmstudio: FakeLMStudio) -> None:
    fake_lmstudio.behaviour.chunks = 20
    stream = await client.chat.completions.create(
        model=MODELS[0], messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "".join(f"tok{i} " for i in range(20))


async def test_completions(client: openai.AsyncOpenAI, fake_lmstudio: FakeLMStudio) -> None:
    reply = await client.completions.create(model=MODELS[1], prompt="Once upon")
    assert reply.model == MODELS[1]
    assert fake_lmstudio.paths == ["/v1/completions"]


async def test_embeddings(client: openai.AsyncOpenAI, fake_lmstudio: FakeLMStudio) -> None:
    result = await client.embeddings.create(model=MODELS[2], input=["a", "b"])
    assert [e.index for e in result.data] == [0, 1]
    assert result.data[0].embedding == pytest.approx([0.1, 0.2, 0.3])


async def test_wrong_key_is_an_authentication_error(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    async with openai.AsyncOpenAI(
        base_url=gateway.url + "/v1", api_key="lmg_wrong_key_123456", max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert fake_lmstudio.received == []
