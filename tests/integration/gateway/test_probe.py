"""The one LM Studio probe, against the fake LM Studio on a real port: what it finds when LM
Studio answers, wants a token, is gone, or sends something that is not a model list."""

from __future__ import annotations

import socket

import aiohttp
from aiohttp import web

from tests.fake_lmstudio import MODELS, FakeLMStudio
from tray_app.gateway.upstream.probe import MODEL_LIST_MAX_BYTES, probe_lmstudio


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
