"""A budget is charged what LM Studio says a request used, on every endpoint and in every
answer shape, and reserves enough for what it cannot see: through the whole gateway over real
sockets, the fake LM Studio answering /v1/messages and /v1/responses as LM Studio does.

Each of these was a way past a budget: a /v1/messages stream settled with no prompt (its
input_tokens come only in the first event), a /v1/responses answer with no usage at all (it
is under ``response``), a prompt of token ids or a chat's earlier tool calls reserved as
nothing, a chained response reserved without the conversation LM Studio puts before it."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.fake_lmstudio_apis import MESSAGES_INPUT, RESPONSES_INPUT, STORED_CONVERSATION
from tests.helpers import sse_events
from tray_app.gateway.token_estimate import PREVIOUS_RESPONSE_TOKENS
from tray_app.storage.budgets import NO_BUDGET, Budget
from tray_app.storage.usage_history import Totals, UsageHistory, day_start

QWEN = MODELS[0]
# 18 characters: an estimate of ceil(18 / 4) + 4 = 9 prompt tokens, never what LM Studio says.
QUESTION = [{"role": "user", "content": "hello there friend"}]
ESTIMATE = 9
OUTPUT = 5


def key_with_budget(rig: IdentityRig, name: str, budget: Budget | None = None) -> str:
    return rig.identity.api_keys.create(
        name, scopes=frozenset({"chat", "models"}), budget=budget or NO_BUDGET
    )[0]


def used(rig: IdentityRig, name: str) -> Totals:
    (key,) = [k for k in rig.identity.api_keys.list() if k.name == name]
    rig.identity.recorder.flush()
    history = UsageHistory(rig.identity.db)
    return history.totals_since(key.principal_name, day_start(time.time()))


async def post(
    session: aiohttp.ClientSession, rig: IdentityRig, key: str, path: str, body: dict[str, Any]
) -> tuple[int, bytes]:
    async with session.post(
        rig.url + path, json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.read()


def refusal(status: int, body: bytes) -> str:
    assert status == 429, body
    error = json.loads(body)["error"]
    assert error["code"] == "budget_exceeded"
    message: str = error["message"]
    return message


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio) -> IdentityRig:
    fake_lmstudio.behaviour.chunks = 10
    return await start_identity_gateway(routes_enable_responses=True, routes_enable_messages=True)


MESSAGES = {"model": QWEN, "messages": QUESTION, "max_tokens": OUTPUT}
RESPONSES = {"model": QWEN, "input": "hello there friend", "max_output_tokens": OUTPUT}


class TestTheSettledUsageIsLMStudios:
    @pytest.mark.parametrize("pieces", [1, 2, 4])
    async def test_a_messages_stream_is_charged_its_input_tokens_from_its_first_event(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, pieces: int
    ) -> None:
        # The first event in several reads (a slow network) is still read whole.
        fake_lmstudio.behaviour.first_event_pieces = pieces
        key = key_with_budget(rig, "friend", Budget(tokens_per_day=1000))
        async with aiohttp.ClientSession() as session:
            status, body = await post(
                session, rig, key, "/v1/messages", {**MESSAGES, "stream": True}
            )
        assert status == 200
        assert json.loads(sse_events(body)[0])["type"] == "message_start"
        assert used(rig, "friend") == Totals(1, MESSAGES_INPUT, OUTPUT)

    async def test_a_messages_answer_is_charged_its_usage(self, rig: IdentityRig) -> None:
        key = key_with_budget(rig, "friend", Budget(tokens_per_day=1000))
        async with aiohttp.ClientSession() as session:
            status, _ = await post(session, rig, key, "/v1/messages", MESSAGES)
        assert status == 200
        assert used(rig, "friend") == Totals(1, MESSAGES_INPUT, OUTPUT)

    @pytest.mark.parametrize("stream", [True, False])
    async def test_a_response_is_charged_its_usage(self, rig: IdentityRig, stream: bool) -> None:
        key = key_with_budget(rig, "friend", Budget(tokens_per_day=1000))
        async with aiohttp.ClientSession() as session:
            status, _ = await post(
                session, rig, key, "/v1/responses", {**RESPONSES, "stream": stream}
            )
        assert status == 200
        assert used(rig, "friend") == Totals(1, RESPONSES_INPUT, OUTPUT)

    async def test_a_budget_without_room_for_what_was_really_used_refuses_the_next(
        self, rig: IdentityRig
    ) -> None:
        # 28 really used of 40: the next stream's 9 + 5 no longer fits (it would at 0 + 5).
        key = key_with_budget(rig, "friend", Budget(tokens_per_day=40))
        stream = {**MESSAGES, "stream": True}
        async with aiohttp.ClientSession() as session:
            assert (await post(session, rig, key, "/v1/messages", stream))[0] == 200
            message = refusal(*await post(session, rig, key, "/v1/messages", stream))
        assert f"{40 - MESSAGES_INPUT - OUTPUT} of your 40" in message


class TestAChainedResponse:
    async def test_is_charged_the_stored_conversation_lm_studio_read(
        self, rig: IdentityRig
    ) -> None:
        key = key_with_budget(rig, "friend", Budget(tokens_per_day=100_000))
        chained = {**RESPONSES, "previous_response_id": "resp_fake", "stream": True}
        async with aiohttp.ClientSession() as session:
            assert (await post(session, rig, key, "/v1/responses", chained))[0] == 200
        assert used(rig, "friend") == Totals(1, RESPONSES_INPUT + STORED_CONVERSATION, OUTPUT)

    async def test_reserves_room_for_that_conversation(self, rig: IdentityRig) -> None:
        # "hello there friend": an estimate of 5; chained, PREVIOUS_RESPONSE_TOKENS more.
        needed = 5 + PREVIOUS_RESPONSE_TOKENS + OUTPUT
        chained = {**RESPONSES, "previous_response_id": "resp_fake"}
        short = key_with_budget(rig, "short", Budget(tokens_per_day=needed - 1))
        enough = key_with_budget(rig, "enough", Budget(tokens_per_day=needed))
        async with aiohttp.ClientSession() as session:
            # Unchained, the short budget has room.
            assert (await post(session, rig, short, "/v1/responses", RESPONSES))[0] == 200
            message = refusal(*await post(session, rig, short, "/v1/responses", chained))
            assert f"about {needed:,} tokens" in message
            assert (await post(session, rig, enough, "/v1/responses", chained))[0] == 200


class TestWhatTheEstimateReserves:
    """A request whose prompt the estimate undercounted could be admitted past the budget's
    edge; each is refused one token short of its estimate and admitted at it."""

    @pytest.mark.parametrize(
        ("path", "body", "estimate"),
        [
            ("/v1/completions", {"prompt": list(range(400))}, 400),
            ("/v1/completions", {"prompt": [list(range(300)), list(range(100))]}, 400),
            (
                "/v1/chat/completions",
                {
                    "messages": [
                        *QUESTION,
                        {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "id": "call_1",
                                    "type": "function",
                                    "function": {"name": "read", "arguments": "x" * 396},
                                }
                            ],
                        },
                    ]
                },
                # 18 + 4 + 396 characters = 105 tokens, and two messages' framing.
                105 + 8,
            ),
            (
                "/v1/responses",
                {"input": "x" * 40, "tools": [{"type": "function", "name": "t" * 360}]},
                -(-(40 + len(json.dumps([{"type": "function", "name": "t" * 360}]))) // 4),
            ),
        ],
        ids=["token-ids", "token-id-lists", "chat-tool-calls", "responses-tools"],
    )
    async def test_the_prompt_is_reserved(
        self, rig: IdentityRig, path: str, body: dict[str, Any], estimate: int
    ) -> None:
        cap = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
        request = {"model": QWEN, **body, cap: OUTPUT}
        short = key_with_budget(rig, "short", Budget(tokens_per_day=estimate + OUTPUT - 1))
        enough = key_with_budget(rig, "enough", Budget(tokens_per_day=estimate + OUTPUT))
        async with aiohttp.ClientSession() as session:
            message = refusal(*await post(session, rig, short, path, request))
            assert f"about {estimate + OUTPUT:,} tokens" in message
            assert (await post(session, rig, enough, path, request))[0] == 200


class TestTheRefusalSaysWhatFits:
    async def test_a_cap_too_large_is_told_the_largest_that_fits(self, rig: IdentityRig) -> None:
        key = key_with_budget(rig, "friend", Budget(tokens_per_day=100))
        chat = {"model": QWEN, "messages": QUESTION}
        fits = 100 - ESTIMATE
        async with aiohttp.ClientSession() as session:
            message = refusal(
                *await post(session, rig, key, "/v1/chat/completions", {**chat, "max_tokens": 200})
            )
            assert f"lower max_tokens (or max_output_tokens) to {fits} or less" in message
            assert "resets at" in message
            too_many = {**chat, "max_tokens": fits + 1}
            message = refusal(*await post(session, rig, key, "/v1/chat/completions", too_many))
            assert f"to {fits} or less" in message
            just = {**chat, "max_tokens": fits}
            assert (await post(session, rig, key, "/v1/chat/completions", just))[0] == 200

    async def test_a_used_up_budget_offers_no_smaller_cap(self, rig: IdentityRig) -> None:
        key = key_with_budget(rig, "friend", Budget(tokens_per_day=ESTIMATE))
        chat = {"model": QWEN, "messages": QUESTION, "max_tokens": 1}
        async with aiohttp.ClientSession() as session:
            message = refusal(*await post(session, rig, key, "/v1/chat/completions", chat))
        assert "lower max_tokens" not in message and "resets at" in message
