"""A request that waits for its turn in the fair queue, through Forwarder.post's ``wait_turn``
hook and the stream relay's ``notify``.

A real aiohttp server forwards to the fake LM Studio (both on loopback) through one Forwarder
and a real FairQueue with one slot; the test holds that slot to make LM Studio "busy". A stream
that waits is told its place in SSE comments, keeps its heartbeats, and ends with an error
event when its wait ends in an error after a notice went out; a request refused before any
notice is a plain JSON answer. A waiter that hangs up or is aborted leaves the queue, and LM
Studio is never asked for it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import sse_events
from tests.unit.gateway.upstream.test_streaming_slow_client import SlowClient
from tray_app.config.settings import Config
from tray_app.gateway import api_errors as errors
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.chat_api import CHAT_ROUTE
from tray_app.gateway.fair_queue import FairQueue, Notify, Turn
from tray_app.gateway.upstream.client import session_context
from tray_app.gateway.upstream.forwarding import Forwarder, Outcome
from tray_app.gateway.upstream.streaming import HEARTBEAT, StreamRelay, _HeartbeatPump

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
REVOKED = errors.credential_revoked()
MakeRig = Callable[..., Awaitable["QueueRig"]]


class QueueRig:
    """A gateway-shaped server: each POST waits its turn (caller from the X-Caller header),
    then is forwarded; the turn is given back when the handler ends, as the gateway does."""

    def __init__(self, fake: FakeLMStudio, *, heartbeat: float = 0.0, max_wait: float = 10) -> None:
        self.config = Config(upstream_url=fake.url, streaming_heartbeat_interval=heartbeat)
        self.forwarder = Forwarder(self.config, lambda: False)
        self.queue = FairQueue(slots=1, per_caller=1, max_waiting=4, max_waiting_per_client=4)
        self.max_wait = max_wait
        self.outcomes: list[Outcome] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.cleanup_ctx.append(session_context(self.config))
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/"

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        caller = request.headers.get("X-Caller", "someone")
        stream = request.headers.get("X-Stream") == "1"
        turns: list[Turn] = []

        async def wait_turn(notify: Notify | None, upstream: str) -> None:
            turn = self.queue.try_acquire(caller)
            if turn is None:
                turn = await self.queue.acquire(
                    caller, "127.0.0.1", max_wait=self.max_wait, notify=notify
                )
            turns.append(turn)

        outcome = Outcome()
        self.outcomes.append(outcome)
        body = {**CHAT, "stream": stream}
        try:
            return await self.forwarder.post(
                request,
                "req-queue",
                CHAT_ROUTE,
                json.dumps(body).encode(),
                stream=stream,
                outcome=outcome,
                extra_headers=None,
                hide_usage=False,
                wait_turn=wait_turn,
            )
        except ApiError as err:  # what the gateway's error middleware does
            return err.to_response("req-queue")
        finally:
            for turn in turns:
                self.queue.release(turn)

    def relay(self, n: int = -1) -> StreamRelay:
        relay = self.outcomes[n].relay
        assert relay is not None
        return relay


@pytest.fixture
async def make_rig(fake_lmstudio: FakeLMStudio) -> AsyncIterator[MakeRig]:
    rigs: list[QueueRig] = []

    async def make(**options: float) -> QueueRig:
        rig = QueueRig(fake_lmstudio, **options)
        await rig.start()
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.stop()


async def _post(url: str, caller: str, *, stream: bool = True) -> tuple[int, dict[str, str], bytes]:
    headers = {"X-Caller": caller, "X-Stream": "1" if stream else "0"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as r,
    ):
        return r.status, dict(r.headers), await r.read()


async def _eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _comments(body: bytes) -> list[str]:
    return [line[1:].strip() for line in body.decode().splitlines() if line.startswith(":")]


def _ends_with_one_error(body: bytes, code: str) -> None:
    found = [json.loads(e) for e in sse_events(body) if e != "[DONE]"]
    assert [e["error"]["code"] for e in found if "error" in e] == [code]
    last_event = body[body.rindex(b"data: ") :]
    assert b'"error"' in last_event and last_event.count(b"\n\n") == 1


# ---- a stream that waits ---------------------------------------------------------------------


async def test_a_waiting_stream_is_told_its_place_then_gets_its_answer(
    make_rig: MakeRig, fake_lmstudio: FakeLMStudio
) -> None:
    rig: QueueRig = await make_rig()
    busy = rig.queue.try_acquire("owner")
    assert busy is not None
    first = asyncio.create_task(_post(rig.url, "alice"))
    await _eventually(lambda: rig.queue.waiting == 1)
    second = asyncio.create_task(_post(rig.url, "bob"))
    await _eventually(lambda: rig.queue.waiting == 2)
    await asyncio.sleep(0.1)
    assert fake_lmstudio.received == []  # nobody waiting has reached LM Studio
    rig.queue.release(busy)
    (status1, headers1, body1), (status2, _, body2) = await asyncio.gather(first, second)
    assert (status1, status2) == (200, 200)
    assert headers1["Content-Type"].startswith("text/event-stream")
    assert body1.startswith(b": waiting, 0 ahead\n\n")
    assert _comments(body1) == ["waiting, 0 ahead"]
    assert _comments(body2) == ["waiting, 1 ahead", "waiting, 0 ahead"]
    for body in (body1, body2):
        assert sse_events(body)[-1] == "[DONE]"
        assert "tok0" in body.decode()
    assert rig.relay(0).bytes_out == len(body1)
    assert rig.queue.busy == 0 and rig.queue.waiting == 0


async def test_a_stream_with_a_free_slot_gets_no_notice(
    make_rig: MakeRig,
) -> None:
    rig: QueueRig = await make_rig()
    status, _, body = await _post(rig.url, "alice")
    assert status == 200
    assert _comments(body) == []
    assert body.startswith(b"data: ")


async def test_heartbeats_go_on_while_a_stream_waits(make_rig: MakeRig) -> None:
    rig: QueueRig = await make_rig(heartbeat=0.05)
    busy = rig.queue.try_acquire("owner")
    assert busy is not None
    waiting = asyncio.create_task(_post(rig.url, "alice"))
    await _eventually(lambda: rig.queue.waiting == 1)
    await asyncio.sleep(0.4)
    rig.queue.release(busy)
    status, _, body = await waiting
    assert status == 200
    comments = _comments(body)
    assert comments[0] == "waiting, 0 ahead"
    assert comments[1:].count("keep-alive") >= 3
    assert sse_events(body)[-1] == "[DONE]"


async def test_a_stream_whose_wait_runs_out_after_a_notice_ends_with_the_error_event(
    make_rig: MakeRig, fake_lmstudio: FakeLMStudio
) -> None:
    rig: QueueRig = await make_rig(max_wait=0.2)
    busy = rig.queue.try_acquire("owner")
    assert busy is not None
    status, _, body = await _post(rig.url, "alice")
    assert status == 200  # the notice committed the stream
    assert body.startswith(b": waiting, 0 ahead\n\n")
    _ends_with_one_error(body, "queue_timeout")
    assert rig.relay().error == "queue_timeout"
    assert rig.queue.waiting == 0
    assert fake_lmstudio.received == []
    rig.queue.release(busy)


async def test_a_stream_refused_before_waiting_is_a_plain_json_answer(
    make_rig: MakeRig,
) -> None:
    rig: QueueRig = await make_rig()
    rig.queue = FairQueue(slots=1, per_caller=1, max_waiting=0, max_waiting_per_client=0)
    busy = rig.queue.try_acquire("owner")
    assert busy is not None
    status, headers, body = await _post(rig.url, "alice")
    assert status == 429
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "queue_full"
    assert "Retry-After" in headers
    rig.queue.release(busy)


async def test_an_abort_while_waiting_leaves_the_queue_and_ends_the_stream(
    make_rig: MakeRig, fake_lmstudio: FakeLMStudio
) -> None:
    rig: QueueRig = await make_rig()
    busy = rig.queue.try_acquire("owner")
    assert busy is not None
    waiting = asyncio.create_task(_post(rig.url, "alice"))
    await _eventually(lambda: rig.queue.waiting == 1 and rig.relay().committed)
    rig.relay().abort(REVOKED)
    status, _, body = await waiting
    assert status == 200
    assert _comments(body) == ["waiting, 0 ahead"]
    _ends_with_one_error(body, REVOKED.code)
    assert rig.queue.waiting == 0
    rig.queue.release(busy)
    await asyncio.sleep(0.05)
    assert fake_lmstudio.received == []  # the slot freed later went to nobody
    assert rig.queue.busy == 0


async def test_a_client_that_hangs_up_while_waiting_leaves_the_queue_at_once(
    make_rig: MakeRig, fake_lmstudio: FakeLMStudio
) -> None:
    rig: QueueRig = await make_rig()
    busy = rig.queue.try_acquire("owner")
    assert busy is not None
    async with aiohttp.ClientSession() as s:
        response = await s.post(rig.url, headers={"X-Caller": "alice", "X-Stream": "1"})
        assert await response.content.readuntil(b"\n\n") == b": waiting, 0 ahead\n\n"
        response.close()  # the client gives up
    await _eventually(lambda: rig.queue.waiting == 0, timeout=1.0)
    rig.queue.release(busy)
    await asyncio.sleep(0.05)
    assert fake_lmstudio.received == []
    assert rig.queue.busy == 0


# ---- a request without streaming ------------------------------------------------------------


async def test_a_plain_request_waits_then_gets_its_answer(
    make_rig: MakeRig, fake_lmstudio: FakeLMStudio
) -> None:
    rig: QueueRig = await make_rig()
    busy = rig.queue.try_acquire("owner")
    assert busy is not None
    waiting = asyncio.create_task(_post(rig.url, "alice", stream=False))
    await _eventually(lambda: rig.queue.waiting == 1)
    await asyncio.sleep(0.05)
    assert fake_lmstudio.received == []
    rig.queue.release(busy)
    status, headers, body = await waiting
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["choices"]
    assert rig.queue.busy == 0


async def test_a_plain_request_that_waits_too_long_gets_a_json_503(
    make_rig: MakeRig, fake_lmstudio: FakeLMStudio
) -> None:
    rig: QueueRig = await make_rig(max_wait=0.1)
    busy = rig.queue.try_acquire("owner")
    assert busy is not None
    status, headers, body = await _post(rig.url, "alice", stream=False)
    assert status == 503
    assert json.loads(body)["error"]["code"] == "queue_timeout"
    assert headers["Retry-After"] == "2"
    assert fake_lmstudio.received == []
    rig.queue.release(busy)


# ---- notify on its own ------------------------------------------------------------------------


async def test_notify_sends_one_line_and_not_the_same_twice(
    make_rig: MakeRig,
) -> None:
    # A line break would end the comment and let the rest read as an SSE field.
    rig: QueueRig = await make_rig()
    busy = rig.queue.try_acquire("owner")
    assert busy is not None
    waiting = asyncio.create_task(_post(rig.url, "alice"))
    await _eventually(lambda: rig.queue.waiting == 1 and rig.relay().committed)
    relay = rig.relay()
    sent = relay.bytes_out
    relay.notify("waiting, 0 ahead")  # what it was already told
    relay.notify("two\nlines\r\ndata: {}")
    await _eventually(lambda: relay.bytes_out > sent)
    rig.queue.release(busy)
    status, _, body = await waiting
    assert status == 200
    assert _comments(body) == ["waiting, 0 ahead", "two lines data: {}"]
    assert "{}" not in sse_events(body)
    relay.notify("after the end")  # the relay is done: nothing more is sent
    assert relay.bytes_out == len(body)


async def test_a_notice_during_a_slow_heartbeat_follows_it() -> None:
    client = SlowClient()
    client.hold_on = HEARTBEAT
    relay = _bare_relay(client, heartbeat=0.3)  # the next beat would come much later
    opened = asyncio.Event()

    async def open_upstream() -> aiohttp.ClientResponse:
        await asyncio.wait_for(client.holding.wait(), 2)
        relay.notify("waiting, 3 ahead")  # the beat's write is in progress
        opened.set()
        await asyncio.sleep(30)
        raise AssertionError("aborted before")

    task = asyncio.create_task(relay.run(open_upstream))
    await opened.wait()
    await asyncio.sleep(0.05)
    assert bytes(client.sent) == HEARTBEAT  # nothing written beside the held beat
    client.release()
    await _eventually(lambda: b"waiting" in client.sent, timeout=0.15)
    assert bytes(client.sent).startswith(HEARTBEAT + b": waiting, 3 ahead\n\n")
    relay.abort(REVOKED)
    await asyncio.wait_for(task, 2)
    assert client.headers_sent == 1
    assert bytes(client.sent).endswith(REVOKED.sse_event("req-bare"))


async def test_without_heartbeats_a_notice_during_a_slow_notice_follows_it_once() -> None:
    # The pump beats once more for the notice that came mid-write, and then writes nothing
    # until the next notice: no keep-alive, not the same notice again.
    client = SlowClient()
    client.hold_on = b"2 ahead"
    relay = _bare_relay(client, heartbeat=0.0)
    told = asyncio.Event()

    async def open_upstream() -> aiohttp.ClientResponse:
        relay.notify("waiting, 2 ahead")
        await asyncio.wait_for(client.holding.wait(), 2)
        relay.notify("waiting, 1 ahead")  # the first notice's write is in progress
        told.set()
        await asyncio.sleep(30)
        raise AssertionError("aborted before")

    task = asyncio.create_task(relay.run(open_upstream))
    await told.wait()
    client.release()
    notices = b": waiting, 2 ahead\n\n: waiting, 1 ahead\n\n"
    await _eventually(lambda: len(client.sent) >= len(notices), timeout=1.0)
    await asyncio.sleep(0.1)  # time for any further beat to be written
    assert bytes(client.sent) == notices
    relay.notify("waiting, 0 ahead")  # the pump still answers the next notice
    await _eventually(lambda: b"0 ahead" in client.sent, timeout=1.0)
    relay.abort(REVOKED)
    await asyncio.wait_for(task, 2)
    assert bytes(client.sent) == notices + b": waiting, 0 ahead\n\n" + REVOKED.sse_event("req-bare")
    assert client.headers_sent == 1


async def test_a_client_that_hangs_up_while_waiting_gets_no_more_beats_or_notices() -> None:
    # aiohttp cancels the handler when the client hangs up; the pump must stop with it, or
    # its timer would go on writing to a response nobody reads.
    client = SlowClient()
    relay = _bare_relay(client, heartbeat=0.02)
    waiting = asyncio.Event()

    async def open_upstream() -> aiohttp.ClientResponse:
        waiting.set()
        await asyncio.sleep(30)
        raise AssertionError("cancelled before")

    task = asyncio.create_task(relay.run(open_upstream))
    await waiting.wait()
    await _eventually(lambda: HEARTBEAT in client.sent, timeout=1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    sent = bytes(client.sent)
    relay.notify("waiting, 0 ahead")
    await asyncio.sleep(0.1)  # five beats' time
    assert bytes(client.sent) == sent
    assert sent.count(HEARTBEAT) * len(HEARTBEAT) == len(sent)  # whole beats only


async def test_a_notice_before_the_relay_runs_or_after_it_stopped_is_dropped() -> None:
    client = SlowClient()
    relay = _bare_relay(client, heartbeat=0.0)
    relay.notify("waiting, 1 ahead")  # no pump yet: the relay is not waiting
    pump = _HeartbeatPump(relay, 0.0)
    pump.cancel()
    pump.beat_now()
    await asyncio.sleep(0.02)
    assert client.sent == b"" and client.headers_sent == 0


def _bare_relay(client: SlowClient, *, heartbeat: float) -> StreamRelay:
    from aiohttp.test_utils import make_mocked_request

    return StreamRelay(
        make_mocked_request("POST", "/v1/chat/completions", writer=client),
        "req-bare",
        config=Config(streaming_heartbeat_interval=heartbeat),
        on_upstream=lambda _: None,
        read_whole=_never,
        is_stopping=lambda: False,
    )


async def _never(response: aiohttp.ClientResponse) -> web.Response:
    raise AssertionError("no plain answer here")
