"""The fake ngrok agent is tested on its own, so tunnel tests stand on something honest."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import FAKE_NGROK_AGENT

AGENT = FAKE_NGROK_AGENT


def test_answers_version() -> None:
    out = subprocess.run([str(AGENT), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ngrok version 3.")


def start(config: dict[str, object], tmp_path: Path) -> subprocess.Popen[str]:
    path = tmp_path / "ngrok.yml"
    path.write_text(json.dumps(config))
    return subprocess.Popen(
        [str(AGENT), "start", "--none", "--log", "stdout", "--config", str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )


def read_until(proc: subprocess.Popen[str], marker: str) -> list[str]:
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            break
    return lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_serves_the_api_and_pipes_traffic(
    tmp_path: Path, fake_lmstudio: FakeLMStudio
) -> None:
    import asyncio

    web = free_port()
    proc = start(
        {"version": "3", "agent": {"authtoken": "x" * 30, "web_addr": f"127.0.0.1:{web}"}}, tmp_path
    )
    try:
        lines = await asyncio.to_thread(read_until, proc, "tunnel session started")
        assert any(f'msg="starting web service" obj=web addr=127.0.0.1:{web}' in ln for ln in lines)
        assert any("client session established" in ln for ln in lines)

        def api(
            method: str, path: str, body: dict[str, object] | None = None
        ) -> tuple[int, dict[str, Any]]:
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{web}{path}",
                data=data,
                method=method,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=5) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else {}

        status, created = await asyncio.to_thread(
            api,
            "POST",
            "/api/endpoints",
            {"name": "t", "upstream": {"url": fake_lmstudio.url}, "inspect": False},
        )
        assert status == 201 and created["public_url"].startswith("http://127.0.0.1:")

        def through() -> bytes:
            with urllib.request.urlopen(created["public_url"] + "/v1/models", timeout=5) as r:
                answer: bytes = r.read()
                return answer

        assert b"qwen2.5-7b-instruct" in await asyncio.to_thread(through)
        assert fake_lmstudio.paths == ["/v1/models"]
        _, listed = await asyncio.to_thread(api, "GET", "/api/endpoints")
        assert [e["name"] for e in listed["endpoints"]] == ["t"]
        status, _ = await asyncio.to_thread(api, "DELETE", "/api/endpoints/t")
        assert status == 204
    finally:
        proc.terminate()
        proc.wait(5)
        assert proc.stdout is not None
        proc.stdout.close()


def test_refuses_to_start_without_an_authtoken(tmp_path: Path) -> None:
    proc = start({"version": "3", "agent": {"web_addr": f"127.0.0.1:{free_port()}"}}, tmp_path)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert "lvl=eror" in out and "ERR_NGROK_4018" in out


def test_a_dropped_session_stops_accepting(tmp_path: Path) -> None:
    import os
    import time

    web = free_port()
    env = {**os.environ, "FAKE_NGROK_DROP_AFTER": "0.5"}
    path = tmp_path / "ngrok.yml"
    path.write_text(
        json.dumps(
            {"version": "3", "agent": {"authtoken": "x" * 30, "web_addr": f"127.0.0.1:{web}"}}
        )
    )
    proc = subprocess.Popen(
        [str(AGENT), "start", "--none", "--log", "stdout", "--config", str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        read_until(proc, "tunnel session started")
        request = urllib.request.Request(
            f"http://127.0.0.1:{web}/api/endpoints",
            method="POST",
            data=json.dumps({"name": "t", "upstream": {"url": "http://127.0.0.1:9"}}).encode(),
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            public = json.loads(r.read())["public_url"]
        port = int(public.rsplit(":", 1)[1])
        lines = read_until(proc, "session closed")
        assert "lvl=eror" in lines[-1]
        time.sleep(0.1)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "the endpoint must be gone"
        assert proc.poll() is None, "the agent itself lives on"
    finally:
        proc.terminate()
        proc.wait(5)
        assert proc.stdout is not None
        proc.stdout.close()
