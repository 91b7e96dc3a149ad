"""The Docker image, built from packaging/Dockerfile and run on a real engine (issue 16).

A private dockerd runs in a network namespace of the test's own (tests/docker_engine.py), so
"the host" below is that namespace: the checks reach the container the way a user's machine
does, through the published port, with the official openai SDK, and a fake LM Studio listens
where ``host.docker.internal`` points. The README's Docker section is run verbatim. The engine
and image fixtures are tests/shipping/conftest.py's (test_team_compose.py uses them too).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from tests.docker_engine import Engine
from tests.fake_lmstudio import Behaviour, FakeLMStudio
from tests.helpers import REPO_ROOT

IMAGE_EXTRA = "team"  # packaging/Dockerfile installs it
PORT = 8787  # the image's own: the namespace has it free
BASE = f"http://127.0.0.1:{PORT}"
GRACE = 15  # seconds docker stop waits; the gateway's server.shutdown_grace is 10
STREAM_CHUNKS, CHUNK_DELAY = 12, 0.25  # a 3-second answer, in flight when the stop comes
ANSWER = "".join(f"tok{i} " for i in range(STREAM_CHUNKS))  # what the fake LM Studio streams

pytestmark = pytest.mark.docker
IMAGE_MARKERS = {
    "extra": "",
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


@pytest.fixture(scope="module")
def lmstudio(engine: Engine) -> Iterator[FakeLMStudio]:
    fake = FakeLMStudio(Behaviour(chunks=STREAM_CHUNKS, chunk_delay=CHUNK_DELAY))
    # On every address of the namespace: containers reach it on the bridge, as
    # host.docker.internal (host-gateway).
    engine.loop.run(fake.start(host="0.0.0.0", port=1234))
    yield fake
    engine.loop.run(fake.stop())


def _wait_healthy(engine: Engine, timeout: float = 60) -> None:
    async def probe() -> int:
        async with aiohttp.ClientSession() as session, session.get(BASE + "/healthz") as r:
            return r.status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if engine.loop.run(probe(), timeout=10) == 200:
                return
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        time.sleep(0.3)
    logs = engine.docker("logs", "lmgate-test", check=False)
    raise AssertionError(f"no /healthz within {timeout} s: {logs.stdout}{logs.stderr}")


async def _stream_chat(key: str) -> tuple[str, bool]:
    """A streamed chat through the container with the official SDK: (text, whether it ended)."""
    client = openai.AsyncOpenAI(base_url=BASE + "/v1", api_key=key, max_retries=0)
    text, finished = [], False
    try:
        stream = await client.chat.completions.create(
            model="qwen2.5-7b-instruct",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finished = True
    finally:
        await client.close()
    return "".join(text), finished


async def _api(method: str, path: str, key: str, body: object = None) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, BASE + path, json=body, headers=headers) as r,
    ):
        return r.status, await r.json()


def test_the_image_is_small_and_holds_the_gateway_alone(engine: Engine, image: str) -> None:
    size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
    base = int(engine.docker("image", "inspect", "-f", "{{.Size}}", "python:3.11-slim").stdout)
    print(f"image {size / 1e6:.0f} MB, of which LM Gate adds {(size - base) / 1e6:.0f} MB")
    # About 60 MB with the team extra (psycopg's binary wheel brings its own libpq, ~13 MB).
    assert size - base < 70e6, "LM Gate's layers grew: a cache or build tool got in?"
    assert engine.docker("image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip() == (
        "10001"
    )
    # No source tree, wheel cache or installer in LM Gate's own parts of the image.
    leftovers = engine.docker(
        # As root: /root is private, and a check that cannot look would find nothing.
        "run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c",
        "test -r /root || echo unreadable; "
        "ls -d /src /root/.cache /data/.cache /opt/lmgate/bin/pip* 2>/dev/null; "
        "command -v gcc cc make; true",
    )  # fmt: skip
    assert leftovers.stdout.strip() == ""
    # Exactly the pinned dependencies, nothing more or less.
    listed = engine.docker(
        "run", "--rm", "--entrypoint", "/opt/lmgate/bin/python", image, "-c",
        "import importlib.metadata as m; "
        "print('\\n'.join(f\"{d.metadata['Name']}=={d.version}\" for d in m.distributions()))",
    ).stdout  # fmt: skip
    installed = {_normal(line) for line in listed.split() if not line.startswith("lmgate==")}
    assert installed == _locked()


def _normal(pin: str) -> str:
    name, _, version = pin.partition("==")
    return re.sub(r"[-_.]+", "-", name).lower() + "==" + version


def _locked() -> set[str]:
    text = (REPO_ROOT / "packaging" / "requirements.lock").read_text()
    return {_normal(line) for line in text.splitlines() if line and not line.startswith("#")}


def test_the_lock_pins_every_runtime_dependency_and_nothing_else() -> None:
    # The closure of pyproject.toml's dependencies with the team extra (one image serves one
    # machine and a team's replicas), from the installed metadata: a dependency added to
    # pyproject.toml without a pin here would float in the image.
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    names: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    pending: list[tuple[str, frozenset[str]]] = [("lmgate", frozenset({IMAGE_EXTRA}))]
    while pending:
        wanted, extras = pending.pop()
        try:
            dist = distribution(wanted)
        except PackageNotFoundError:
            # Only the image's older 3.11 needs it (async-timeout, below 3.11.3): a leaf.
            names.add(re.sub(r"[-_.]+", "-", wanted).lower())
            continue
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        names.add(name)
        for line in dist.requires or []:
            requirement = Requirement(line)
            # The image's interpreter, not the one running the tests (3.12 drops backports).
            marker = requirement.marker
            if marker is None or any(
                marker.evaluate({**IMAGE_MARKERS, "extra": extra}) for extra in {"", *extras}
            ):
                pending.append((requirement.name, frozenset(requirement.extras)))
    names.discard("lmgate")
    assert {pin.partition("==")[0] for pin in _locked()} == names


def test_a_container_serves_streams_stops_cleanly_and_keeps_its_data(
    engine: Engine, image: str, lmstudio: FakeLMStudio
) -> None:
    engine.docker("rm", "-f", "lmgate-test", check=False)
    engine.docker("volume", "rm", "-f", "lmgate-test-data", check=False)
    _run_container(engine, image)
    try:
        _wait_healthy(engine)
        made = engine.docker("exec", "lmgate-test", "lmgate", "key", "create", "docker-test")
        key = made.stdout.strip()
        assert key.startswith("lmg_"), made.stdout + made.stderr

        text, finished = engine.loop.run(_stream_chat(key))
        assert finished and text == ANSWER
        assert lmstudio.received[-1].path == "/v1/chat/completions"
        assert "authorization" not in {h.lower() for h in lmstudio.received[-1].headers}

        status, chat = engine.loop.run(_api("POST", "/api/chat", key, {"message": "remember"}))
        assert status == 200, chat
        assert isinstance(chat, dict)
        conversation = chat["conversation_id"]

        # The database and secrets are the volume's, private, and the gateway is not root.
        listing = engine.docker(
            "exec", "lmgate-test", "sh", "-c",
            "stat -c '%a %u %n' /data /data/* /data/secrets/*; cat /proc/1/status",
        ).stdout  # fmt: skip
        stats = [line.split() for line in listing.splitlines() if line[:1].isdigit()]
        modes = {path: [mode, owner] for mode, owner, path in stats}
        assert modes["/data"] == ["700", "10001"]
        secrets = [name for name in modes if name.startswith("/data/secrets/")]
        assert secrets, f"no secret file under /data/secrets: {modes}"  # the signing key
        assert any(name.endswith(".db") or name.endswith(".sqlite3") for name in modes), modes
        for name, (mode, owner) in modes.items():
            assert owner == "10001", name
            assert mode in ("700", "600"), f"{name} is {mode}"
        assert re.search(r"^Uid:\s+10001\s", listing, re.M), "the gateway runs as root"

        health = engine.docker("inspect", "-f", "{{.State.Health.Status}}", "lmgate-test")
        deadline = time.monotonic() + 30
        while health.stdout.strip() != "healthy" and time.monotonic() < deadline:
            time.sleep(0.5)
            health = engine.docker("inspect", "-f", "{{.State.Health.Status}}", "lmgate-test")
        assert health.stdout.strip() == "healthy"

        # SIGTERM with an answer in flight: it finishes, then the container exits 0.
        sent_before = len(lmstudio.chunk_sent_at)
        streaming = engine.loop.submit(_stream_chat(key))
        deadline = time.monotonic() + 10
        while len(lmstudio.chunk_sent_at) < sent_before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the answer's first chunks are out
        in_flight = len(lmstudio.chunk_sent_at) - sent_before
        assert 2 <= in_flight < STREAM_CHUNKS, f"{in_flight} chunks out when the stop came"
        stop_result: list[subprocess.CompletedProcess[str]] = []
        stopper = threading.Thread(
            target=lambda: stop_result.append(
                engine.docker("stop", "-t", str(GRACE), "lmgate-test", timeout=GRACE + 30)
            )
        )
        stopped_at = time.monotonic()
        stopper.start()
        text, finished = streaming.result(GRACE + 10)
        stopper.join(GRACE + 30)
        took = time.monotonic() - stopped_at
        assert finished, f"the stream was cut at {text!r}"
        assert text == ANSWER
        assert took < GRACE, f"docker stop waited {took:.1f} s: the gateway did not exit"
        assert [r.returncode for r in stop_result] == [0], stop_result
        state = engine.docker(
            "inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", "lmgate-test"
        )
        assert state.stdout.split() == ["false", "0"], engine.docker("logs", "lmgate-test").stderr

        # A new container on the same volume keeps the key and the conversation: they live in
        # the volume, not in the old container's own layer.
        engine.docker("rm", "lmgate-test")
        _run_container(engine, image)
        _wait_healthy(engine)
        status, listed = engine.loop.run(_api("GET", "/api/conversations", key))
        assert status == 200, listed
        assert isinstance(listed, dict)
        assert conversation in json.dumps(listed)
    finally:
        engine.docker("rm", "-f", "lmgate-test", check=False)
        engine.docker("volume", "rm", "-f", "lmgate-test-data", check=False)


def _run_container(engine: Engine, image: str) -> None:
    engine.docker(
        "run", "-d", "--name", "lmgate-test",
        "-p", f"127.0.0.1:{PORT}:8787",
        "--add-host", "host.docker.internal:host-gateway",
        "-v", "lmgate-test-data:/data",
        # The image's own check, run every second here instead of every 30.
        "--health-interval", "1s", "--health-start-period", "1s",
        image,
    )  # fmt: skip


def _readme_docker_block() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## In Docker", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Docker section has one block of commands"
    return str(blocks[0])


def test_the_readme_docker_commands_work_verbatim(
    engine: Engine, image: str, lmstudio: FakeLMStudio
) -> None:
    block = _readme_docker_block()
    started = time.monotonic()
    ran = subprocess.run(
        engine.in_netns("bash", "-euxo", "pipefail", "-c", block),
        cwd=REPO_ROOT,
        env=engine.env,
        stdin=subprocess.DEVNULL,  # as in a script: no terminal
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    print(f"README's Docker commands took {time.monotonic() - started:.1f} s")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert re.search(r"^lmg_\S+$", ran.stdout, re.M), "no key was printed"
    assert '{"status": "ok"}' in ran.stdout.splitlines()
    # `down` leaves no container or network behind; the data volume stays (that is the point
    # of a volume) until removed on purpose.
    assert engine.docker("ps", "-aq").stdout.strip() == ""
    networks = engine.docker("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert sorted(networks) == ["bridge", "host", "none"]
    volumes = engine.docker("volume", "ls", "-q").stdout.split()
    assert volumes == ["packaging_lmgate-data"]
    engine.docker("volume", "rm", "packaging_lmgate-data")
