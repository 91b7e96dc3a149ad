"""Errors users can act on: each in OpenAI's shape, with a request ID, and the gateway lives on."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import CLIENT_KEY, GatewayFactory, auth_headers
from tests.fake_lmstudio import FakeLMStudio
from tray_app.gateway.server.runner import GatewayServer
from tray_app.identity.principal import Principal

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def chat(
    server: GatewayServer, **extra: object
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            server.url + "/v1/chat/completions", json={**CHAT, **extra}, headers=auth_headers()
        ) as r,
    ):
        return r.status, await r.json(), r.headers


async def healthy(server: GatewayServer) -> bool:
    async with aiohttp.ClientSession() as s, s.get(server.url + "/healthz") as r:
        return r.status == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_lm_studio_not_running_is_502_with_a_hint(
    start_gateway: GatewayFactory, stream: bool
) -> None:
    upstream = f"http://127.0.0.1:{closed_port()}"
    server = await start_gateway(upstream_url=upstream)
    status, payload, headers = await chat(server, stream=stream)
    assert status == 502
    error = payload["error"]
    assert error["code"] == "upstream_unreachable"
    # The hint, not the address: the owner's LAN is not the caller's business (the log has it).
    assert "Start" in error["message"] and upstream.rsplit(":", 1)[1] not in error["message"]
    assert error["request_id"] == headers["X-Request-ID"]
    assert await healthy(server)


async def test_openai_client_sees_the_hint(start_gateway: GatewayFactory) -> None:
    server = await start_gateway(upstream_url=f"http://127.0.0.1:{closed_port()}")
    async with openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0
    ) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.models.list()
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unreachable"
    assert "not reachable" in caught.value.message


async def test_upstream_timeout_is_504(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(upstream_idle_timeout=1.0)
    fake_lmstudio.behaviour.header_delay = 3
    status, payload, _ = await chat(server)
    assert (status, payload["error"]["code"]) == (504, "upstream_timeout")
    assert await healthy(server)


async def test_upstream_5xx_json_passes_through(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    fake_lmstudio.behaviour.status = 500
    status, payload, _ = await chat(gateway)
    assert status == 500
    # LM Studio's own error object, as it sent it: LM Gate adds no code of its own.
    assert payload["error"] == {"message": "fake error 500", "type": "server_error"}


async def test_upstream_5xx_text_is_wrapped_in_the_error_shape(
    gateway: GatewayServer, fake_lmstudio: FakeLMStudio
) -> None:
    fake_lmstudio.behaviour.status = 503
    fake_lmstudio.behaviour.error_body = b"Service busy, model loading"
    fake_lmstudio.behaviour.error_content_type = "text/plain"
    status, payload, _ = await chat(gateway)
    assert status == 503
    assert payload["error"]["code"] == "upstream_error"
    assert "model loading" in payload["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html>Internal proxy page</html>", "text/html"),
        (b'{"choices": [', "application/json"),
        (b"", "application/json"),
    ],
    ids=["html", "truncated-json", "empty"],
)
async def test_a_broken_success_answer_is_a_clear_502(
    gateway: GatewayServer,
    fake_lmstudio: FakeLMStudio,
    body: bytes,
    content_type: str,
    stream: bool,
) -> None:
    fake_lmstudio.behaviour.status = 200
    fake_lmstudio.behaviour.error_body = body
    fake_lmstudio.behaviour.error_content_type = content_type
    status, payload, headers = await chat(gateway, stream=stream)
    assert status == 502
    assert payload["error"]["code"] == "upstream_bad_response"
    assert payload["error"]["message"].startswith("LM Studio answered 200 with a body that is not")
    assert payload["error"]["request_id"] == headers["X-Request-ID"]
    fake_lmstudio.behaviour.status = None
    assert (await chat(gateway))[0] == 200  # and the gateway serves on


async def test_lm_studio_requiring_a_token_we_lack_is_explained(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    fake_lmstudio.behaviour.require_token = "the-right-token"
    server = await start_gateway(lmstudio_token="a-wrong-token")
    status, payload, _ = await chat(server)
    # Not a 401: the caller's own key was fine, and a 401 would send them looking there.
    assert status == 502
    assert payload["error"]["code"] == "upstream_auth_failed"
    assert "LM Studio token" in payload["error"]["message"]


async def test_response_over_the_cap_is_502(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(limits_max_response_bytes=1024)
    fake_lmstudio.behaviour.chunks = 500  # a long non-streamed answer
    status, payload, _ = await chat(server)
    assert (status, payload["error"]["code"]) == (502, "upstream_response_too_large")


def answer_of(size: int) -> bytes:
    """A chat answer of exactly ``size`` bytes, with usage."""
    shape = '{"choices":[{"message":{"role":"assistant","content":"%s"}}],' + (
        '"usage":{"prompt_tokens":3,"completion_tokens":4}}'
    )
    body = (shape % ("x" * (size - len(shape % "")))).encode()
    assert len(body) == size
    return body


async def test_an_answer_that_came_whole_is_held_to_the_cap_on_both_sides_of_it(
    start_gateway: GatewayFactory,
) -> None:
    # The head and the whole chunked answer in one write, so all of it is there before the
    # gateway reads it (the path that takes it without waiting); chunked, its size is known
    # only once it is read.
    limit = 4096
    sizes = iter([limit, limit + 1])

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        body = answer_of(next(sizes))
        half = len(body) // 2
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:]))
            + b"0\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = upstream.sockets[0].getsockname()[1]
        server = await start_gateway(
            upstream_url=f"http://127.0.0.1:{port}", limits_max_response_bytes=limit
        )
        status, payload, _ = await chat(server)
        assert status == 200 and payload["usage"]["completion_tokens"] == 4
        status, payload, _ = await chat(server)
        assert (status, payload["error"]["code"]) == (502, "upstream_response_too_large")
        assert await healthy(server)
    finally:
        upstream.close()
        await upstream.wait_closed()


class ExplodingAuthenticator:
    def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        raise RuntimeError("bug in an authenticator")


async def test_an_internal_bug_is_a_500_in_the_error_shape(
    start_gateway: GatewayFactory, fake_lmstudio: FakeLMStudio
) -> None:
    server = await start_gateway(authenticator=ExplodingAuthenticator())
    status, payload, headers = await chat(server)
    assert status == 500
    assert payload["error"]["code"] == "internal_error"
    assert headers["X-Request-ID"] in payload["error"]["message"]
    assert "bug in an authenticator" not in payload["error"]["message"]
    assert await healthy(server)
