"""Token counts from LM Studio's answers, for the access log (and later, accounting)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


def usage_from_payload(payload: Any) -> Usage | None:
    """Usage from a chat/completions/embeddings/responses/messages JSON object, if it has one."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        # /v1/messages streams carry usage inside message_start / message_delta events.
        message = payload.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
        if not isinstance(usage, dict):
            return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


def usage_from_sse_tail(chunks: Iterable[bytes]) -> Usage | None:
    """Usage from the last events of a stream (the usage chunk comes just before [DONE])."""
    text = b"".join(chunks).decode("utf-8", errors="replace")
    for line in reversed(text.splitlines()):
        if not line.startswith("data:") or '"usage"' not in line:
            continue
        try:
            found = usage_from_payload(json.loads(line[5:].strip()))
        except ValueError:
            continue
        if found is not None:
            return found
    return None


USAGE_MARKERS = (b'"usage":{', b'"usage": {')


def has_usage_object(data: bytes) -> bool:
    return USAGE_MARKERS[0] in data or USAGE_MARKERS[1] in data


def strip_usage_events(data: bytes) -> bytes:
    """Remove the usage LM Gate asked for from complete SSE events (``data`` ends at an event
    boundary): the usage-only chunk is dropped, a usage field on a content chunk removed."""
    out: list[bytes] = []
    for event in data.split(b"\n\n"):
        if event and has_usage_object(event):
            lines = event.split(b"\n")
            body = b"\n".join(line[5:].lstrip() for line in lines if line.startswith(b"data:"))
            try:
                payload = json.loads(body)
            except ValueError:
                out.append(event)
                continue
            if isinstance(payload, dict):
                if payload.get("choices") == []:
                    continue
                payload.pop("usage", None)
                event = b"data: " + json.dumps(payload, ensure_ascii=False).encode()
        out.append(event)
    return b"\n\n".join(out)
