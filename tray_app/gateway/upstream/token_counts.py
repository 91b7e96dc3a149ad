"""The token counts of one usage object, believed only when they are plausible.

A count comes from LM Studio's answer, and a caller can put look-alike usage objects into
what LM Studio echoes back. A negative count would refund a budget and one beyond SQLite's
integers would make the usage flush fail; ``True`` is an int to Python but no count. Any
such count makes the whole object "not said", so the request is charged its estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# No answer holds two billion tokens, and three such counts summed still fit SQLite's INTEGER.
MAX_TOKEN_COUNT = 2**31 - 1
_PROMPT_FIELDS = ("prompt_tokens", "input_tokens")
_COMPLETION_FIELDS = ("completion_tokens", "output_tokens")
# Anthropic counts a prompt served from its cache apart from input_tokens; it was read all
# the same, and a budget counts every token of the prompt.
_CACHED_PROMPT_FIELDS = ("cache_creation_input_tokens", "cache_read_input_tokens")
_COUNT_FIELDS = _PROMPT_FIELDS + _COMPLETION_FIELDS + _CACHED_PROMPT_FIELDS


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


def is_token_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_TOKEN_COUNT


def usage_of(usage: dict[str, Any]) -> Usage | None:
    """The counts of a usage object (a count it does not name, or names as null, is 0), or
    None if any count it names is not a plausible one."""
    counts = {field: usage[field] for field in _COUNT_FIELDS if usage.get(field) is not None}
    if not all(is_token_count(value) for value in counts.values()):
        return None
    prompt = counts.get(_PROMPT_FIELDS[0], counts.get(_PROMPT_FIELDS[1], 0))
    completion = counts.get(_COMPLETION_FIELDS[0], counts.get(_COMPLETION_FIELDS[1], 0))
    prompt += sum(counts.get(field, 0) for field in _CACHED_PROMPT_FIELDS)
    return Usage(prompt_tokens=prompt, completion_tokens=completion)
