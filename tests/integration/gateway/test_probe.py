"""The one LM Studio probe, against the fake LM Studio on a real port: what it finds when LM
Studio answers, wants a token, is gone, or sends something that is not a model list."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.integration.control.test_service import config_for
from tray_app.control.service import GatewayService
from tray_app.gateway.upstream.probe import MODEL_LIST_MAX_BYTES, probe_lmstudio
from tray_app.secret_store.base import MemorySecretStore


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_running_lm_studio_is_ready_with_its_models(fake_lmstudio: FakeLMStudio) -> None:
    probe = await probe_lmstudio(fake_lmstudio.url + "/", "sk-lm-x")
    assert probe.ready and probe.answered and not probe.needs_token
    assert probe.models == MODELS
    assert probe.date, "the Date header is kept for doctor's clock check"
    assert probe.version is None, "only asked for when identifying"
    assert fake_lmstudio.paths == ["/v1/models"], "a trailing slash is not doubled"
    assert fake_lmstudio.received[0].headers["Authorization"] == "Bearer sk-lm-x"


async def test_without_a_token_no_authorization_is_sent(fake_lmstudio: FakeLMStudio) -> None:
    assert (await probe_lmstudio(fake_lmstudio.url, None)).ready
    assert "Authorization" not in fake_lmstudio.received[0].headers


async def test_identifying_asks_the_native_model_lists(fake_lmstudio: FakeLMStudio) -> None:
    probe = await probe_lmstudio(fake_lmstudio.url, None, identify=True)
    assert probe.version == "0.4"
    assert fake_lmstudio.paths == ["/v1/models", "/api/v1/models"]


async def test_a_refused_token_says_a_token_is_needed(fake_lmstudio: FakeLMStudio) -> None:
    fake_lmstudio.behaviour.require_token = "right"
    probe = await probe_lmstudio(fake_lmstudio.url, "wrong", identify=True)
    assert (probe.status, probe.needs_token, probe.ready, probe.models) == (401, True, False, None)
    assert fake_lmstudio.paths == ["/v1/models"], "nothing more is asked of a refusing server"
    assert (await probe_lmstudio(fake_lmstudio.url, "right")).ready


async def test_nothing_listening_is_no_answer_with_the_reason() -> None:
    probe = await probe_lmstudio(f"http://127.0.0.1:{closed_port()}", None)
    assert not probe.answered and not probe.ready and not probe.needs_token
    assert probe.failure == "ClientConnectorError"


async def test_a_malformed_url_is_named_as_such() -> None:
    probe = await probe_lmstudio("http://[::1", None)
    assert (probe.answered, probe.failure) == (False, "InvalidURL")


async def test_a_slow_lm_studio_is_given_up_on(fake_lmstudio: FakeLMStudio) -> None:
    fake_lmstudio.behaviour.header_delay = 2.0
    probe = await probe_lmstudio(fake_lmstudio.url, None, within=0.2)
    assert (probe.answered, probe.failure) == (False, "TimeoutError")


async def test_an_oversized_or_unreadable_model_list_is_no_model_list(
    fake_lmstudio: FakeLMStudio,
) -> None:
    fake_lmstudio.behaviour.json_bytes = MODEL_LIST_MAX_BYTES + 1
    probe = await probe_lmstudio(fake_lmstudio.url, None)
    assert probe.ready and probe.models is None, "it answers, but not with a list to trust"
    fake_lmstudio.behaviour.json_bytes = None
    fake_lmstudio.behaviour.gzip_json = True  # LM Gate asked for identity; this is garbage
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        probe = await probe_lmstudio(fake_lmstudio.url, None, session=session, within=None)
    assert probe.ready and probe.models is None


async def test_a_redirect_is_not_followed(fake_lmstudio: FakeLMStudio) -> None:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(fake_lmstudio.url + "/v1/models")

    app = web.Application()
    app.router.add_get("/v1/models", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        probe = await probe_lmstudio(f"http://127.0.0.1:{port}", "sk-lm-x")
    finally:
        await runner.cleanup()
    assert (probe.status, probe.ready, probe.models) == (307, False, None)
    assert fake_lmstudio.received == [], "LM Studio's token went nowhere else"


class HostileModels:
    """An LM Studio whose /v1/models answers 200 with a body of the test's choosing, sent in
    pieces ``gap`` seconds apart."""

    def __init__(self, body: bytes, *, pieces: int = 1, gap: float = 0.0) -> None:
        self.body, self.pieces, self.gap = body, pieces, gap
        self.asked = 0
        self._runner: web.AppRunner | None = None

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.asked += 1
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        step = max(1, len(self.body) // self.pieces)
        for start in range(0, len(self.body), step):
            await response.write(self.body[start : start + step])
            await asyncio.sleep(self.gap)
        await response.write_eof()
        return response

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


NESTED = b'{"data":' + b"[" * 200_000 + b"]" * 200_000 + b"}"


@pytest.mark.parametrize("body", [NESTED, b'{"data": [', b"\xff\xfe"])
async def test_a_hostile_model_list_is_no_model_list_and_never_an_exception(body: bytes) -> None:
    async with HostileModels(body) as url:
        probe = await probe_lmstudio(url, None)
    assert (probe.ready, probe.models, probe.failure) == (True, None, None)


async def test_a_start_against_a_hostile_model_list_starts(tmp_path: Path) -> None:
    async with HostileModels(NESTED) as url:
        service = GatewayService(config_for(tmp_path, url), store=MemorySecretStore())
        started = await service.start()
        try:
            assert started.lmstudio_reachable
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    async with session.get(started.url + "/readyz") as r:
                        assert (r.status, await r.json()) == (
                            200,
                            {
                                "status": "ready",
                                "upstreams": [{"name": "local", "state": "up"}],
                                "database": "up",
                            },
                        )
        finally:
            await service.stop()


async def test_readiness_reads_no_model_list_so_a_dribbling_body_cannot_make_it_late() -> None:
    async with HostileModels(b'{"data": []}' + b" " * 100, pieces=10, gap=0.5) as url:
        began = time.monotonic()
        probe = await probe_lmstudio(url, None, within=2.0, list_models=False)
        assert probe.ready and probe.models is None
        assert time.monotonic() - began < 1.0
        listing = await probe_lmstudio(url, None, within=2.0)
        assert (listing.answered, listing.failure) == (False, "TimeoutError")
