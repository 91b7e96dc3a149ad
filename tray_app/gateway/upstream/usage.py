"""Token counts from LM Studio's answers, and the SSE event cutting that hides usage.

LM Gate asks LM Studio for usage on streams the client did not ask it for; such a stream is
relayed in whole events so the usage can be recognised and removed. Whole events also mean a
bound: a stream that never ends its event must not grow a buffer without limit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from tray_app.gateway.upstream.answers import usage_in_tail
from tray_app.gateway.upstream.token_counts import Usage as Usage
from tray_app.gateway.upstream.token_counts import usage_of

# What json.loads raises for a line that is no JSON; a line nested too deep (60,000 "[")
# raises RecursionError instead, and is no usage either.
_NOT_JSON = (ValueError, RecursionError)


def usage_from_payload(payload: Any) -> Usage | None:
    """Usage from a chat/completions/embeddings/responses/messages JSON object, if it has one:
    at the top (every JSON answer, an OpenAI stream's usage chunk, /v1/messages'
    message_delta), in ``message`` (/v1/messages' message_start) or in ``response``
    (/v1/responses' response.completed)."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    for holder in ("message", "response"):
        if isinstance(usage, dict):
            break
        inner = payload.get(holder)
        usage = inner.get("usage") if isinstance(inner, dict) else None
    return usage_of(usage) if isinstance(usage, dict) else None


def merge_usage(first: Usage | None, last: Usage | None) -> Usage | None:
    """One stream's usage from its first and last events: /v1/messages says input_tokens in
    message_start and output_tokens in the final message_delta. Each count is the larger of
    the two: Anthropic's counts are cumulative (a later one is never smaller when both are
    given), and a count missing from one event reads as 0 there."""
    if first is None or last is None:
        return last or first
    return Usage(
        max(first.prompt_tokens, last.prompt_tokens),
        max(first.completion_tokens, last.completion_tokens),
    )


def first_event_ended(head: bytes) -> bool:
    """Whether a stream's first bytes hold its whole first event (any SSE line end)."""
    return b"\n\n" in to_lf(head)


def usage_from_sse_head(head: bytes, max_event_bytes: int) -> Usage | None:
    """Usage from the first events of a stream (/v1/messages' message_start), parsing at
    most the first ``max_event_bytes``, the most a whole first event may be."""
    text = to_lf(head[:max_event_bytes]).decode("utf-8", errors="replace")
    for line in text.split("\n"):
        if line.startswith("data:") and '"usage"' in line:
            try:
                found = usage_from_payload(json.loads(line[5:].strip()))
            except _NOT_JSON:
                continue
            if found is not None:
                return found
    return None


def usage_from_sse_tail(chunks: Iterable[bytes], max_event_bytes: int) -> Usage | None:
    """Usage from the last events of a stream (the usage chunk comes just before [DONE]).

    Only the last two events' worth of bytes is parsed: the usage event is at most
    ``max_event_bytes``, and a hostile stream's last reads need not be cheap to parse. A last
    event whose start is not among the last reads (/v1/responses' response.completed repeats
    the whole answer) still ends with its usage object, which is then read on its own."""
    data = b"".join(chunks)
    text = data[-2 * max_event_bytes :].decode("utf-8", errors="replace")
    for line in reversed(text.splitlines()):  # splitlines knows all of SSE's line ends
        if not line.startswith("data:") or '"usage"' not in line:
            continue
        try:
            found = usage_from_payload(json.loads(line[5:].strip()))
        except _NOT_JSON:
            continue
        if found is not None:
            return found
    return usage_from_payload({"usage": usage_in_tail(data[-2 * max_event_bytes :])})


USAGE_MARKERS = (b'"usage":{', b'"usage": {')


def has_usage_object(data: bytes) -> bool:
    return USAGE_MARKERS[0] in data or USAGE_MARKERS[1] in data


def to_lf(data: bytes) -> bytes:
    """SSE allows CRLF, CR and LF line ends; LM Gate's cutting looks for LF only."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def strip_usage_events(data: bytes) -> tuple[bytes, Usage | None]:
    """Remove the usage LM Gate asked for from complete SSE events (``data`` ends at an event
    boundary): the usage-only chunk is dropped, a usage field on a content chunk removed.
    Returns what is left and the last usage removed."""
    if b"\r" in data:
        data = to_lf(data)
    out: list[bytes] = []
    found: Usage | None = None
    for event in data.split(b"\n\n"):
        if event and has_usage_object(event):
            lines = event.split(b"\n")
            body = b"\n".join(line[5:].lstrip() for line in lines if line.startswith(b"data:"))
            try:
                payload = json.loads(body)
            except _NOT_JSON:
                out.append(event)
                continue
            if isinstance(payload, dict):
                found = usage_from_payload(payload) or found
                if payload.get("choices") == []:
                    continue
                payload.pop("usage", None)
                event = b"data: " + json.dumps(payload, ensure_ascii=False).encode()
        out.append(event)
    return b"\n\n".join(out), found


class EventCutter:
    """Cuts a stream into whole SSE events (line ends rewritten as LF), optionally without
    the usage LM Gate asked for. Holds at most one unfinished event, of fewer than
    ``max_event_bytes`` bytes; an event is measured with LF line ends and its blank line.
    Once an event is larger, ``too_large`` is set and nothing from it on is returned."""

    __slots__ = ("_after_cr", "_held", "_hide_usage", "_limit", "_parts", "too_large", "usage")

    def __init__(self, max_event_bytes: int, *, hide_usage: bool) -> None:
        self._limit = max_event_bytes
        self._hide_usage = hide_usage
        # The unfinished event, as the pieces it came in: joined only once it is complete, so
        # an event dripped in tiny reads costs linear time, not quadratic.
        self._parts: list[bytes] = []
        self._held = 0
        # A chunk ended in CR: a LF opening the next one belongs to the same line end.
        self._after_cr = False
        self.too_large = False
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        """The events ``chunk`` completes (maybe none); an empty chunk changes nothing."""
        if self.too_large or not chunk:
            return b""  # an empty chunk must not forget a CR that ended the one before
        if self._after_cr or b"\r" in chunk:
            if self._after_cr and chunk.startswith(b"\n"):
                chunk = chunk[1:]
            self._after_cr = chunk.endswith(b"\r")
            chunk = to_lf(chunk)
        if not chunk:
            return b""
        # Does this chunk finish an event? Only its bytes (and the one before) can tell.
        before = self._parts[-1][-1:] if self._parts else b""
        if b"\n\n" not in before + chunk:
            self._parts.append(chunk)
            self._held += len(chunk)
            # The unfinished event needs at least one more byte: this many is too many.
            if self._held >= self._limit:
                self._drop()
            return b""
        data = b"".join((*self._parts, chunk)) if self._parts else chunk
        cut = data.rfind(b"\n\n")
        ready, carry = data[: cut + 2], data[cut + 2 :]
        if len(ready) > self._limit:
            ready = self._up_to_oversized(ready)  # finished events that came in one read
        self._parts = [carry] if carry else []
        self._held = len(carry)
        if self.too_large or self._held >= self._limit:
            self._drop()
        if self._hide_usage and has_usage_object(ready):
            ready, found = strip_usage_events(ready)
            self.usage = found or self.usage
        return ready

    def _drop(self) -> None:
        self.too_large = True
        self._parts = []
        self._held = 0

    def rest(self) -> bytes:
        """What the stream left unfinished when it ended (relayed as it is)."""
        rest = b"".join(self._parts)
        self._parts, self._held = [], 0
        return rest

    def _up_to_oversized(self, ready: bytes) -> bytes:
        kept = 0
        for event in ready.split(b"\n\n"):
            if len(event) + 2 > self._limit:
                self.too_large = True
                return ready[:kept]
            kept += len(event) + 2
        return ready
