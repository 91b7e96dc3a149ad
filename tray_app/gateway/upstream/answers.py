"""Reading LM Studio's JSON answers within bounds.

Python objects cost about 25 times the JSON text they come from, and ``json.loads`` holds the
event loop while it runs: a 250 KB gzip of ``{"choices":[{},{},…]}`` decodes to 255 MB and
would take 6 GB and 20 s to parse. The gateway parses an answer only where it must (usage,
the model list, /api/chat's reply) and only up to these bounds; past them it still relays an
answer that looks like JSON, and reads its usage from the tail, where LM Studio puts it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tray_app.gateway.upstream.token_counts import usage_of

MIB = 1024 * 1024
MAX_PARSED_BYTES = 8 * MIB
MAX_PARSED_CONTAINERS = 1_000_000  # objects and arrays (brackets, a bound from above)
_TAIL_BYTES = 64 * 1024
# A usage object may hold one level of objects: OpenAI's input_tokens_details and the like.
# The two alternatives start differently, so the match takes linear time.
_USAGE_IN_TAIL = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]{0,1024}\}){0,4096}\})')


class TooLargeToParse(Exception):
    """The answer is valid-looking but beyond what the gateway will turn into objects."""


def parse_bounded(text: bytes) -> Any:
    """``json.loads(text)``, or TooLargeToParse beyond the bounds (ValueError if not JSON,
    nesting too deep included)."""
    if len(text) > MAX_PARSED_BYTES or text.count(b"{") + text.count(b"[") > MAX_PARSED_CONTAINERS:
        raise TooLargeToParse
    try:
        return json.loads(text)
    except RecursionError:  # nested too deep to be an answer
        raise ValueError("JSON nested too deeply") from None


def looks_like_json_object(text: bytes) -> bool:
    stripped = text.strip()
    return stripped.startswith(b"{") and stripped.endswith(b"}")


def usage_in_tail(text: bytes) -> dict[str, Any] | None:
    """The usage the ``"usage": {...}`` objects near the end of a large answer say, if any.

    An answer may echo what the caller sent (a response's metadata, say) after its real usage,
    and a caller could put a small usage object there: with several objects, each count is
    the largest any of them says, so an echo can raise a charge but never lower it."""
    said = []
    for found in _USAGE_IN_TAIL.finditer(text[-_TAIL_BYTES:]):
        try:
            usage = parse_bounded(found.group(1))
        except ValueError:  # TooLargeToParse cannot be: the pattern bounds the object
            continue
        counts = usage_of(usage) if isinstance(usage, dict) else None
        if counts is not None:
            said.append(counts)
    if not said:
        return None
    return {
        "prompt_tokens": max(u.prompt_tokens for u in said),
        "completion_tokens": max(u.completion_tokens for u in said),
    }
