"""Token counts and usage hiding on their own: every API's usage shape, every bad value, and
the SSE cutting that must remove only the usage LM Gate asked for, leave every other byte of a
stream as LM Studio sent it, and never hold more than one bounded unfinished event.
"""

from __future__ import annotations

import json

import pytest

from tray_app.gateway.upstream.answers import usage_in_tail
from tray_app.gateway.upstream.token_counts import MAX_TOKEN_COUNT
from tray_app.gateway.upstream.usage import (
    EventCutter,
    Usage,
    first_event_ended,
    has_usage_object,
    merge_usage,
    strip_usage_events,
    to_lf,
    usage_from_payload,
    usage_from_sse_head,
    usage_from_sse_tail,
)

# ---- usage_from_payload -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        # chat / completions
        ({"usage": {"prompt_tokens": 3, "completion_tokens": 5}}, Usage(3, 5)),
        # responses / messages
        ({"usage": {"input_tokens": 7, "output_tokens": 2}}, Usage(7, 2)),
        # embeddings: no completion at all
        ({"usage": {"prompt_tokens": 9, "total_tokens": 9}}, Usage(9, 0)),
        ({"usage": {"output_tokens": 4}}, Usage(0, 4)),
        ({"usage": {}}, Usage(0, 0)),
        # the OpenAI names win over the Anthropic ones when both are there
        (
            {
                "usage": {
                    "prompt_tokens": 1,
                    "input_tokens": 100,
                    "completion_tokens": 2,
                    "output_tokens": 200,
                }
            },
            Usage(1, 2),
        ),
        # /v1/messages streams: usage inside message_start's message
        ({"type": "message_start", "message": {"usage": {"input_tokens": 11}}}, Usage(11, 0)),
        ({"usage": None, "message": {"usage": {"output_tokens": 6}}}, Usage(0, 6)),
        # a top-level usage object wins over the message's
        (
            {"usage": {"prompt_tokens": 1}, "message": {"usage": {"input_tokens": 50}}},
            Usage(1, 0),
        ),
        # /v1/responses streams: usage inside response.completed's response
        (
            {
                "type": "response.completed",
                "response": {
                    "usage": {
                        "input_tokens": 31,
                        "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": 5,
                    }
                },
            },
            Usage(31, 5),
        ),
        ({"usage": None, "response": {"usage": {"input_tokens": 4}}}, Usage(4, 0)),
        ({"message": {}, "response": {"usage": {"output_tokens": 4}}}, Usage(0, 4)),
        # the message's wins over the response's, the top's over both
        (
            {"message": {"usage": {"input_tokens": 2}}, "response": {"usage": {"input_tokens": 9}}},
            Usage(2, 0),
        ),
        ({"usage": {"input_tokens": 1}, "response": {"usage": {"input_tokens": 9}}}, Usage(1, 0)),
        # Anthropic's cached prompt was read too: it counts with input_tokens
        (
            {
                "usage": {
                    "input_tokens": 3,
                    "cache_creation_input_tokens": 10,
                    "cache_read_input_tokens": 100,
                    "output_tokens": 2,
                }
            },
            Usage(113, 2),
        ),
        ({"message": {"usage": {"cache_read_input_tokens": 7}}}, Usage(7, 0)),
        ({"usage": {"input_tokens": 3, "cache_read_input_tokens": 0}}, Usage(3, 0)),
        ({"usage": {"input_tokens": 3, "cache_read_input_tokens": 1}}, Usage(4, 0)),
    ],
)
def test_usage_is_read_from_every_api_shape(payload: object, expected: Usage) -> None:
    assert usage_from_payload(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        [{"usage": {"prompt_tokens": 1}}],
        "usage",
        {},
        {"usage": None},
        {"usage": [1, 2]},
        {"usage": "3"},
        {"message": None},
        {"message": "hi"},
        {"message": {"usage": None}},
        {"message": {"usage": [3]}},
        {"message": {}},
        {"response": None},
        {"response": {"usage": None}},
        {"response": {"usage": 5}},
        {"response": "usage"},
        {"response": {}},
    ],
)
def test_no_usage_object_is_no_usage(payload: object) -> None:
    assert usage_from_payload(payload) is None


@pytest.mark.parametrize(
    "field", ["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens"]
)
@pytest.mark.parametrize("bad", ["3", 3.5, [3], {"n": 3}])
def test_a_count_that_is_no_integer_is_no_usage(field: str, bad: object) -> None:
    assert usage_from_payload({"usage": {field: bad}}) is None
    assert usage_from_payload({"message": {"usage": {field: bad}}}) is None
    assert usage_from_payload({"response": {"usage": {field: bad}}}) is None


# ---- usage_from_sse_tail ------------------------------------------------------------------

USAGE_LINE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}'
CONTENT = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'


def test_the_usage_chunk_before_done_is_found_across_reads() -> None:
    stream = CONTENT + USAGE_LINE + b"\n\ndata: [DONE]\n\n"
    assert usage_from_sse_tail([stream], 1000) == Usage(3, 5)
    pieces = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    assert usage_from_sse_tail(pieces, 1000) == Usage(3, 5)


def test_the_last_usage_of_the_stream_wins() -> None:
    later = b'data: {"usage":{"prompt_tokens":4,"completion_tokens":9}}\n\n'
    assert usage_from_sse_tail([USAGE_LINE + b"\n\n", later], 1000) == Usage(4, 9)


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
def test_every_sse_line_end_is_understood(end: bytes) -> None:
    assert usage_from_sse_tail([USAGE_LINE + end + end + b"data: [DONE]" + end], 1000) == (
        Usage(3, 5)
    )


@pytest.mark.parametrize(
    "later",
    [
        b'data: {"usage":{"prompt_tokens":',  # cut off
        b'data: {"usage": null}',  # usage, but no usage object
        b'data: {"usage":{"prompt_tokens":"many"}}',
        b':    {"usage":{"prompt_tokens":70,"completion_tokens":70}}',  # a comment line
        b'event: {"usage":{"prompt_tokens":70,"completion_tokens":70}}',
    ],
)
def test_a_later_line_that_is_no_usage_chunk_does_not_hide_the_real_one(later: bytes) -> None:
    assert usage_from_sse_tail([USAGE_LINE + b"\n\n" + later + b"\n\n"], 1000) == Usage(3, 5)


def test_a_data_line_that_does_not_say_usage_is_not_parsed() -> None:
    # Only lines naming "usage" are parsed (a hostile stream's last reads need not be cheap
    # to parse); an escaped key is not worth the parse.
    escaped = b'data: {"\\u0075sage":{"prompt_tokens":70,"completion_tokens":70}}'
    assert json.loads(escaped[5:]) == {"usage": {"prompt_tokens": 70, "completion_tokens": 70}}
    assert usage_from_sse_tail([escaped + b"\n\n"], 1000) is None
    assert usage_from_sse_tail([USAGE_LINE + b"\n\n" + escaped + b"\n\n"], 1000) == Usage(3, 5)


def test_only_the_last_two_events_worth_of_bytes_is_read() -> None:
    limit = 100
    window = 2 * limit
    line = USAGE_LINE + b"\n\n"
    # The usage line starts exactly where the window does: found.
    filler = b": " + b"x" * (window - len(line) - 3) + b"\n"
    assert len(line + filler) == window
    assert usage_from_sse_tail([b"data: [DONE]\n\n" + line + filler], limit) == Usage(3, 5)
    # One byte more after it, and its "d" falls outside the window: the line is not parsed,
    # but its usage object, still inside, is read on its own.
    more = filler[:-1] + b"y\n"
    assert usage_from_sse_tail([b"data: [DONE]\n\n" + line + more], limit) == Usage(3, 5)
    # Once the object's first byte is outside too, nothing of it is read.
    shift = line.index(b'"usage"') + 1
    beyond = filler[:-1] + b"y" * shift + b"\n"
    assert usage_from_sse_tail([b"data: [DONE]\n\n" + line + beyond], limit) is None
    inside = filler[:-1] + b"y" * (shift - 1) + b"\n"
    assert usage_from_sse_tail([b"data: [DONE]\n\n" + line + inside], limit) == Usage(3, 5)


def test_bytes_that_are_no_utf8_do_not_break_the_search() -> None:
    stream = CONTENT + b"data: \xff\xfe broken\n\n" + USAGE_LINE + b"\n\n\xffdata: [DONE]\n\n"
    assert usage_from_sse_tail([stream], 1000) == Usage(3, 5)


def test_a_last_event_too_long_for_the_tail_still_gives_its_usage() -> None:
    # /v1/responses' response.completed repeats the whole answer: its data line starts
    # before the kept reads, its usage object (with objects inside) is near its end.
    end = b'"usage":{"input_tokens":31,"input_tokens_details":{"cached_tokens":0},'
    end += b'"output_tokens":5,"output_tokens_details":{"reasoning_tokens":0}},"user":null}}\n\n'
    assert usage_from_sse_tail([b'xx"}]}],', end], 100) == Usage(31, 5)
    # A whole line is still preferred to a loose object after it.
    loose = b': "usage":{"input_tokens":99}\n\n'
    assert usage_from_sse_tail([USAGE_LINE + b"\n\n" + loose], 1000) == Usage(3, 5)
    assert usage_from_sse_tail([loose], 1000) == Usage(99, 0)


def test_a_loose_usage_object_beyond_the_window_is_not_read() -> None:
    loose = b'"usage":{"input_tokens":99}'
    assert usage_from_sse_tail([loose + b" " * (200 - len(loose))], 100) == Usage(99, 0)
    assert usage_from_sse_tail([loose + b" " * (201 - len(loose))], 100) is None


def test_a_stream_without_usage_has_none() -> None:
    assert usage_from_sse_tail([CONTENT, b"data: [DONE]\n\n"], 1000) is None
    assert usage_from_sse_tail([], 1000) is None


# ---- has_usage_object, to_lf --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"usage":{"prompt_tokens":1}}', True),
        (b'{"usage": {"prompt_tokens":1}}', True),
        (b'{"usage":null}', False),
        (b'{"usage": null}', False),
        (b'{"usage":[]}', False),
        (b'{"text":"usage"}', False),
        (b"", False),
    ],
)
def test_a_usage_object_is_recognised_in_both_spellings(data: bytes, expected: bool) -> None:
    assert has_usage_object(data) is expected


def test_every_line_end_becomes_lf() -> None:
    assert to_lf(b"a\r\nb\rc\nd\r\r\ne") == b"a\nb\nc\nd\n\ne"
    assert to_lf(b"plain") == b"plain"


# ---- strip_usage_events -------------------------------------------------------------------

USAGE_ONLY = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}'
WITH_USAGE = (
    b'data: {"id":"c1","choices":[{"delta":{"content":"h\xc3\xa9"}}],'
    b'"usage":{"prompt_tokens":2,"completion_tokens":1}}'
)


def test_the_usage_only_chunk_is_dropped_and_its_usage_returned() -> None:
    data = CONTENT + USAGE_ONLY + b"\n\ndata: [DONE]\n\n"
    assert strip_usage_events(data) == (CONTENT + b"data: [DONE]\n\n", Usage(3, 5))


def test_a_usage_field_on_a_content_chunk_is_removed_and_the_rest_kept() -> None:
    left, found = strip_usage_events(WITH_USAGE + b"\n\n")
    assert found == Usage(2, 1)
    event, _, tail = left.partition(b"\n\n")
    assert tail == b""
    assert event.startswith(b"data: ")
    assert json.loads(event[6:]) == {"id": "c1", "choices": [{"delta": {"content": "hé"}}]}
    assert "hé".encode() in event  # written as UTF-8, not as \u escapes


def test_a_chunk_without_choices_keeps_its_content_without_the_usage() -> None:
    event = b'data: {"type":"message_delta","usage":{"output_tokens":8}}'
    left, found = strip_usage_events(event + b"\n\n")
    assert found == Usage(0, 8)
    assert json.loads(left.partition(b"\n\n")[0][6:]) == {"type": "message_delta"}


def test_events_without_usage_pass_byte_for_byte() -> None:
    data = (
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
        b'event: ping\ndata: {"x":1,  "y":[]}\n\n'
        b": comment\n\n" + USAGE_ONLY + b"\n\ndata: [DONE]\n\n"
    )
    left, found = strip_usage_events(data)
    assert found == Usage(3, 5)
    assert left == data.replace(USAGE_ONLY + b"\n\n", b"")


@pytest.mark.parametrize(
    "event",
    [
        b'data: {"usage":{"prompt_tokens":1}',  # not JSON
        b'data: [{"usage":{"prompt_tokens":1}}]',  # JSON, but no object
        b'data: "\\"usage\\":{"',  # a string
    ],
)
def test_an_event_that_only_looks_like_usage_is_left_alone(event: bytes) -> None:
    data = event + b"\n\ndata: [DONE]\n\n"
    assert strip_usage_events(data) == (data, None)


def test_a_usage_object_split_over_data_lines_is_understood() -> None:
    event = b'data: {"choices":[],\ndata:   "usage":{"prompt_tokens":4,"completion_tokens":4}}'
    assert strip_usage_events(event + b"\n\ndata: [DONE]\n\n") == (
        b"data: [DONE]\n\n",
        Usage(4, 4),
    )


def test_crlf_events_are_cut_too() -> None:
    data = (CONTENT + USAGE_ONLY + b"\n\ndata: [DONE]\n\n").replace(b"\n", b"\r\n")
    assert strip_usage_events(data) == (CONTENT + b"data: [DONE]\n\n", Usage(3, 5))


def test_the_last_valid_usage_is_returned() -> None:
    later = b'data: {"choices":[],"usage":{"prompt_tokens":6,"completion_tokens":7}}'
    broken = b'data: {"choices":[],"usage":{"prompt_tokens":"x"}}'
    assert strip_usage_events(USAGE_ONLY + b"\n\n" + later + b"\n\n")[1] == Usage(6, 7)
    assert strip_usage_events(USAGE_ONLY + b"\n\n" + broken + b"\n\n") == (b"", Usage(3, 5))


# ---- EventCutter --------------------------------------------------------------------------


def feed_all(cutter: EventCutter, chunks: list[bytes]) -> bytes:
    return b"".join(cutter.feed(chunk) for chunk in chunks)


STREAM = CONTENT + USAGE_ONLY + b"\n\n" + CONTENT + b"data: [DONE]\n\n"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 50, len(STREAM)])
def test_whole_events_come_out_however_the_stream_is_cut(size: int) -> None:
    pieces = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    cutter = EventCutter(1000, hide_usage=False)
    out = b""
    for piece in pieces:
        ready = cutter.feed(piece)
        assert ready == b"" or ready.endswith(b"\n\n"), "half an event went out"
        out += ready
    assert out == STREAM
    assert cutter.usage is None
    assert cutter.rest() == b""
    assert not cutter.too_large


@pytest.mark.parametrize("size", [1, 2, 5, len(STREAM)])
def test_usage_is_hidden_and_kept_when_asked(size: int) -> None:
    pieces = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    cutter = EventCutter(1000, hide_usage=True)
    assert feed_all(cutter, pieces) == CONTENT + CONTENT + b"data: [DONE]\n\n"
    assert cutter.usage == Usage(3, 5)


def test_a_usage_is_kept_when_later_events_have_none() -> None:
    cutter = EventCutter(1000, hide_usage=True)
    cutter.feed(USAGE_ONLY + b"\n\n")
    assert cutter.feed(CONTENT) == CONTENT
    assert cutter.feed(b'data: {"usage":{"prompt_tokens":"x"}}\n\n') != b""
    assert cutter.usage == Usage(3, 5)


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: a\r\n\r\ndata: b\r\n\r\n"],
        [b"data: a\r", b"\n\r\ndata: b\r\n\r\n"],
        [b"data: a\r\n\r", b"\ndata: b\r\n\r", b"\n"],
        [b"data: a\r\r", b"data: b\r\r"],
        [b"data: a\n", b"\ndata: b\n", b"\n"],
        [b"data: a", b"\n", b"\n", b"data: b\n\n"],
    ],
)
def test_every_line_end_cut_anywhere_is_one_lf(chunks: list[bytes]) -> None:
    cutter = EventCutter(1000, hide_usage=False)
    assert feed_all(cutter, chunks) + cutter.rest() == b"data: a\n\ndata: b\n\n"


def test_a_cr_ending_a_chunk_does_not_eat_a_later_lf() -> None:
    # CR, then a chunk without LF: the next chunk's LF is a line end of its own.
    cutter = EventCutter(1000, hide_usage=False)
    assert feed_all(cutter, [b"data: a\r", b"x", b"\n\n"]) == b"data: a\nx\n\n"


def test_an_empty_chunk_after_a_cr_keeps_the_crlf_whole() -> None:
    # CR, nothing, LF: still one CRLF line end, not a CR and a LF (which would end the event).
    cutter = EventCutter(1000, hide_usage=False)
    chunks = [b"data: a\r", b"", b"\ndata: b\r\n\r\n"]
    assert feed_all(cutter, chunks) + cutter.rest() == b"data: a\ndata: b\n\n"


def test_what_a_stream_leaves_unfinished_is_the_rest() -> None:
    cutter = EventCutter(1000, hide_usage=True)
    assert cutter.feed(CONTENT + b"data: par") == CONTENT
    assert cutter.feed(b"tial") == b""
    assert cutter.rest() == b"data: partial"
    assert cutter.rest() == b""
    # The rest is forgotten: the next event is not glued to it.
    assert cutter.feed(b"data: next\n\n") == b"data: next\n\n"


LIMIT = 40


def event_of(size: int) -> bytes:
    """A whole event of ``size`` bytes, counting its blank line."""
    return b"data: " + b"x" * (size - 8) + b"\n\n"


@pytest.mark.parametrize("size", [1, 7, LIMIT])
def test_an_event_as_large_as_the_limit_passes(size: int) -> None:
    event = event_of(LIMIT)
    pieces = [event[i : i + size] for i in range(0, len(event), size)]
    cutter = EventCutter(LIMIT, hide_usage=False)
    assert feed_all(cutter, pieces) == event
    assert not cutter.too_large
    assert cutter.feed(event + event) == event + event  # several in one read, too


@pytest.mark.parametrize("size", [1, 7, LIMIT, LIMIT + 1])
def test_an_event_one_byte_larger_is_too_large(size: int) -> None:
    event = event_of(LIMIT + 1)
    pieces = [event[i : i + size] for i in range(0, len(event), size)]
    cutter = EventCutter(LIMIT, hide_usage=False)
    assert feed_all(cutter, pieces) == b""
    assert cutter.too_large
    # Nothing from it on comes out, and nothing is held.
    assert cutter.feed(b"data: ok\n\n") == b""
    assert cutter.rest() == b""


def test_an_unfinished_event_is_held_only_below_the_limit() -> None:
    cutter = EventCutter(LIMIT, hide_usage=False)
    assert cutter.feed(b"x" * (LIMIT - 1)) == b""
    assert not cutter.too_large
    assert cutter.rest() == b"x" * (LIMIT - 1)
    cutter.feed(b"x" * (LIMIT - 1))
    cutter.feed(b"x")
    assert cutter.too_large
    assert cutter.rest() == b""


def test_an_unfinished_event_after_whole_ones_is_held_only_below_the_limit() -> None:
    ok = event_of(10)
    cutter = EventCutter(LIMIT, hide_usage=False)
    assert cutter.feed(ok + b"y" * (LIMIT - 1)) == ok
    assert not cutter.too_large
    cutter = EventCutter(LIMIT, hide_usage=False)
    assert cutter.feed(ok + b"y" * LIMIT) == ok  # the whole events before it still go out
    assert cutter.too_large
    assert cutter.rest() == b""


def test_events_before_an_oversized_one_in_the_same_read_go_out() -> None:
    ok = event_of(LIMIT)
    cutter = EventCutter(LIMIT, hide_usage=False)
    assert cutter.feed(ok + event_of(10) + event_of(LIMIT + 1) + ok) == ok + event_of(10)
    assert cutter.too_large
    assert cutter.feed(ok) == b""


def test_an_oversized_event_completed_by_a_later_read_is_refused() -> None:
    cutter = EventCutter(LIMIT, hide_usage=False)
    big = event_of(LIMIT + 1)
    assert cutter.feed(big[:-2]) == b""  # LIMIT - 1 bytes held: not yet too many
    assert not cutter.too_large
    assert cutter.feed(b"\n\n" + event_of(10)) == b""
    assert cutter.too_large


# SSE lets a data line's value start right after the colon, or after a blank (removed), and
# LM Studio's JSON may be padded; every spelling of the usage chunk is the usage chunk.
DATA_SPELLINGS = [b"data:", b"data: ", b"data:   ", b"data:\t", b"data: \x0c"]
DONE_EVENT = b"data: [DONE]\n\n"


@pytest.mark.parametrize("prefix", DATA_SPELLINGS)
def test_every_data_line_spelling_of_the_usage_chunk_is_hidden(prefix: bytes) -> None:
    event = prefix + b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}  '
    assert strip_usage_events(CONTENT + event + b"\n\n" + DONE_EVENT) == (
        CONTENT + DONE_EVENT,
        Usage(3, 5),
    )


# (Not the form feed: str.splitlines ends a line there, so the tail never sees that line whole.)
@pytest.mark.parametrize("prefix", DATA_SPELLINGS[:-1])
def test_every_data_line_spelling_of_the_usage_chunk_is_counted(prefix: bytes) -> None:
    event = prefix + b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}  '
    assert usage_from_sse_tail([CONTENT, event + b"\n\n", DONE_EVENT], 1000) == Usage(3, 5)


def test_a_usage_object_nested_in_a_message_is_counted_and_the_event_kept() -> None:
    # /v1/messages' message_start carries usage inside its message, not at the top.
    event = b'data: {"type":"message_start","message":{"id":"m1","usage":{"input_tokens":9}}}'
    left, found = strip_usage_events(event + b"\n\n")
    assert found == Usage(9, 0)
    assert json.loads(left.partition(b"\n\n")[0][6:]) == json.loads(event[6:])


def test_a_fresh_cutter_keeps_a_leading_line_end() -> None:
    # No CR came before the first read: its leading LF is a line end of its own.
    cutter = EventCutter(1000, hide_usage=False)
    assert cutter.feed(b"\ndata: a\n\n") == b"\ndata: a\n\n"
    cutter = EventCutter(1000, hide_usage=False)
    assert cutter.feed(b"\n") == b""
    assert cutter.feed(b"\ndata: a\n\n") == b"\n\ndata: a\n\n"


def test_after_the_rest_is_taken_the_limit_counts_from_zero() -> None:
    cutter = EventCutter(LIMIT, hide_usage=False)
    cutter.feed(b"data: unfinished")
    assert cutter.rest() == b"data: unfinished"
    assert cutter.feed(b"x" * (LIMIT - 1)) == b""
    assert not cutter.too_large
    assert cutter.rest() == b"x" * (LIMIT - 1)


# ---- a stream's first event, and its usage merged with the last one's -----------------------

MESSAGE_START = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"usage":{"input_tokens":23,"output_tokens":1}}}'
    b"\n\n"
)


@pytest.mark.parametrize(
    ("head", "ended"),
    [
        (MESSAGE_START, True),
        (MESSAGE_START[:-1], False),
        (MESSAGE_START.replace(b"\n", b"\r\n"), True),
        (MESSAGE_START.replace(b"\n", b"\r\n")[:-2], False),
        # A CR alone ends a line: CRLF and CR are two line ends, whatever comes next.
        (MESSAGE_START.replace(b"\n", b"\r\n")[:-1], True),
        (MESSAGE_START.replace(b"\n", b"\r"), True),
        (b"data: x\r\n\n", True),
        (b"data: x\r\r\n", True),
        (b"", False),
        (b"\n", False),
    ],
)
def test_whether_the_first_event_has_ended(head: bytes, ended: bool) -> None:
    assert first_event_ended(head) is ended


class TestUsageFromTheHead:
    def test_message_start_gives_the_prompt(self) -> None:
        assert usage_from_sse_head(MESSAGE_START, 1000) == Usage(23, 1)

    @pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
    def test_every_line_end(self, end: bytes) -> None:
        assert usage_from_sse_head(MESSAGE_START.replace(b"\n", end), 1000) == Usage(23, 1)

    def test_the_first_usage_wins(self) -> None:
        later = b'data: {"usage":{"input_tokens":99}}\n\n'
        assert usage_from_sse_head(MESSAGE_START + later, 1000) == Usage(23, 1)
        assert usage_from_sse_head(later + MESSAGE_START, 1000) == Usage(99, 0)

    @pytest.mark.parametrize(
        "before",
        [
            b'data: {"choices":[{"delta":{"content":"no usage"}}]}\n\n',
            b'data: {"usage": null}\n\n',
            b'data: {"usage": broken\n\n',
            b': "usage" in a comment\n\n',
            b'"usage":{"input_tokens":99}\n\n',
        ],
    )
    def test_lines_that_give_no_usage_are_passed_over(self, before: bytes) -> None:
        assert usage_from_sse_head(before + MESSAGE_START, 1000) == Usage(23, 1)
        assert usage_from_sse_head(before, 1000) is None

    def test_only_the_first_max_event_bytes_are_read(self) -> None:
        size = len(MESSAGE_START) - 2  # the line, without its blank line
        assert usage_from_sse_head(MESSAGE_START, size) == Usage(23, 1)
        assert usage_from_sse_head(MESSAGE_START, size - 1) is None

    def test_bytes_that_are_no_utf8_do_not_break_it(self) -> None:
        assert usage_from_sse_head(b"data: \xff\n\n" + MESSAGE_START, 1000) == Usage(23, 1)


class TestMergingTheFirstAndLastUsage:
    def test_the_prompt_from_the_first_the_answer_from_the_last(self) -> None:
        assert merge_usage(Usage(23, 1), Usage(0, 15)) == Usage(23, 15)

    def test_each_count_is_the_larger(self) -> None:
        # Anthropic's message_delta may repeat input_tokens: cumulative, never smaller.
        assert merge_usage(Usage(23, 1), Usage(25, 15)) == Usage(25, 15)
        assert merge_usage(Usage(23, 20), Usage(5, 15)) == Usage(23, 20)

    def test_one_side_missing_is_the_other(self) -> None:
        assert merge_usage(None, Usage(3, 5)) == Usage(3, 5)
        assert merge_usage(Usage(3, 5), None) == Usage(3, 5)
        assert merge_usage(None, None) is None

    def test_a_zero_usage_still_merges(self) -> None:
        assert merge_usage(Usage(0, 0), Usage(0, 0)) == Usage(0, 0)
        assert merge_usage(Usage(4, 0), Usage(0, 0)) == Usage(4, 0)
        assert merge_usage(Usage(0, 0), Usage(0, 6)) == Usage(0, 6)


# ---- a large JSON answer's usage, from its tail --------------------------------------------


class TestUsageInTheTail:
    def test_a_flat_usage_object(self) -> None:
        assert usage_in_tail(b'{"x":1,"usage":{"prompt_tokens":3}}') == counts(3, 0)

    def test_objects_inside_the_usage_object(self) -> None:
        text = b'{"usage": {"input_tokens":3,"input_tokens_details":{"cached_tokens":1}}}'
        assert usage_in_tail(text) == counts(3, 0)

    def test_objects_two_levels_down_are_no_usage(self) -> None:
        assert usage_in_tail(b'"usage":{"a":{"b":{"c":1}}}') is None

    def test_a_nested_object_may_hold_1024_bytes(self) -> None:
        inner = b'{"k":"' + b"x" * (1024 - 8) + b'"}'
        assert len(inner) - 2 == 1022
        fits = b'"usage":{"output_tokens":4,"d":' + inner + b"}"
        assert usage_in_tail(fits) == counts(0, 4)
        inner = b'{"k":"' + b"x" * (1024 - 5) + b'"}'
        assert len(inner) - 2 == 1025
        assert usage_in_tail(b'"usage":{"output_tokens":4,"d":' + inner + b"}") is None


class TestAnEchoedUsageObjectInTheTail:
    """A caller's own usage object, echoed after the real one (a response's metadata), must
    not set the caller's charge: each count is the largest any object in the tail says."""

    REAL = b'"usage":{"input_tokens":900,"output_tokens":300,"d":{"e":0}}'

    def test_a_smaller_echo_after_the_real_usage_does_not_lower_it(self) -> None:
        echo = b',"metadata":{"usage":{"input_tokens":1,"output_tokens":0}}}'
        assert usage_in_tail(b'{"response":{' + self.REAL + b"}" + echo) == counts(900, 300)

    def test_a_smaller_echo_before_it_does_not_either(self) -> None:
        echo = b'"usage": {"prompt_tokens":1,"completion_tokens":0}'
        assert usage_in_tail(echo + b"," + self.REAL) == counts(900, 300)

    def test_each_count_is_the_largest_of_any_object(self) -> None:
        text = b'"usage":{"input_tokens":5,"output_tokens":70} "usage":{"input_tokens":60}'
        assert usage_in_tail(text) == counts(60, 70)

    def test_another_spelling_cannot_shadow_the_real_counts(self) -> None:
        # merged field by field, prompt_tokens=1 would hide the real input_tokens=900
        echo = b'"usage":{"prompt_tokens":1,"completion_tokens":0}'
        assert usage_in_tail(self.REAL + b"," + echo) == counts(900, 300)

    @pytest.mark.parametrize("bad", [b"-5", b"true", b"1e9", b"4294967296", b'"9"'])
    def test_an_object_with_an_implausible_count_is_passed_over(self, bad: bytes) -> None:
        text = self.REAL + b' "usage":{"input_tokens":' + bad + b',"output_tokens":1000}'
        assert usage_in_tail(text) == counts(900, 300)

    def test_only_implausible_objects_are_no_usage(self) -> None:
        assert usage_in_tail(b'"usage":{"input_tokens":-1}') is None

    def test_an_object_nested_too_deep_is_passed_over(self) -> None:
        # within what the pattern matches (4096 characters), beyond what json.loads recurses
        deep = b'"usage":{"a":' + b"[" * 2000 + b"]" * 2000 + b"}"
        assert usage_in_tail(self.REAL + b" " + deep) == counts(900, 300)
        assert usage_in_tail(deep) is None

    def test_the_large_answer_path_charges_the_real_usage(self) -> None:
        echo = b',"metadata":{"usage":{"input_tokens":1,"output_tokens":0}}}'
        event = b'data: {"response":{"output":"' + b"x" * 5000 + b'",' + self.REAL + b"}" + echo
        assert usage_from_sse_tail([event + b"\n\n"], 1000) == Usage(900, 300)


def counts(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion}


class TestWhichLinesAreParsed:
    """Only data lines that say "usage" are parsed, head and tail alike; the field's value
    starts right after "data:", with or without a space."""

    DEEP = b'data:{"usage":{"prompt_tokens":3,"completion_tokens":5,"d":{"e":{"f":1}}}}'

    def test_a_data_line_without_a_space(self) -> None:
        line = b'data:{"usage":{"input_tokens":23}}\n\n'
        assert usage_from_sse_head(line, 1000) == Usage(23, 0)
        # Too deep for the loose-object search: only the line's own parse finds it.
        assert usage_from_sse_tail([self.DEEP + b"\n\n"], 1000) == Usage(3, 5)

    def test_a_broken_last_line_does_not_hide_an_earlier_one(self) -> None:
        stream = self.DEEP + b'\n\ndata: {"usage" broken\n\n'
        assert usage_from_sse_tail([stream], 1000) == Usage(3, 5)

    def test_a_line_that_is_no_data_line_is_not_parsed(self) -> None:
        # Its value from the sixth character on would be JSON with a usage.
        other = b'xxxx:{"usage":{"input_tokens":99}}\n\n'
        assert usage_from_sse_head(other, 1000) is None
        assert usage_from_sse_head(other + MESSAGE_START, 1000) == Usage(23, 1)

    def test_a_data_line_that_does_not_say_usage_is_not_parsed_in_the_head(self) -> None:
        escaped = b'data: {"\\u0075sage":{"input_tokens":99}}\n\n'
        assert usage_from_sse_head(escaped, 1000) is None
        assert usage_from_sse_head(escaped + MESSAGE_START, 1000) == Usage(23, 1)


# ---- hostile counts and nesting ------------------------------------------------------------

COUNT_FIELDS = [
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
]
IMPLAUSIBLE = [-1, -1_000_000, True, False, 3.0, 3.5, MAX_TOKEN_COUNT + 1, 2**64, "3"]


class TestImplausibleCountsAreNotSaid:
    """A negative count would refund a budget and a huge one fail the usage flush: any count
    that is no plausible token count makes the object "not said", and the estimate applies."""

    @pytest.mark.parametrize("field", COUNT_FIELDS)
    @pytest.mark.parametrize("bad", IMPLAUSIBLE, ids=repr)
    def test_alone(self, field: str, bad: object) -> None:
        assert usage_from_payload({"usage": {field: bad}}) is None
        assert usage_from_payload({"message": {"usage": {field: bad}}}) is None
        assert usage_from_payload({"response": {"usage": {field: bad}}}) is None

    @pytest.mark.parametrize("field", COUNT_FIELDS)
    @pytest.mark.parametrize("bad", IMPLAUSIBLE, ids=repr)
    def test_beside_plausible_counts(self, field: str, bad: object) -> None:
        usage: dict[str, object] = {"prompt_tokens": 5, "completion_tokens": 7, field: bad}
        assert usage_from_payload({"usage": usage}) is None

    @pytest.mark.parametrize("field", COUNT_FIELDS)
    def test_the_bound_itself_is_a_count(self, field: str) -> None:
        found = usage_from_payload({"usage": {field: MAX_TOKEN_COUNT}})
        assert found is not None
        assert MAX_TOKEN_COUNT in (found.prompt_tokens, found.completion_tokens)

    @pytest.mark.parametrize("field", COUNT_FIELDS)
    def test_zero_is_a_count(self, field: str) -> None:
        assert usage_from_payload({"usage": {field: 0}}) == Usage(0, 0)

    def test_the_bound_fits_sqlite_even_summed(self) -> None:
        assert MAX_TOKEN_COUNT == 2**31 - 1
        most = usage_from_payload({"usage": dict.fromkeys(COUNT_FIELDS, MAX_TOKEN_COUNT)})
        assert most == Usage(3 * MAX_TOKEN_COUNT, MAX_TOKEN_COUNT)
        assert most.prompt_tokens + most.completion_tokens < 2**63

    @pytest.mark.parametrize("field", COUNT_FIELDS)
    def test_null_is_a_count_not_named(self, field: str) -> None:
        """A ``null`` beside real counts (a delta naming a field it has no value for) must
        not throw the real counts away: that would charge a stream its first event only."""
        usage: dict[str, object] = {"prompt_tokens": 5, "completion_tokens": 7, field: None}
        found = usage_from_payload({"usage": usage})
        named = {"prompt_tokens": 5, "completion_tokens": 7}
        expected = usage_from_payload({"usage": {k: v for k, v in named.items() if k != field}})
        assert found == expected and found is not None

    def test_a_field_that_is_no_count_is_not_checked(self) -> None:
        usage = {"input_tokens": 3, "input_tokens_details": {"cached_tokens": -1}, "x": "y"}
        assert usage_from_payload({"usage": usage}) == Usage(3, 0)

    @pytest.mark.parametrize("bad", [b"-1000000", b"true", b"18446744073709551616", b"1.0"])
    def test_in_a_stream(self, bad: bytes) -> None:
        line = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":' + bad + b"}}"
        assert usage_from_sse_tail([line + b"\n\n"], 1000) is None
        assert usage_from_sse_head(line + b"\n\n", 1000) is None
        _, found = strip_usage_events(line)
        assert found is None


DEEP = b"data: " + b'{"usage":' + b"[" * 60_000


class TestNestingTooDeepIsNoUsage:
    """60,000 "[" make json.loads raise RecursionError, which is no ValueError: each parser
    takes such a line for what it is, no usage, and goes on."""

    def test_the_head(self) -> None:
        assert usage_from_sse_head(DEEP + b"\n\n", 100_000) is None
        assert usage_from_sse_head(DEEP + b"\n" + USAGE_LINE + b"\n\n", 100_000) == Usage(3, 5)

    def test_the_tail(self) -> None:
        assert usage_from_sse_tail([DEEP + b"\n\n"], 100_000) is None
        assert usage_from_sse_tail([USAGE_LINE + b"\n\n" + DEEP + b"\n\n"], 100_000) == Usage(3, 5)

    def test_hiding_usage(self) -> None:
        event = DEEP.replace(b'{"usage":', b'{"usage":{')
        assert strip_usage_events(event) == (event, None)

    def test_the_cutter(self) -> None:
        cutter = EventCutter(100_000, hide_usage=True)
        event = DEEP.replace(b'{"usage":', b'{"usage":{') + b"\n\n"
        assert cutter.feed(event) == event
        assert cutter.usage is None
