"""What the fake LM Studio answers on /v1/messages and /v1/responses: the shapes LM Studio
(after Anthropic's and OpenAI's APIs) gives, usage where they put it.

/v1/messages streams say the prompt's ``input_tokens`` only in their first event
(message_start, under ``message``) and the answer's ``output_tokens`` in the last
message_delta; /v1/responses streams say both in the last event (response.completed, under
``response``); the JSON answers have ``usage`` at the top. A request naming a
``previous_response_id`` reads the stored conversation too: :data:`STORED_CONVERSATION` more
input tokens. Every answer also carries ``received``, the request as it arrived.
"""

from __future__ import annotations

import json
from typing import Any

MESSAGES_INPUT = 23  # what LM Studio counts for any /v1/messages prompt here
RESPONSES_INPUT = 31  # and for any /v1/responses input
STORED_CONVERSATION = 900  # the input tokens a previous_response_id adds


def answer_length(payload: dict[str, Any], chunks: int, cap_field: str) -> int:
    cap = payload.get(cap_field)
    return min(chunks, cap) if type(cap) is int and cap > 0 else chunks


def _event(kind: str, data: dict[str, Any], eol: bytes) -> bytes:
    return b"event: " + kind.encode() + eol + b"data: " + json.dumps(data).encode() + eol * 2


def messages_answer(payload: dict[str, Any], length: int) -> dict[str, Any]:
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": payload.get("model", "unknown"),
        "content": [{"type": "text", "text": " ".join(f"tok{i}" for i in range(length))}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": MESSAGES_INPUT, "output_tokens": length},
        "received": payload,
    }


def messages_events(payload: dict[str, Any], length: int, eol: bytes = b"\n") -> list[bytes]:
    """message_start, one text block of ``length`` deltas, message_delta, message_stop."""
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": payload.get("model", "unknown"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": MESSAGES_INPUT, "output_tokens": 1},
        },
    }
    events = [
        _event("message_start", start, eol),
        _event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            eol,
        ),
    ]
    for i in range(length):
        delta = {"type": "text_delta", "text": f"tok{i} "}
        events.append(
            _event(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": delta},
                eol,
            )
        )
    events += [
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}, eol),
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": length},
            },
            eol,
        ),
        _event("message_stop", {"type": "message_stop"}, eol),
    ]
    return events


def _responses_input(payload: dict[str, Any]) -> int:
    return RESPONSES_INPUT + (STORED_CONVERSATION if payload.get("previous_response_id") else 0)


def _response(payload: dict[str, Any], status: str, words: list[str], usage: Any) -> dict[str, Any]:
    output = [
        {
            "type": "message",
            "id": "msg_fake",
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": " ".join(words), "annotations": []}],
        }
    ]
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": 1,
        "status": status,
        "model": payload.get("model", "unknown"),
        "output": output if words else [],
        "previous_response_id": payload.get("previous_response_id"),
        "usage": usage,
    }


def _responses_usage(payload: dict[str, Any], length: int) -> dict[str, Any]:
    prompt = _responses_input(payload)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": length,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + length,
    }


def responses_answer(payload: dict[str, Any], length: int) -> dict[str, Any]:
    words = [f"tok{i}" for i in range(length)]
    usage = _responses_usage(payload, length)
    return {**_response(payload, "completed", words, usage), "received": payload}


def responses_events(payload: dict[str, Any], length: int, eol: bytes = b"\n") -> list[bytes]:
    """response.created, ``length`` output_text deltas, response.completed (the whole
    response again, its usage after the output)."""
    events = [
        _event(
            "response.created",
            {"type": "response.created", "response": _response(payload, "in_progress", [], None)},
            eol,
        )
    ]
    for i in range(length):
        events.append(
            _event(
                "response.output_text.delta",
                {"type": "response.output_text.delta", "output_index": 0, "delta": f"tok{i} "},
                eol,
            )
        )
    words = [f"tok{i}" for i in range(length)]
    done = _response(payload, "completed", words, _responses_usage(payload, length))
    events.append(
        _event("response.completed", {"type": "response.completed", "response": done}, eol)
    )
    return events
