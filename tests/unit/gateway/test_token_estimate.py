"""The count_tokens estimate: every piece of text the model reads, at four characters a
token, plus framing per message and a flat amount per image."""

from __future__ import annotations

import json

import pytest

from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.token_estimate import (
    PREVIOUS_RESPONSE_TOKENS,
    TOKENS_PER_IMAGE,
    TOKENS_PER_MESSAGE,
    estimate_input_tokens,
    estimate_prompt_tokens,
)


def test_plain_text_is_four_characters_a_token_rounded_up() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 9}]}
    assert estimate_input_tokens(body) == 3 + TOKENS_PER_MESSAGE


def test_every_kind_of_content_counts() -> None:
    tool_input = {"path": "a.txt"}
    tools = [{"name": "read", "description": "reads", "input_schema": {"type": "object"}}]
    body = {
        "system": [{"type": "text", "text": "s" * 8}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "u" * 4}, {"type": "image"}]},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "name": "read", "input": tool_input}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "content": [{"type": "text", "text": "r"}]}],
            },
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}]},
            "odd",
            {"role": "user", "content": 5},
        ],
        "tools": tools,
    }
    chars = (
        8
        + 4
        + len("read")
        + len(json.dumps(tool_input))
        + 1
        + len(json.dumps({"type": "thinking", "thinking": "t"}))
        + 3
        + len(json.dumps(tools))
    )
    expected = -(-chars // 4) + TOKENS_PER_MESSAGE * 6 + TOKENS_PER_IMAGE
    assert estimate_input_tokens(body) == expected


@pytest.mark.parametrize("kind", [{}, [], ["image"], {"image": 1}, 3, None, True])
def test_a_block_whose_type_is_no_string_is_counted_whole(kind: object) -> None:
    # An unhashable type once raised TypeError here (a 500 for every budgeted caller).
    block = {"type": kind, "text": "x" * 40}
    body = {"messages": [{"role": "user", "content": [block]}]}
    chars = len(json.dumps(block, ensure_ascii=False))
    assert estimate_input_tokens(body) == -(-chars // 4) + TOKENS_PER_MESSAGE


@pytest.mark.parametrize("messages", [None, "hi", {"role": "user"}])
def test_messages_must_be_a_list(messages: object) -> None:
    with pytest.raises(ApiError) as refused:
        estimate_input_tokens({"messages": messages} if messages is not None else {})
    assert (refused.value.status, refused.value.code, refused.value.param) == (
        400,
        "invalid_messages",
        "messages",
    )


# ---- a generation's reservation: every field the model reads, on every endpoint's shape ----

TEXT = "x" * 40  # 10 tokens
TOOLS = [{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]
TOOLS_TOKENS = -(-len(json.dumps(TOOLS)) // 4)


class TestThePromptAReservationCounts:
    """Each way of giving a prompt, on each endpoint that takes it: what the estimate missed
    a caller could send past its budget."""

    @pytest.mark.parametrize("field", ["prompt", "input"])
    @pytest.mark.parametrize(
        ("value", "tokens"),
        [
            (TEXT, 10),
            ([TEXT, TEXT], 20),
            (list(range(7)), 7),  # token ids: one token each
            ([list(range(3)), list(range(4))], 7),  # a batch of token-id prompts
            ([], 0),
            ([[]], 0),
            ([1, [2, 3]], 3),  # mixed: every id counts once
        ],
        ids=["text", "texts", "ids", "id-lists", "empty", "empty-list", "mixed"],
    )
    def test_a_prompt_or_input_of_text_or_token_ids(
        self, field: str, value: object, tokens: int
    ) -> None:
        assert estimate_prompt_tokens({field: value}) == tokens

    def test_ids_that_are_not_ints_are_not_ids(self) -> None:
        # True is an int to Python but no token id; strings inside a list are text.
        assert estimate_prompt_tokens({"prompt": [True, 1.5, [False, "abcd"]]}) == 1
        assert estimate_prompt_tokens({"prompt": 5}) == 0

    def test_instructions_and_input_add_up(self) -> None:
        assert estimate_prompt_tokens({"instructions": TEXT, "input": list(range(3))}) == 13

    @pytest.mark.parametrize(
        "body",
        [
            {"messages": [{"role": "user", "content": TEXT}]},
            {"input": TEXT},
            {"prompt": TEXT},
        ],
        ids=["chat", "responses", "completions"],
    )
    def test_tools_count_on_every_shape(self, body: dict[str, object]) -> None:
        bare = estimate_prompt_tokens(body)
        with_tools = estimate_prompt_tokens({**body, "tools": TOOLS})
        # Counted together with the text they are rounded with: within a token of the sum.
        assert with_tools - bare in {TOOLS_TOKENS, TOOLS_TOKENS + 1}
        assert estimate_prompt_tokens({**body, "tools": "not a list"}) == bare

    @pytest.mark.parametrize(
        "body",
        [{"input": TEXT}, {"messages": [{"role": "user", "content": TEXT}]}],
        ids=["responses", "messages"],
    )
    def test_a_chained_request_reserves_the_stored_conversation(
        self, body: dict[str, object]
    ) -> None:
        bare = estimate_prompt_tokens(body)
        chained = {**body, "previous_response_id": "resp_1"}
        assert estimate_prompt_tokens(chained) == bare + PREVIOUS_RESPONSE_TOKENS
        for unchained in (None, ""):
            assert estimate_prompt_tokens({**body, "previous_response_id": unchained}) == bare

    def test_images_in_a_response_input_count_flat(self) -> None:
        body = {"input": [{"type": "input_image", "image_url": "data:..."}]}
        assert estimate_prompt_tokens(body) == TOKENS_PER_IMAGE


class TestAChatTurnsToolCalls:
    """An assistant turn's tool calls are read by the model: each function's name and
    arguments (its content is null then)."""

    @staticmethod
    def turn(*calls: object) -> dict[str, object]:
        assistant = {"role": "assistant", "content": None, "tool_calls": list(calls)}
        return {"messages": [assistant]}

    def test_name_and_arguments_count(self) -> None:
        call = {"id": "c1", "type": "function", "function": {"name": "read", "arguments": TEXT}}
        assert estimate_input_tokens(self.turn(call)) == -(-44 // 4) + TOKENS_PER_MESSAGE

    def test_every_call_counts(self) -> None:
        call = {"function": {"name": "abcd", "arguments": "x" * 36}}
        assert estimate_input_tokens(self.turn(call, call)) == 20 + TOKENS_PER_MESSAGE

    def test_arguments_given_as_an_object_count_as_their_json(self) -> None:
        arguments = {"path": "a.txt"}
        call = {"function": {"name": "read", "arguments": arguments}}
        chars = 4 + len(json.dumps(arguments))
        assert estimate_input_tokens(self.turn(call)) == -(-chars // 4) + TOKENS_PER_MESSAGE

    def test_a_call_without_name_or_arguments_counts_what_it_has(self) -> None:
        assert estimate_input_tokens(self.turn({"function": {}})) == TOKENS_PER_MESSAGE
        only_name = {"function": {"name": "x" * 8}}
        assert estimate_input_tokens(self.turn(only_name)) == 2 + TOKENS_PER_MESSAGE

    @pytest.mark.parametrize("call", [{"custom": "x" * 10}, "x" * 10, {"function": "x" * 10}])
    def test_a_call_of_another_shape_counts_whole(self, call: object) -> None:
        chars = len(json.dumps(call))
        assert estimate_input_tokens(self.turn(call)) == -(-chars // 4) + TOKENS_PER_MESSAGE

    def test_tool_calls_that_are_not_a_list_count_nothing(self) -> None:
        body = {"messages": [{"role": "assistant", "content": TEXT, "tool_calls": "x" * 400}]}
        assert estimate_input_tokens(body) == 10 + TOKENS_PER_MESSAGE

    def test_they_add_to_the_turn_s_content(self) -> None:
        call = {"function": {"name": "abcd", "arguments": "x" * 36}}
        body = {"messages": [{"role": "assistant", "content": TEXT, "tool_calls": [call]}]}
        assert estimate_input_tokens(body) == 20 + TOKENS_PER_MESSAGE
        assert estimate_prompt_tokens(body) == 20 + TOKENS_PER_MESSAGE


class TestTextOutsideASCII:
    """Text a tokenizer splits finer than English is reserved for what it costs: a budget's
    estimate must not let Chinese text in at a quarter of its tokens."""

    @pytest.mark.parametrize(
        ("text", "at_least_tokens"),
        [
            ("你好" * 100, 200),  # about a token a character
            ("こんにちは" * 40, 200),
            ("🙂" * 50, 50),  # several tokens each
        ],
    )
    def test_counts_at_least_a_token_a_character(self, text: str, at_least_tokens: int) -> None:
        payload = {"prompt": text}
        assert estimate_prompt_tokens(payload) >= at_least_tokens

    def test_ascii_is_four_characters_a_token(self) -> None:
        assert estimate_prompt_tokens({"prompt": "abcd" * 100}) == 100

    def test_a_lone_surrogate_is_counted_not_raised(self) -> None:
        assert estimate_prompt_tokens({"prompt": "\ud800" * 4}) >= 1
