"""Real curl, streaming a chat through the gateway as a user would from a terminal."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from tests.conftest import CLIENT_KEY
from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import sse_events
from tray_app.gateway.server.runner import GatewayServer

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


async def test_curl_streams_a_chat(gateway: GatewayServer, fake_lmstudio: FakeLMStudio) -> None:
    fake_lmstudio.behaviour.chunks = 12
    body = json.dumps(
        {
            "model": "qwen2.5-7b-instruct",
            "stream": True,
            "messages": [{"role": "user", "content": "Hello"}],
        }
    )
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-N",
        "--fail-with-body",
        f"{gateway.url}/v1/chat/completions",
        "-H",
        f"Authorization: Bearer {CLIENT_KEY}",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    events = sse_events(out)
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "".join(f"tok{i} " for i in range(12))


async def test_curl_without_a_key_gets_a_readable_401(gateway: GatewayServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-w",
        "\n%{http_code}",
        f"{gateway.url}/v1/models",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    body, status = out.decode().rsplit("\n", 1)
    assert status == "401"
    assert "Authorization: Bearer" in json.loads(body)["error"]["message"]
