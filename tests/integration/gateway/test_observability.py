"""Request IDs, one JSON access line per request, health endpoints, and no secret in any log."""

from __future__ import annotations

import json
import re

import aiohttp
import openai
import pytest

from tests.conftest import CLIENT_KEY, LMSTUDIO_TOKEN, GatewayFactory, auth_headers
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import LogCapture, raw_request
from tray_app.gateway.server.runner import GatewayServer


async def test_sane_request_id_is_echoed_and_forwarded(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    response = await raw_request(
        gateway.port or 0, "GET", "/v1/models", {**auth_headers(), "X-Request-ID": "phone-42.a:b_c"}
    )
    assert response.headers["x-request-id"] == "phone-42.a:b_c"
    assert fake_lmstudio.received[0].headers["X-Request-ID"] == "phone-42.a:b_c"


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "<script>", "a;b", "évil", "a\tb"])
async def test_insane_request_id_is_replaced(gateway: GatewayServer, bad: str) -> None:
    response = await raw_request(gateway.port or 0, "GET", "/nope", {"X-Request-ID": bad})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


async def test_request_id_is_generated_when_absent(gateway: GatewayServer) -> None:
    first = await raw_request(gateway.port or 0, "GET", "/healthz")
    second = await raw_request(gateway.port or 0, "GET", "/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_one_json_access_line_per_request(client: openai.AsyncOpenAI) -> None:
    with LogCapture() as logs:
        await client.chat.completions.create(model=MODELS[0], messages=[])
        stream = await client.chat.completions.create(
            model=MODELS[0], messages=[], stream=True, stream_options={"include_usage": True}
        )
        async for _ in stream:
            pass
        with pytest.raises(openai.NotFoundError):
            await client.post("/nope", cast_to=object)
    lines = logs.access()
    assert len(lines) == 3
    plain, streamed, refused = lines
    for line in lines:
        assert {
            "time",
            "request_id",
            "principal",
            "method",
            "path",
            "status",
            "model",
            "latency_ms",
            "bytes_in",
            "bytes_out",
            "client",
        } <= set(line)
        assert line["latency_ms"] >= 0
    assert plain["principal"] == "owner" and plain["model"] == MODELS[0]
    assert (plain["status"], plain["prompt_tokens"], plain["completion_tokens"]) == (200, 7, 5)
    assert plain["bytes_in"] > 0 and plain["bytes_out"] > 0
    assert streamed["stream"] is True
    assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == (7, 5)
    assert (refused["status"], refused["path"], refused["principal"]) == (404, "/v1/nope", None)


async def test_no_secret_ever_reaches_the_log(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    wrong_key = "lmg_wrong_" + "z" * 30
    with LogCapture() as logs:
        server = await start_gateway()
        async with aiohttp.ClientSession() as s:
            for headers in (
                auth_headers(),
                auth_headers(wrong_key),
                {"X-API-Key": CLIENT_KEY},
                {"Authorization": f"Basic {CLIENT_KEY}"},
            ):
                for path in (
                    "/v1/models",
                    f"/v1/models?api_key={CLIENT_KEY}",
                    f"/api/v1/models/load?token={CLIENT_KEY}",
                ):
                    async with s.get(server.url + path, headers=headers) as r:
                        await r.read()
                async with s.post(
                    server.url + "/v1/chat/completions",
                    headers=headers,
                    json={"model": "m", "messages": [{"role": "user", "content": CLIENT_KEY}]},
                ) as r:
                    await r.read()
            fake_lmstudio.behaviour.status = 500  # errors are logged too
            async with s.post(
                server.url + "/v1/chat/completions", headers=auth_headers(), json={"model": "m"}
            ) as r:
                await r.read()
        await server.stop()
    text = logs.text
    assert len(logs.access()) == 4 * 4 + 1
    for secret in (CLIENT_KEY, LMSTUDIO_TOKEN, wrong_key):
        assert secret not in text


async def test_healthz_needs_no_auth_and_says_nothing_more(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    response = await raw_request(gateway.port or 0, "GET", "/healthz")
    assert response.status == 200
    assert response.json() == {"status": "ok"}
    assert fake_lmstudio.received == []


async def test_readyz_reports_whether_lm_studio_answers(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tray_app.gateway.app.READY_CACHE_SECONDS", 0.0)  # no cached answer
    server = await start_gateway()
    ready = await raw_request(server.port or 0, "GET", "/readyz")
    assert (ready.status, ready.json()) == (
        200,
        {"status": "ready", "upstreams": [{"name": "local", "state": "up"}], "database": "up"},
    )
    assert fake_lmstudio.received[0].headers["Authorization"] == f"Bearer {LMSTUDIO_TOKEN}"
    await fake_lmstudio.stop()
    down = await raw_request(server.port or 0, "GET", "/readyz")
    assert (down.status, down.json()) == (
        503,
        {
            "status": "unavailable",
            "upstreams": [{"name": "local", "state": "down"}],
            "database": "up",
        },
    )
    assert fake_lmstudio.url not in json.dumps(down.json())


async def test_a_log_record_is_always_one_line(gateway: GatewayServer) -> None:
    with LogCapture() as logs:
        refused = await raw_request(gateway.port or 0, "GET", "/v1/%E2%80%A8injected%0d%0aline")
        await raw_request(gateway.port or 0, "GET", "/v1/%E2%80%A8x")
    assert refused.json()["error"]["code"] == "path_not_allowed"  # ours, not aiohttp's page
    text = logs.text
    assert text.count("\n") == len(logs.access()) == 2
    assert "\u2028" not in text and "\r" not in text
