"""LM Gate in front of two real model servers (llama.cpp's, each serving SmolLM2 under its
own alias, so which server answered is visible in the routing), through the official client.
Skipped, or failed in CI, exactly like the other real-model tests (see test_real_llm)."""

from __future__ import annotations

import time

import openai
import pytest

from tests.conftest import CLIENT_KEY
from tests.fakes import StaticKeyAuthenticator
from tests.integration.gateway.test_real_llm import running_llm_server
from tray_app.config.settings import Config
from tray_app.config.upstreams import LOCAL, UpstreamEntry
from tray_app.control.loop_thread import LoopThread
from tray_app.gateway.app import Gateway
from tray_app.gateway.server.runner import GatewayServer
from tray_app.secret_store.base import MemorySecretStore

pytestmark = pytest.mark.real_llm
DESK, LAPTOP = "smollm2-desk", "smollm2-laptop"


def _ask(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content
    return reply.model


def _until_all_up(gateway: Gateway, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(view.state == "up" for view in gateway.upstream_views()):
            return
        time.sleep(0.1)
    pytest.fail(f"the upstreams did not come up: {gateway.upstream_views()}")


def test_two_real_servers_each_answer_their_own_model_and_one_outlives_the_other() -> None:
    with (
        running_llm_server(DESK) as (desk_url, _desk),
        running_llm_server(LAPTOP) as (laptop_url, laptop),
    ):
        config = Config(
            upstream_url=desk_url,
            upstreams=(UpstreamEntry(LOCAL, desk_url), UpstreamEntry("laptop", laptop_url)),
            server_port=0,
            streaming_heartbeat_interval=5,
        )
        gateway = Gateway(config, StaticKeyAuthenticator(CLIENT_KEY), secrets=MemorySecretStore())
        server = GatewayServer(gateway)
        thread = LoopThread()
        thread.start()
        thread.submit(server.start()).result(10)
        try:
            _until_all_up(gateway)
            with openai.OpenAI(
                base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60
            ) as client:
                assert sorted(m.id for m in client.models.list().data) == [DESK, LAPTOP]
                # Each server knows only its own alias: an answer naming it came from it.
                assert _ask(client, DESK) == DESK
                assert _ask(client, LAPTOP) == LAPTOP
                requests = {view.name: view.requests for view in gateway.upstream_views()}
                assert requests == {LOCAL: 1, "laptop": 1}

                laptop.kill()
                laptop.wait(10)
                # Its model was only there: refused as unreachable, not sent to the desk; and
                # the refused connection takes the laptop out at once.
                with pytest.raises(openai.APIStatusError) as gone:
                    _ask(client, LAPTOP)
                error = gone.value.body
                assert isinstance(error, dict)
                assert (gone.value.status_code, error["code"]) == (503, "upstream_unreachable")
                assert _ask(client, DESK) == DESK
                assert [m.id for m in client.models.list().data] == [DESK]
        finally:
            thread.submit(server.stop()).result(20)
            thread.stop()
