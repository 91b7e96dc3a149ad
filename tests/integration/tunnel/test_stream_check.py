"""Proof that it streams (issue 20, point 4): the gateway's paced ``POST /stream-check``, the
tunnel's check of it through a public URL, the manager publishing the verdict, and `lmgate
check` reporting the same figures. All on real sockets: a real gateway on 127.0.0.1, and
in-process fake tunnel agents (tests/fake_agents/pipe.py) that stream each answer as it comes
or hold it until it is complete, as Cloudflare's quick tunnels do with some event streams."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_agents.pipe import Pipe
from tests.fake_lmstudio import FakeLMStudio
from tests.fakes import FakeTunnelProvider
from tests.helpers import LogCapture, build_request, free_port, raw_request, sse_events
from tray_app.cli.remote_check import check
from tray_app.control.going_public import tunnel_manager
from tray_app.gateway.app import Gateway
from tray_app.identity.principal import ALL_SCOPES, SCOPE_EMBEDDINGS
from tray_app.stream_pacing import EVENTS, INTERVAL_SECONDS, PATH, SPAN_SECONDS
from tray_app.tunnel.manager import TunnelManager, TunnelState, TunnelStatus
from tray_app.tunnel.stream_check import StreamCheck, check_stream, judge

SPAN_MS = SPAN_SECONDS * 1000
Pipes = Callable[..., Pipe]  # make(gateway_port, buffer_answers=...)


def gateway_of(rig: IdentityRig) -> Gateway:
    return rig.server.gateway


def port_of(rig: IdentityRig) -> int:
    assert rig.server.port is not None
    return rig.server.port


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory) -> IdentityRig:
    return await start_identity_gateway()


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    """Fake tunnel agents in front of a gateway port, closed after the test."""
    made: list[Pipe] = []

    def make(port: int, *, buffer_answers: bool) -> Pipe:
        agent = Pipe(0, "127.0.0.1", port, buffer_answers=buffer_answers)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()


def url_of(agent: Pipe) -> str:
    return f"http://127.0.0.1:{agent.port}"


def key_for(rig: IdentityRig, scopes: frozenset[str] = ALL_SCOPES) -> str:
    return rig.identity.api_keys.create("probe-test", scopes=scopes)[0]


async def probe(
    rig: IdentityRig,
    headers: dict[str, str],
    body: bytes = b"",
    *,
    method: str = "POST",
    path: str = PATH,
) -> tuple[int, dict[str, str], bytes]:
    answer = await raw_request(port_of(rig), method, path, headers, body)
    return answer.status, answer.headers, answer.body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_of(body: bytes) -> tuple[str, str]:
    error = json.loads(body)["error"]
    return error["type"], error["code"]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never came true"
        await asyncio.sleep(0.01)


# ---- the verdict ------------------------------------------------------------------------------


class TestTheVerdictIsTheSpreadNotTheLatency:
    def test_events_spread_as_sent_stream(self) -> None:
        arrivals = [10.0 + i * INTERVAL_SECONDS for i in range(EVENTS)]
        found = judge(arrivals, 10.0 - 0.042)
        assert (found.incremental, found.chunks) == (True, EVENTS)
        assert found.first_chunk_ms == pytest.approx(42)
        assert found.largest_gap_ms == pytest.approx(INTERVAL_SECONDS * 1000)
        assert found.describe() == "Streams: first chunk after 42 ms, largest gap 100 ms."

    def test_a_slow_tunnel_that_streams_still_streams(self) -> None:
        # Two seconds to the first event, then the server's pacing: far, not buffered.
        arrivals = [12.0 + i * INTERVAL_SECONDS for i in range(EVENTS)]
        assert judge(arrivals, 10.0).incremental

    def test_a_coalescing_tunnel_that_still_spreads_them_streams(self) -> None:
        arrivals = [10.0, 10.0, 10.0, 10.3, 10.3, 10.5]
        assert judge(arrivals, 9.9).incremental

    def test_events_that_arrive_together_are_one_piece_however_fast(self) -> None:
        arrivals = [10.0 + i * 0.001 for i in range(EVENTS)]
        found = judge(arrivals, 10.0 - 0.612)
        assert (found.incremental, found.chunks) == (False, EVENTS)
        assert found.describe() == (
            "This tunnel delivers streamed answers in one piece: people see each answer only "
            "when it is finished (first chunk after 612 ms, 6 chunks at once). For answers "
            "that appear as they are written, use ngrok, Tailscale or a named tunnel."
        )

    def test_half_the_pacing_is_the_line(self) -> None:
        just_under = [10.0] * (EVENTS - 1) + [10.0 + SPAN_SECONDS * 0.49]
        just_over = [10.0] * (EVENTS - 1) + [10.0 + SPAN_SECONDS * 0.51]
        assert (judge(just_under, 9.9).incremental, judge(just_over, 9.9).incremental) == (
            False,
            True,
        )

    def test_a_problem_says_it_could_not_check(self) -> None:
        found = StreamCheck(problem="not reachable: connection refused")
        assert not found.checked
        assert found.describe() == (
            "Could not check whether this tunnel streams: not reachable: connection refused."
        )


# ---- the check through real sockets -----------------------------------------------------------


class TestTheCheckThroughRealSockets:
    async def test_the_gateway_itself_streams(self, rig: IdentityRig) -> None:
        found = await check_stream(rig.url, gateway_of(rig).stream_probe_token)
        assert (found.problem, found.incremental, found.chunks) == ("", True, EVENTS)
        assert found.first_chunk_ms is not None and found.first_chunk_ms < SPAN_MS
        assert found.largest_gap_ms is not None
        assert INTERVAL_SECONDS * 1000 * 0.5 < found.largest_gap_ms < INTERVAL_SECONDS * 1000 * 5

    async def test_a_tunnel_that_buffers_is_found_out(self, rig: IdentityRig, pipes: Pipes) -> None:
        agent = pipes(port_of(rig), buffer_answers=True)
        found = await check_stream(url_of(agent), gateway_of(rig).stream_probe_token)
        assert (found.problem, found.incremental, found.chunks) == ("", False, EVENTS)
        # Nothing came before the whole answer was written.
        assert found.first_chunk_ms is not None and found.first_chunk_ms >= SPAN_MS * 0.9
        assert found.largest_gap_ms is not None and found.largest_gap_ms < INTERVAL_SECONDS * 500
        assert "in one piece" in found.describe()

    async def test_a_tunnel_that_streams_is_incremental(
        self, rig: IdentityRig, pipes: Pipes
    ) -> None:
        agent = pipes(port_of(rig), buffer_answers=False)
        found = await check_stream(url_of(agent), gateway_of(rig).stream_probe_token)
        assert (found.problem, found.incremental, found.chunks) == ("", True, EVENTS)
        assert found.describe().startswith("Streams: first chunk after ")

    async def test_nothing_listening_is_a_problem_not_an_exception(self) -> None:
        found = await check_stream(f"http://127.0.0.1:{free_port()}", "x")
        assert (found.problem, found.incremental, found.chunks) == (
            "not reachable: connection refused",
            False,
            0,
        )

    async def test_a_refused_token_is_a_problem_in_words(self, rig: IdentityRig) -> None:
        found = await check_stream(rig.url, "lmg_wrong_" + "k" * 33)
        assert found.problem.startswith("answered 401 invalid_api_key: "), found.problem
        assert "{" not in found.problem

    async def test_no_answer_in_time_is_a_problem(self, rig: IdentityRig) -> None:
        found = await check_stream(rig.url, gateway_of(rig).stream_probe_token, seconds=0.25)
        assert found.problem == "no complete answer within 0.25 s"
        assert not found.incremental

    async def test_something_other_than_lm_gate_is_a_problem(
        self, fake_lmstudio: FakeLMStudio
    ) -> None:
        found = await check_stream(fake_lmstudio.url, "x")
        assert (found.problem, found.chunks) == ("the answer was not an event stream", 0)


# ---- the manager ------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.states: list[TunnelStatus] = []

    def __call__(self, status: TunnelStatus) -> None:
        self.states.append(status)

    def checks(self) -> list[StreamCheck]:
        return [s.streaming for s in self.states if s.streaming is not None]


def manager_for(
    rig: IdentityRig, url: str, recorder: Recorder, **options: Any
) -> tuple[TunnelManager, FakeTunnelProvider]:
    provider = FakeTunnelProvider(url=url)
    check = partial(check_stream, token=gateway_of(rig).stream_probe_token)
    options.setdefault("stream_check", check)
    manager = TunnelManager(provider, port_of(rig), on_change=recorder, **options)
    return manager, provider


class TestTheManagerPublishesIt:
    async def test_a_streaming_tunnel_is_published_incremental(
        self, rig: IdentityRig, pipes: Pipes
    ) -> None:
        agent = pipes(port_of(rig), buffer_answers=False)
        recorder = Recorder()
        manager, _ = manager_for(rig, url_of(agent), recorder)
        status = await manager.start()
        # start() does not wait for the check: the URL works already.
        assert (status.state, status.streaming) == (TunnelState.PUBLIC, None)
        await until(lambda: bool(recorder.checks()))
        (found,) = recorder.checks()
        assert (found.problem, found.incremental) == ("", True)
        published = recorder.states[-1]
        assert (published.state, published.public_url, published.since) == (
            TunnelState.PUBLIC,
            url_of(agent),
            status.since,
        )
        assert manager.status.streaming == found
        await manager.stop()
        assert [s.state.value for s in recorder.states] == [
            "starting",
            "public",
            "public",
            "stopped",
        ]

    async def test_a_buffering_tunnel_is_published_and_warned_about(
        self, rig: IdentityRig, pipes: Pipes
    ) -> None:
        agent = pipes(port_of(rig), buffer_answers=True)
        recorder = Recorder()
        manager, _ = manager_for(rig, url_of(agent), recorder)
        with LogCapture() as logs:
            await manager.start()
            await until(lambda: bool(recorder.checks()))
        (found,) = recorder.checks()
        assert (found.problem, found.incremental, found.chunks) == ("", False, EVENTS)
        # Not fatal: the tunnel stays public.
        assert manager.status.state is TunnelState.PUBLIC
        warnings = [
            r for r in logs.records() if r["level"] == "warning" and "in one piece" in r["message"]
        ]
        assert len(warnings) == 1, logs.text
        assert gateway_of(rig).stream_probe_token not in logs.text
        await manager.stop()

    async def test_every_reconnect_checks_again(self, rig: IdentityRig, pipes: Pipes) -> None:
        agent = pipes(port_of(rig), buffer_answers=False)
        recorder = Recorder()
        manager, provider = manager_for(
            rig, url_of(agent), recorder, health_interval=60, backoff_start=0.05
        )
        await manager.start()
        await until(lambda: len(recorder.checks()) == 1)
        provider.lose("session closed")
        await until(lambda: len(recorder.checks()) == 2)
        reconnecting = [s for s in recorder.states if s.state is TunnelState.RECONNECTING]
        assert [s.streaming for s in reconnecting] == [None], "a new open starts unchecked"
        after = recorder.states.index(reconnecting[0])
        assert recorder.states[after + 1].streaming is None  # "public" again, not yet checked
        await manager.stop()
        assert [s.state.value for s in recorder.states] == [
            "starting",
            "public",
            "public",
            "reconnecting",
            "public",
            "public",
            "stopped",
        ]

    async def test_a_stop_during_the_check_cancels_it(self, rig: IdentityRig, pipes: Pipes) -> None:
        agent = pipes(port_of(rig), buffer_answers=True)
        began = asyncio.Event()
        cancelled: list[str] = []
        token = gateway_of(rig).stream_probe_token

        async def watched(url: str) -> StreamCheck:
            began.set()
            try:
                return await check_stream(url, token)
            except asyncio.CancelledError:
                cancelled.append(url)
                raise

        recorder = Recorder()
        manager, _ = manager_for(rig, url_of(agent), recorder, stream_check=watched)
        await manager.start()
        await began.wait()
        await until(lambda: bool(gateway_of(rig)._inflight))  # the probe reached the gateway
        await manager.stop()
        assert cancelled == [url_of(agent)]
        assert manager.status.state is TunnelState.STOPPED
        assert recorder.checks() == []
        # The gateway's side ends too: nothing is left running there.
        await until(lambda: not gateway_of(rig)._inflight)
        await asyncio.sleep(SPAN_SECONDS)
        assert recorder.checks() == []

    async def test_a_check_that_raises_is_logged_not_fatal(
        self, rig: IdentityRig, pipes: Pipes
    ) -> None:
        async def broken(url: str) -> StreamCheck:
            raise RuntimeError("boom")

        agent = pipes(port_of(rig), buffer_answers=False)
        recorder = Recorder()
        manager, _ = manager_for(rig, url_of(agent), recorder, stream_check=broken)
        with LogCapture() as logs:
            await manager.start()
            await until(lambda: "stream check failed" in logs.text)
        assert (manager.status.state, manager.status.streaming) == (TunnelState.PUBLIC, None)
        await manager.stop()

    async def test_going_public_checks_with_the_gateways_own_token(
        self, rig: IdentityRig, pipes: Pipes
    ) -> None:
        agent = pipes(port_of(rig), buffer_answers=False)
        recorder = Recorder()
        provider = FakeTunnelProvider(url=url_of(agent))
        manager = tunnel_manager(provider, rig.server, recorder)
        await manager.start()
        await until(lambda: bool(recorder.checks()))
        (found,) = recorder.checks()
        assert (found.problem, found.incremental) == ("", True)
        await manager.stop()


# ---- the probe route: who may call it ---------------------------------------------------------


class TestTheProbeRouteAuthenticates:
    async def test_no_credential_is_refused(self, rig: IdentityRig) -> None:
        status, _, body = await probe(rig, {})
        assert (status, *error_of(body)) == (401, "authentication_error", "missing_api_key")

    @pytest.mark.parametrize(
        ("wrong", "code"),
        [
            pytest.param(
                lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), "invalid_token", id="one-off"
            ),
            pytest.param(lambda t: t[:-1], "invalid_token", id="one-char-short"),
            pytest.param(lambda t: "", "invalid_authorization", id="empty"),
            # Long, within the gateway's header limit (beyond it: 431 before anyone asks).
            pytest.param(lambda t: t * 100, "invalid_token", id="very-long"),
        ],
    )
    async def test_a_wrong_probe_token_is_refused_as_any_unknown_credential(
        self, rig: IdentityRig, wrong: Callable[[str], str], code: str
    ) -> None:
        token = wrong(gateway_of(rig).stream_probe_token)
        status, _, body = await probe(rig, bearer(token))
        assert (status, *error_of(body)) == (401, "authentication_error", code)

    async def test_an_unknown_or_revoked_key_is_refused(self, rig: IdentityRig) -> None:
        status, _, body = await probe(rig, bearer("lmg_unknown_" + "k" * 33))
        assert (status, error_of(body)[1]) == (401, "invalid_api_key")
        key, record = rig.identity.api_keys.create("soon-revoked", scopes=ALL_SCOPES)
        rig.identity.api_keys.revoke(record.id)
        status, _, body = await probe(rig, bearer(key))
        assert (status, error_of(body)[1]) == (401, "api_key_revoked")

    async def test_failures_are_counted_with_every_other_route(
        self, start_identity_gateway: IdentityFactory
    ) -> None:
        rig = await start_identity_gateway(limits_auth_failures_per_minute=3)
        wrong = bearer(gateway_of(rig).stream_probe_token[::-1])
        for headers, method, path, code in (
            (wrong, "POST", PATH, "invalid_token"),
            (wrong, "GET", "/v1/models", "invalid_token"),
            ({}, "POST", PATH, "missing_api_key"),
        ):
            status, _, body = await probe(rig, headers, method=method, path=path)
            assert (status, error_of(body)[1]) == (401, code)
        status, _, body = await probe(rig, wrong)
        assert (status, error_of(body)[1]) == (429, "too_many_auth_failures")
        # The throttle slows guessing; the right token is still let in.
        status, _, _ = await probe(rig, bearer(gateway_of(rig).stream_probe_token))
        assert status == 200

    @pytest.mark.parametrize(
        ("method", "path", "body"),
        [
            ("GET", "/v1/models", b""),
            ("GET", "/v1/models/qwen2.5-7b-instruct", b""),
            (
                "POST",
                "/v1/chat/completions",
                b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
            ),
            ("POST", "/v1/embeddings", b'{"model": "m", "input": "hi"}'),
            ("GET", "/api/conversations", b""),
            ("POST", "/api/chat", b'{"message": "hi"}'),
            ("GET", "/metrics", b""),
        ],
    )
    async def test_the_probe_token_opens_no_other_route(
        self,
        rig: IdentityRig,
        fake_lmstudio: FakeLMStudio,
        method: str,
        path: str,
        body: bytes,
    ) -> None:
        headers = {**bearer(gateway_of(rig).stream_probe_token), "Content-Type": "application/json"}
        status, _, answer = await probe(rig, headers, body, method=method, path=path)
        # Refused as any unknown credential is: nothing says it is a probe token.
        assert (status, *error_of(answer)) == (401, "authentication_error", "invalid_token")
        assert fake_lmstudio.received == []

    async def test_the_probe_token_is_accepted(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio
    ) -> None:
        status, headers, body = await probe(rig, bearer(gateway_of(rig).stream_probe_token))
        assert status == 200, body
        assert headers["content-type"].startswith("text/event-stream")
        assert (headers["cache-control"], headers["x-accel-buffering"]) == ("no-cache", "no")
        assert "x-request-id" in headers
        events = sse_events(body)
        assert events[-1] == "[DONE]"
        assert [json.loads(e) for e in events[:-1]] == [
            {"n": i, "of": EVENTS} for i in range(1, EVENTS + 1)
        ]
        assert fake_lmstudio.received == [], "LM Studio is never asked"

    @pytest.mark.parametrize("scopes", [ALL_SCOPES, frozenset({SCOPE_EMBEDDINGS})])
    async def test_any_valid_key_is_accepted(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, scopes: frozenset[str]
    ) -> None:
        status, _, body = await probe(rig, bearer(key_for(rig, scopes)), b"{}")
        assert status == 200, body
        assert sse_events(body)[-1] == "[DONE]"
        assert fake_lmstudio.received == []

    async def test_the_probe_token_is_limited_like_any_caller(
        self, start_identity_gateway: IdentityFactory
    ) -> None:
        # It crosses the tunnel's edge, which sees it: it holds no more than a credential.
        rig = await start_identity_gateway(limits_concurrent_requests=1)
        token = bearer(gateway_of(rig).stream_probe_token)
        answers = await asyncio.gather(probe(rig, token), probe(rig, token))
        statuses = sorted(status for status, _, _ in answers)
        refused = next(body for status, _, body in answers if status != 200)
        assert (statuses, error_of(refused)[1]) == ([200, 429], "too_many_concurrent_requests")

    async def test_the_probe_token_is_never_logged(self, rig: IdentityRig) -> None:
        token = gateway_of(rig).stream_probe_token
        with LogCapture() as logs:
            assert (await probe(rig, bearer(token)))[0] == 200
            status, _, body = await probe(rig, bearer(token), method="GET", path="/v1/models")
            assert (status, error_of(body)[1]) == (401, "invalid_token")
            logs.wait_for_access(2)
        assert token not in logs.text
        line = logs.access()[0]
        assert (line["path"], line["status"], line["principal"]) == (PATH, 200, None)

    async def test_another_method_is_405(self, rig: IdentityRig) -> None:
        status, headers, body = await probe(rig, {}, method="GET")
        assert (status, error_of(body)[1], headers["allow"]) == (405, "method_not_allowed", "POST")


# ---- the probe route: what it takes -----------------------------------------------------------


class TestTheProbeRouteTakesAnEmptyBodyOrAnObject:
    @pytest.mark.parametrize("body", [b"", b"{}", b'{"any": ["thing"]}', b"  \n"])
    async def test_accepted(self, rig: IdentityRig, body: bytes) -> None:
        token = gateway_of(rig).stream_probe_token
        status, _, answer = await probe(rig, bearer(token), body)
        assert status == 200, answer

    @pytest.mark.parametrize(
        ("body", "status", "code"),
        [
            (b"not json", 400, "invalid_body"),
            (b"[1, 2]", 400, "invalid_body"),
            (b'"text"', 400, "invalid_body"),
            (b'{"a": 1, "a": 2}', 400, "invalid_body"),
            (b"\xff\xfe", 400, "invalid_body"),
            (b'{"x": "' + b"y" * 5000 + b'"}', 413, "body_too_large"),
        ],
    )
    async def test_refused_from_the_catalogue(
        self, rig: IdentityRig, body: bytes, status: int, code: str
    ) -> None:
        token = gateway_of(rig).stream_probe_token
        answer_status, _, answer = await probe(rig, bearer(token), body)
        assert (answer_status, error_of(answer)[1]) == (status, code)


# ---- a client that leaves ---------------------------------------------------------------------


async def test_a_client_that_hangs_up_mid_stream_leaves_nothing_running(
    rig: IdentityRig,
) -> None:
    gateway = gateway_of(rig)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(rig))
    writer.write(build_request("POST", PATH, port_of(rig), bearer(gateway.stream_probe_token)))
    await writer.drain()
    with LogCapture() as logs:
        seen = b""
        while b'"n": 1' not in seen:
            seen += await asyncio.wait_for(reader.read(4096), 5)
        assert gateway._inflight, "the stream runs"
        writer.close()
        await writer.wait_closed()
        await until(lambda: not gateway._inflight, timeout=SPAN_SECONDS * 4)
        (line,) = logs.wait_for_access(1)
    assert (line["path"], line["status"], line.get("error")) == (PATH, 499, "client_disconnected")
    stream_tasks = [t for t in asyncio.all_tasks() if "stream_probe" in repr(t.get_coro())]
    assert stream_tasks == []


# ---- `lmgate check` ---------------------------------------------------------------------------


class TestCheckReportsTheStream:
    """`lmgate check URL TOKEN` from anywhere: the same figures as the tunnel's own check."""

    async def run_check(self, url: str, key: str) -> tuple[str, bool]:
        return await asyncio.to_thread(check, url, key)

    async def test_a_gateway_that_streams_passes(self, rig: IdentityRig) -> None:
        out, ok = await self.run_check(rig.url, key_for(rig))
        assert ok, out
        found = re.search(
            r"^PASS\s+streams through\s+first chunk after (\d+) ms, largest gap (\d+) ms$",
            out,
            re.M,
        )
        assert found is not None, out
        assert int(found.group(2)) >= INTERVAL_SECONDS * 1000 * 0.5
        assert re.search(
            r"^PASS\s+streamed chat\s+first token after \d+ ms, largest gap \d+ ms$", out, re.M
        ), out

    async def test_through_a_tunnel_that_streams(self, rig: IdentityRig, pipes: Pipes) -> None:
        agent = pipes(port_of(rig), buffer_answers=False)
        out, _ = await self.run_check(url_of(agent), key_for(rig))
        assert re.search(r"^PASS\s+streams through\s+first chunk after \d+ ms", out, re.M), out

    async def test_through_a_tunnel_that_buffers_fails_the_step(
        self, start_identity_gateway: IdentityFactory, pipes: Pipes
    ) -> None:
        # The fake agent holds a bodiless answer (the preflight's 204) until the connection
        # closes: the gateway closes idle ones after a second, not thirty.
        rig = await start_identity_gateway(server_keepalive_timeout=1.0)
        agent = pipes(port_of(rig), buffer_answers=True)
        out, ok = await self.run_check(url_of(agent), key_for(rig))
        assert not ok
        assert re.search(
            rf"^FAIL\s+streams through\s+in one piece: {EVENTS} chunks at once after \d+ ms "
            r"\(people see each answer only when it is finished\)$",
            out,
            re.M,
        ), out
        assert "First cause: streams through: in one piece" in out

    async def test_a_refused_token_skips_it(self, rig: IdentityRig) -> None:
        out, ok = await self.run_check(rig.url, "lmg_wrong_" + "k" * 33)
        assert not ok
        assert re.search(r"^SKIP\s+streams through\s+the token was refused", out, re.M), out
        assert "First cause: models: 401 invalid_api_key" in out

    async def test_nothing_listening_skips_it(self) -> None:
        out, _ = await self.run_check(f"http://127.0.0.1:{free_port()}", "lmg_x")
        assert re.search(r"^SKIP\s+streams through\s+the gateway is not reachable$", out, re.M)


async def test_a_stop_that_will_not_wait_ends_the_stream_with_an_error_event(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start_identity_gateway(server_shutdown_grace=0.0)
    gateway, port = gateway_of(rig), port_of(rig)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(build_request("POST", PATH, port, bearer(gateway.stream_probe_token)))
    await writer.drain()
    seen = b""
    while b'"n": 1' not in seen:
        seen += await asyncio.wait_for(reader.read(4096), 5)
    stopping = asyncio.create_task(rig.server.stop())
    while not reader.at_eof():
        seen += await asyncio.wait_for(reader.read(4096), 5)
    await stopping
    writer.close()
    head, _, body = seen.partition(b"\r\n\r\n")
    # The headers went out with 200; the error is the stream's last event, not [DONE].
    (last,) = [e for e in re.findall(rb"data: (.+)\n\n", body) if b"error" in e]
    assert (head.split(b" ", 2)[1], json.loads(last)["error"]["code"]) == (
        b"200",
        "shutting_down",
    )
    assert b"[DONE]" not in body
    assert not gateway._inflight
