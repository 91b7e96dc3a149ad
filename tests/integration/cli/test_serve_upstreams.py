"""`lmgate serve` with several upstreams, as a person sets it up: `lmgate upstream add`, then
serve. Its banner says each upstream's state after the start's probe, and /readyz names each
one's state from the first request on."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import Env, curl, start_serve


def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def banner(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("Press Ctrl-C"):
            return lines
    raise AssertionError("serve ended before its banner did: " + "\n".join(lines))


def test_serve_reports_each_upstream_and_readyz_names_their_states(
    env: Env, lmstudio_thread: FakeLMStudio
) -> None:
    gone = closed_url()
    env.vars["LMGATE_UPSTREAM_URL"] = lmstudio_thread.url
    added = env.run("upstream", "add", "desk", gone, "--weight", "3")
    assert added.returncode == 0, added.stderr
    proc, url = start_serve(env.vars)
    try:
        lines = banner(proc)
        text = "\n".join(lines)
        assert "Upstreams:   2, each probed in the background:" in text
        local = next(line for line in lines if " local " in line)
        assert lmstudio_thread.url in local and "up, 3 model(s)" in local
        desk = next(line for line in lines if " desk " in line)
        assert gone in desk and "DOWN:" in desk and "it gets nothing until it answers" in desk
        status, body = curl(url + "/readyz")
        assert status == 200
        assert json.loads(body) == {
            "status": "degraded",
            "upstreams": [{"name": "local", "state": "up"}, {"name": "desk", "state": "down"}],
            "database": "up",
        }
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert proc.returncode == 0


def test_serve_with_every_upstream_switched_off_says_so_and_asks_none(
    env: Env, lmstudio_thread: FakeLMStudio
) -> None:
    config = Path(env.vars["LMGATE_CONFIG"])
    config.write_text(
        f'[upstream]\nurl = "{lmstudio_thread.url}"\n\n[upstreams.local]\nenabled = false\n'
    )
    proc, url = start_serve(env.vars)
    try:
        text = "\n".join(banner(proc))
        assert "every one is switched off (enabled = false)" in text
        assert "NOT reachable" not in text
        status, body = curl(url + "/readyz")
        assert (status, json.loads(body)["status"]) == (503, "unavailable")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert proc.returncode == 0
    assert lmstudio_thread.received == [] and lmstudio_thread.native == []
