"""The fake LM Studio's /v1/messages and /v1/responses answers are what the official SDKs
read: each SDK parses them, and finds the usage where its API puts it."""

from __future__ import annotations

import anthropic
import openai

from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.fake_lmstudio_apis import MESSAGES_INPUT, RESPONSES_INPUT, STORED_CONVERSATION

QWEN = MODELS[0]


async def test_a_messages_stream_is_anthropic_s_event_sequence(fake_lmstudio: FakeLMStudio) -> None:
    fake_lmstudio.behaviour.chunks = 3
    fake_lmstudio.behaviour.first_event_pieces = 3
    client = anthropic.AsyncAnthropic(base_url=fake_lmstudio.url, api_key="x", max_retries=0)
    async with (
        client,
        client.messages.stream(
            model=QWEN, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.content[0].type == "text" and final.content[0].text == "tok0 tok1 tok2 "
    assert (final.usage.input_tokens, final.usage.output_tokens) == (MESSAGES_INPUT, 3)


async def test_a_messages_answer_has_its_usage(fake_lmstudio: FakeLMStudio) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=fake_lmstudio.url, api_key="x", max_retries=0
    ) as client:
        reply = await client.messages.create(
            model=QWEN, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (MESSAGES_INPUT, 2)


async def test_a_responses_stream_ends_with_the_completed_response(
    fake_lmstudio: FakeLMStudio,
) -> None:
    fake_lmstudio.behaviour.chunks = 3
    async with openai.AsyncOpenAI(
        base_url=fake_lmstudio.url + "/v1", api_key="x", max_retries=0
    ) as client:
        stream = await client.responses.create(model=QWEN, input="hi", stream=True)
        events = [event async for event in stream]
    assert events[0].type == "response.created"
    last = events[-1]
    assert last.type == "response.completed"
    assert last.response.output_text == "tok0 tok1 tok2"
    assert last.response.usage is not None
    assert (last.response.usage.input_tokens, last.response.usage.output_tokens) == (
        RESPONSES_INPUT,
        3,
    )


async def test_a_chained_response_reads_the_stored_conversation(
    fake_lmstudio: FakeLMStudio,
) -> None:
    async with openai.AsyncOpenAI(
        base_url=fake_lmstudio.url + "/v1", api_key="x", max_retries=0
    ) as client:
        reply = await client.responses.create(
            model=QWEN, input="hi", max_output_tokens=2, previous_response_id="resp_1"
        )
    assert reply.usage is not None
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (
        RESPONSES_INPUT + STORED_CONVERSATION,
        2,
    )
