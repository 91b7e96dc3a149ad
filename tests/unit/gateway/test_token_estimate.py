"""The count_tokens estimate: every piece of text the model reads, at four characters a
token, plus framing per message and a flat amount per image."""

from __future__ import annotations

import json

import pytest

from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.token_estimate import (
    TOKENS_PER_IMAGE,
    TOKENS_PER_MESSAGE,
    estimate_input_tokens,
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


@pytest.mark.parametrize("messages", [None, "hi", {"role": "user"}])
def test_messages_must_be_a_list(messages: object) -> None:
    with pytest.raises(ApiError) as refused:
        estimate_input_tokens({"messages": messages} if messages is not None else {})
    assert (refused.value.status, refused.value.code, refused.value.param) == (
        400,
        "invalid_messages",
        "messages",
    )
