"""An honest estimate for ``POST /v1/messages/count_tokens``, which LM Studio does not have.

Anthropic clients (Claude Code among them) ask it how big a conversation is before they send
it, to decide when to compact. LM Studio exposes no tokenizer, and the model's own one is not
reachable from here, so the answer is an estimate, and it says so in :data:`METHOD_HEADER`:
every piece of text the model would read (system prompt, message text, tool calls and results,
tool definitions) counted at :data:`CHARS_PER_TOKEN` characters a token, the usual ratio of
BPE tokenizers on English text and code, plus a few tokens of framing per message and a flat
amount per image (whose size in tokens the tokenizer decides from its pixels).

A token budget reserves the same estimate for every generation endpoint, so what the estimate
misses is what a caller can get past its budget: it also counts a prompt sent as token ids
(one token each), the tool calls of earlier assistant turns, and tool definitions whatever the
endpoint. A /v1/responses request that names a ``previous_response_id`` makes LM Studio put the
whole stored conversation before it, which the gateway never sees; it is reserved as
:data:`PREVIOUS_RESPONSE_TOKENS` (see there). LM Studio's usage replaces every estimate when
the request is settled.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tray_app.gateway import api_errors as errors

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4  # role markers and separators of a chat template
TOKENS_PER_IMAGE = 1_600  # what Anthropic documents for an image of about 1.15 megapixels
METHOD_HEADER = "X-LMGate-Token-Count"
# What a chained /v1/responses request reserves for the conversation LM Studio stores and puts
# before it. Its true size is bounded only by the loaded model's context length, which the
# gateway does not know; this is twice LM Studio's default context length. Reserving a model's
# largest context instead would refuse every chained request of a small budget, and the
# reservation only has to hold until the request settles with LM Studio's own input_tokens
# (which include the stored conversation): an overshoot is at most one chain's excess per
# request in flight, and the next request is refused.
PREVIOUS_RESPONSE_TOKENS = 8_192
METHOD = f"estimate; {CHARS_PER_TOKEN} characters per token; not the model's tokenizer"


def _size(text: str) -> int:
    """``text``'s length in the estimate's characters. Tokenizers split text outside ASCII
    far finer than English (Chinese and Japanese about a token a character, emoji several):
    each UTF-8 byte past a character's first counts as two more characters, so such text
    counts up to 1.25 tokens a character instead of 0.25, and a budget's reservation holds
    it. ASCII text costs one pass to tell."""
    if text.isascii():
        return len(text)
    return len(text) + 2 * (len(text.encode("utf-8", "surrogatepass")) - len(text))


def _text_of(block: Any) -> tuple[int, int]:
    """(characters, images) in one content block or content value."""
    if isinstance(block, str):
        return _size(block), 0
    if isinstance(block, list):
        chars = images = 0
        for part in block:
            more_chars, more_images = _text_of(part)
            chars += more_chars
            images += more_images
        return chars, images
    if not isinstance(block, dict):
        return 0, 0
    kind = block.get("type")
    if not isinstance(kind, str):
        # An object or a list as the type names no kind (and is no set member): its block is
        # counted whole, as an unknown kind's is.
        kind = None
    # OpenAI chat and Responses name their image parts differently; a photo is never its base64.
    if kind in {"image", "document", "image_url", "input_image"}:
        return 0, 1
    if kind == "text":
        return _text_of(block.get("text"))
    if kind == "tool_result":
        return _text_of(block.get("content"))
    if kind == "tool_use":
        name, given = str(block.get("name", "")), block.get("input", {})
        return _size(name) + _size(json.dumps(given, ensure_ascii=False)), 0
    # Thinking and any block kind added later: whatever text it carries is read by the model.
    return _size(json.dumps(block, ensure_ascii=False)), 0


def estimate_input_tokens(payload: dict[str, Any]) -> int:
    """The estimated ``input_tokens`` of a Messages API request body (already validated by the
    body rules); raises 400 ``invalid_messages`` for a ``messages`` that is not a list."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise errors.count_tokens_messages_invalid()
    chars, images = _text_of(payload.get("system", ""))
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else message
        more_chars, more_images = _text_of(content)
        chars += more_chars + _tool_calls_chars(message)
        images += more_images
    tools = payload.get("tools")
    if isinstance(tools, list):
        chars += _size(json.dumps(tools, ensure_ascii=False))
    return (
        math.ceil(chars / CHARS_PER_TOKEN)
        + TOKENS_PER_MESSAGE * len(messages)
        + TOKENS_PER_IMAGE * images
    )


def _tool_calls_chars(message: Any) -> int:
    """An OpenAI chat assistant turn's tool calls: the model reads each function's name and
    arguments (its content is often null then)."""
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not isinstance(calls, list):
        return 0
    chars = 0
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            chars += _size(json.dumps(call, ensure_ascii=False))  # a shape it may read whole
            continue
        arguments = function.get("arguments", "")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        chars += _size(str(function.get("name", ""))) + _size(arguments)
    return chars


def _token_ids(value: Any) -> int:
    """How many token ids a completion's ``prompt`` or an embedding's ``input`` holds when it is
    given as ids (a list of ints, or a list of such lists) rather than text; 0 for text."""
    if not isinstance(value, list):
        return 0
    ids = 0
    for item in value:
        if type(item) is int:
            ids += 1
        elif isinstance(item, list):
            ids += sum(1 for part in item if type(part) is int)
    return ids


def estimate_prompt_tokens(payload: dict[str, Any]) -> int:
    """What a generation request's input costs, for a token budget's reservation: the same
    estimate for every endpoint (chat messages, a completion's prompt, an embedding's or a
    response's input, tools, a response chain). The settled usage then replaces it with
    LM Studio's own count."""
    chained = PREVIOUS_RESPONSE_TOKENS if payload.get("previous_response_id") else 0
    if isinstance(payload.get("messages"), list):
        return estimate_input_tokens(payload) + chained
    chars = images = ids = 0
    for field in ("instructions", "prompt", "input"):
        value = payload.get(field, "")
        more_chars, more_images = _text_of(value)
        chars += more_chars
        images += more_images
        ids += _token_ids(value)
    tools = payload.get("tools")
    if isinstance(tools, list):
        chars += _size(json.dumps(tools, ensure_ascii=False))
    return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_IMAGE * images + ids + chained
