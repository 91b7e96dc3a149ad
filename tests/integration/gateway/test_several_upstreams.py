"""The whole gateway in front of two and three fake model servers, through real sockets:
the model list is the union, a request goes to a server with its model (loaded first, then
least busy, then weight), a conversation stays where it was served, a connection refused
before the first byte is retried once elsewhere, a stream cut mid-way is not, a server that
went away is taken out and comes back, and each server has its own token and model guard."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.fake_lmstudio import Behaviour
from tests.several_upstreams import ALICE, BOB, RigFactory, chat, get, several
from tray_app.config.settings import ModelSwitch
from tray_app.config.upstreams import token_secret_name
from tray_app.gateway import api_errors as errors
from tray_app.gateway.upstream.model_guard import ModelUse

__all__ = ["several"]  # the fixture


class TestTheModelList:
    async def test_is_the_union_of_three_servers_lists_each_model_once(
        self, several: RigFactory
    ) -> None:
        rig = await several(
            Behaviour(models=("a-only", "shared")),
            Behaviour(models=("b-only", "shared")),
            Behaviour(models=("c-only",)),
        )
        status, listed = await get(rig, "/v1/models")
        assert status == 200
        assert sorted(e["id"] for e in listed["data"]) == ["a-only", "b-only", "c-only", "shared"]
        status, entry = await get(rig, "/v1/models/c-only")
        assert (status, entry["id"]) == (200, "c-only")

    async def test_asks_no_machine_and_names_none(self, several: RigFactory) -> None:
        rig = await several(Behaviour(models=("a-only", "shared")), Behaviour(models=("shared",)))
        asked = [len(f.received) for f in rig.fakes]
        for _ in range(20):
            status, listed = await get(rig, "/v1/models")
            assert status == 200
        assert [len(f.received) for f in rig.fakes] == asked
        assert listed["data"] == [
            {"id": "a-only", "object": "model", "owned_by": "organization_owner"},
            {"id": "shared", "object": "model", "owned_by": "organization_owner"},
        ]

    async def test_leaves_out_a_server_that_is_down_and_is_a_503_when_all_are(
        self, several: RigFactory
    ) -> None:
        rig = await several(Behaviour(models=("a-only",)), Behaviour(models=("b-only",)))
        await rig.fakes[1].stop()
        await rig.gateway.health.check_all()  # the list is what the probes found
        status, listed = await get(rig, "/v1/models")
        assert (status, [e["id"] for e in listed["data"]]) == (200, ["a-only"])
        await rig.fakes[0].stop()
        await rig.gateway.health.check_all()
        status, body = await get(rig, "/v1/models")
        assert (status, body["error"]["code"]) == (503, "upstream_unreachable")


class TestRoutingByModel:
    async def test_a_model_goes_to_the_server_that_has_it_with_that_servers_token(
        self, several: RigFactory
    ) -> None:
        rig = await several(Behaviour(models=("a-only",)), Behaviour(models=("b-only",)))
        assert (await chat(rig, "b-only"))[0] == 200
        assert (await chat(rig, "a-only"))[0] == 200
        assert (rig.chats(0), rig.chats(1)) == (1, 1)
        assert rig.fakes[1].received[-1].json()["model"] == "b-only"

    async def test_a_server_with_the_model_loaded_is_preferred(self, several: RigFactory) -> None:
        rig = await several(Behaviour(models=("shared",)), Behaviour(models=("shared",)))
        rig.fakes[0].loaded = []  # on disk only: asking would load it
        rig.fakes[1].loaded = ["shared"]
        await rig.gateway.health.check_all()
        for _ in range(3):
            assert (await chat(rig, "shared", key=BOB if _ % 2 else ALICE))[0] == 200
        assert (rig.chats(0), rig.chats(1)) == (0, 3)

    async def test_then_the_least_busy_then_the_heavier(self, several: RigFactory) -> None:
        rig = await several(
            Behaviour(models=("shared",), chunks=40, chunk_delay=0.05),
            Behaviour(models=("shared",), chunks=40, chunk_delay=0.05),
            weights=(1, 3),
        )
        # Equally idle: the heavier one (desk) takes the first.
        slow = asyncio.create_task(chat(rig, "shared", key=ALICE, stream=True))
        await rig.until(lambda: rig.chats(1) == 1)
        # desk is busy now: bob's goes to the idle one.
        assert (await chat(rig, "shared", key=BOB))[0] == 200
        assert (rig.chats(0), rig.chats(1)) == (1, 1)
        assert (await slow)[0] == 200

    async def test_a_model_no_server_up_offers_is_a_503_with_retry_after(
        self, several: RigFactory
    ) -> None:
        rig = await several(Behaviour(models=("a-only",)), Behaviour(models=("b-only",)))
        await rig.fakes[1].stop()
        await rig.gateway.health.check_all()
        async with (
            aiohttp.ClientSession(trust_env=False) as session,
            session.post(
                rig.url + "/v1/chat/completions",
                json={"model": "b-only", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {ALICE}"},
            ) as response,
        ):
            body = await response.json()
            assert response.status == 503
            assert body["error"]["code"] == "upstream_unreachable"
            assert response.headers["Retry-After"] == "60"
            # The owner's machines are not named to a caller.
            assert rig.fakes[1].url not in body["error"]["message"]
            assert "desk" not in body["error"]["message"]

    async def test_a_model_no_server_has_is_a_404_as_with_one_server(
        self, several: RigFactory
    ) -> None:
        rig = await several(Behaviour(models=("a-only",)), Behaviour(models=("b-only",)))
        await rig.fakes[1].stop()
        await rig.gateway.health.check_all()
        status, body = await chat(rig, "a-typo")
        assert (status, body["error"]["code"]) == (404, "model_not_found")
        assert (rig.chats(0), rig.chats(1)) == (0, 0)


class TestStickiness:
    async def test_a_conversation_stays_on_the_server_that_served_it(
        self, several: RigFactory
    ) -> None:
        rig = await several(
            Behaviour(models=("shared",), chunks=40, chunk_delay=0.05),
            Behaviour(models=("shared",)),
        )
        assert (await chat(rig, "shared", key=ALICE))[0] == 200  # idle, first configured: local
        assert rig.chats(0) == 1
        busy = asyncio.create_task(chat(rig, "shared", key=BOB, stream=True))  # local, sticky
        await rig.until(lambda: rig.chats(0) == 2)
        # local is busier now, yet alice's next turn goes back to it: her prompt is cached there.
        assert (await chat(rig, "shared", key=ALICE))[0] == 200
        assert (rig.chats(0), rig.chats(1)) == (3, 0)
        assert (await busy)[0] == 200

    async def test_but_not_to_a_server_that_went_down(self, several: RigFactory) -> None:
        rig = await several(Behaviour(models=("shared",)), Behaviour(models=("shared",)))
        assert (await chat(rig, "shared"))[0] == 200
        await rig.fakes[0].stop()
        assert (await chat(rig, "shared"))[0] == 200
        assert rig.chats(1) == 1


class TestFailover:
    async def test_a_refused_connection_is_retried_once_on_another_server(
        self, several: RigFactory
    ) -> None:
        rig = await several(
            Behaviour(models=("shared",)), Behaviour(models=("shared",)), weights=(1, 5)
        )
        await rig.fakes[1].stop()  # the preferred one, still believed up
        assert rig.states()["desk"] == "up"
        status, answer = await chat(rig, "shared")
        assert status == 200 and answer["choices"][0]["message"]["content"]
        assert rig.chats(0) == 1
        assert rig.states()["desk"] == "down"  # taken out at once
        assert rig.gateway.upstream_views()[1].down_reason

    async def test_a_stream_cut_mid_way_is_not_retried(self, several: RigFactory) -> None:
        rig = await several(
            Behaviour(models=("shared",)),
            Behaviour(models=("shared",), fail_after=2),
            weights=(1, 5),
        )
        status, text = await chat(rig, "shared", stream=True)
        assert status == 200
        assert '"error"' in text and "data: [DONE]" not in text.split('"error"')[0]
        assert (rig.chats(0), rig.chats(1)) == (0, 1)

    async def test_a_server_back_from_the_dead_rejoins(self, several: RigFactory) -> None:
        rig = await several(Behaviour(models=("a-only",)), Behaviour(models=("b-only",)))
        port = rig.fakes[1].port
        await rig.fakes[1].stop()
        assert (await chat(rig, "b-only"))[0] == 503
        assert rig.states()["desk"] == "down"
        status, ready = await get(rig, "/readyz", key=None)
        assert (status, ready["status"]) == (200, "degraded")
        assert ready["upstreams"] == [
            {"name": "local", "state": "up"},
            {"name": "desk", "state": "down"},
        ]
        await rig.fakes[1].start(port=port or 0)
        await rig.until(lambda: rig.states()["desk"] == "up", within=15)
        assert (await chat(rig, "b-only"))[0] == 200
        status, ready = await get(rig, "/readyz", key=None)
        assert (status, ready["status"]) == (200, "ready")


class TestATokenFixedWhileServing:
    async def test_is_used_from_the_next_probe_on_requests_included(
        self, several: RigFactory
    ) -> None:
        rig = await several(Behaviour(models=("a-only",)), Behaviour(models=("b-only",)))
        desk_secret = token_secret_name("desk")
        right = rig.store.get(desk_secret)
        rig.store.set(desk_secret, "sk-a-wrong-one")
        await rig.gateway.health.check_all()
        assert rig.states()["desk"] == "down"
        status, body = await chat(rig, "b-only")
        assert (status, body["error"]["code"]) == (503, "upstream_unreachable")
        assert right is not None
        rig.store.set(desk_secret, right)  # the owner runs `lmgate secret set upstream-token-desk`
        await rig.until(lambda: rig.states()["desk"] == "up", within=15)
        assert (await chat(rig, "b-only"))[0] == 200


class TestEachServersModelGuard:
    async def test_a_load_on_one_machine_does_not_wait_for_answers_on_another(
        self, several: RigFactory
    ) -> None:
        rig = await several(
            Behaviour(models=("x", "y"), chunks=30, chunk_delay=0.05),
            Behaviour(models=("y",), load_delay=0.1),
            models_switch=ModelSwitch.WAIT,
        )
        rig.fakes[0].loaded = ["x"]
        rig.fakes[1].loaded = []
        await rig.gateway.health.check_all()
        streaming = asyncio.create_task(chat(rig, "x", key=BOB, stream=True))
        await rig.until(lambda: rig.chats(0) == 1)
        started = time.monotonic()
        # y is loaded nowhere; local would have to evict x, which bob reads from. Neither is
        # a reason to wait for bob: desk has y on disk and nothing to evict.
        status, _ = await chat(rig, "y", key=ALICE)
        assert status == 200
        assert time.monotonic() - started < 1.0
        assert not streaming.done()
        assert rig.fakes[0].streams_cut == []
        assert (await streaming)[0] == 200


class TestMetrics:
    async def test_each_upstream_has_its_state_load_and_count_and_retries_are_counted(
        self, several: RigFactory
    ) -> None:
        rig = await several(
            Behaviour(models=("shared",)), Behaviour(models=("shared", "more")), weights=(1, 5)
        )
        assert (await chat(rig, "shared"))[0] == 200  # to desk, the heavier
        await rig.fakes[1].stop()
        assert (await chat(rig, "shared"))[0] == 200  # desk refused: retried on local
        async with (
            aiohttp.ClientSession(trust_env=False) as session,
            session.get(
                rig.url + "/metrics", headers={"Authorization": f"Bearer {ALICE}"}
            ) as response,
        ):
            assert response.status == 200
            text = await response.text()
        lines = set(text.splitlines())
        assert 'lmgate_upstream_up{upstream="local"} 1.0' in lines
        assert 'lmgate_upstream_up{upstream="desk"} 0.0' in lines
        assert 'lmgate_upstream_requests_total{upstream="local"} 1.0' in lines
        assert 'lmgate_upstream_requests_total{upstream="desk"} 2.0' in lines
        assert 'lmgate_upstream_models{upstream="desk"} 2.0' in lines
        assert 'lmgate_upstream_in_flight{upstream="local"} 0.0' in lines
        assert "lmgate_upstream_retries_total 1.0" in lines


class TestTheOwnerIsTold:
    async def test_down_back_and_retried_elsewhere_in_the_log_and_which_one_served(
        self, several: RigFactory, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="lmgate")
        rig = await several(
            Behaviour(models=("shared",)), Behaviour(models=("shared",)), weights=(1, 5)
        )
        port = rig.fakes[1].port
        await rig.fakes[1].stop()
        assert (await chat(rig, "shared"))[0] == 200
        said = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
        assert (
            "lmgate.upstreams",
            "INFO",
            "upstream desk could not be reached; the request went to local",
        ) in said
        down = [
            m
            for n, level, m in said
            if level == "WARNING" and m.startswith("upstream desk is down (")
        ]
        assert len(down) == 1 and down[0].endswith("): it gets no requests until it answers again")
        served = [r for r in caplog.records if r.name == "lmgate.access"]
        assert served[-1].access["upstream"] == "local"  # type: ignore[attr-defined]
        await rig.fakes[1].start(port=port or 0)
        await rig.until(lambda: rig.states()["desk"] == "up", within=15)
        back = [r.getMessage() for r in caplog.records if r.name == "lmgate.upstreams"]
        assert back[-1] == "upstream desk answers again: it gets requests from now on"


@pytest.fixture
async def vanishing() -> AsyncIterator[str]:
    """A server that lists a model on disk, answers its load, and stops listening as it does:
    the model guard's read after the load finds nothing there."""
    listening: list[asyncio.Server] = []

    def answer(writer: asyncio.StreamWriter, payload: object) -> None:
        body = json.dumps(payload).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            writer.close()
            return
        line = head.split(b"\r\n", 1)[0]
        if line.startswith(b"GET /v1/models "):
            answer(writer, {"object": "list", "data": [{"id": "far-model"}]})
        elif line.startswith(b"GET /api/v0/models "):
            answer(writer, {"data": [{"id": "far-model", "state": "not-loaded"}]})
        elif line.startswith(b"POST /api/v1/models/load "):
            length = next(
                int(h.split(b":", 1)[1])
                for h in head.split(b"\r\n")
                if h.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            listening[0].close()  # the next connection is refused
            answer(writer, {"model_instance_id": "far-model"})
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    listening.append(server)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()


class TestNoAnswerNamesAMachine:
    @pytest.mark.parametrize("servers", [1, 2])
    async def test_a_server_gone_right_after_its_model_load(
        self, several: RigFactory, vanishing: str, servers: int
    ) -> None:
        behaviours = [Behaviour(models=("shared",)) for _ in range(servers)]
        rig = await several(*behaviours, urls={servers - 1: vanishing}, wait=servers > 1)
        status, body = await chat(rig, "far-model")
        port = vanishing.rsplit(":", 1)[1]
        assert port not in json.dumps(body), body
        if servers == 1:
            assert (status, body["error"]["code"]) == (502, "upstream_unreachable")
        else:
            assert (status, body["error"]["code"]) == (503, "upstream_unreachable")
            assert "desk" not in body["error"]["message"]

    @pytest.mark.parametrize("servers", [1, 2])
    async def test_an_error_that_names_a_server_is_answered_without_it(
        self, several: RigFactory, monkeypatch: pytest.MonkeyPatch, servers: int
    ) -> None:
        # Whatever raised it on the way (the guards' reads name the server they asked), the
        # forwarder is the one place every forwarded request's errors pass.
        rig = await several(*[Behaviour(models=("m",)) for _ in range(servers)], wait=servers > 1)
        where = rig.fakes[0].url

        async def failing(*args: object, **kwargs: object) -> ModelUse:
            raise errors.upstream_unreachable_at(where)

        for guard in rig.gateway.guards.values():
            monkeypatch.setattr(guard, "enter", failing)
        status, body = await chat(rig, "m")
        assert (status, body["error"]["code"]) == (
            502 if servers == 1 else 503,
            "upstream_unreachable",
        )
        _, text = await chat(rig, "m", stream=True)
        for said in (json.dumps(body), text):
            assert "upstream_unreachable" in said and where.rsplit(":", 1)[1] not in said, said
            assert "local" not in said
        assert [rig.chats(i) for i in range(servers)] == [0] * servers


class TestSwitchedOff:
    """The enabled upstreams are the only ones anything is sent to, one upstream included."""

    @pytest.mark.parametrize("servers", [1, 2])
    async def test_every_upstream_switched_off_is_sent_nothing_and_not_ready(
        self, several: RigFactory, servers: int
    ) -> None:
        behaviours = [Behaviour(models=("m",)) for _ in range(servers)]
        rig = await several(*behaviours, enabled=(False,) * servers, wait=False)
        for fake in rig.fakes:
            fake.received.clear()
        status, ready = await get(rig, "/readyz", key=None)
        assert (status, ready["status"]) == (503, "unavailable")
        assert [u["state"] for u in ready["upstreams"]] == ["disabled"] * servers
        for answer in (await chat(rig, "m"), await get(rig, "/v1/models")):
            assert (answer[0], answer[1]["error"]["code"]) == (503, "upstream_disabled")
        status, body = await get(rig, "/v1/models/m")
        assert (status, body["error"]["code"]) == (503, "upstream_disabled")
        assert await rig.gateway.upstreams_reachable() is False
        assert all(fake.received == [] and fake.native == [] for fake in rig.fakes)


class TestThreeServers:
    async def test_failover_on_kill_conversation_stickiness_and_rejoin(
        self, several: RigFactory
    ) -> None:
        rig = await several(
            Behaviour(models=("a-only", "shared")),
            Behaviour(models=("shared",)),
            Behaviour(models=("shared", "c-only")),
            weights=(1, 5, 3),
        )
        assert (await chat(rig, "shared", key=ALICE))[0] == 200
        assert [rig.chats(i) for i in range(3)] == [0, 1, 0]  # desk: the heaviest
        # desk goes away under alice's conversation: retried on attic, the next heaviest
        # (a fake counts what it received before it stopped).
        port = rig.fakes[1].port
        await rig.fakes[1].stop()
        assert (await chat(rig, "shared", key=ALICE))[0] == 200
        assert [rig.chats(i) for i in range(3)] == [0, 1, 1]
        assert rig.states()["desk"] == "down"
        # Her conversation stays on attic now, even while attic is the busier one.
        rig.fakes[2].behaviour.chunks, rig.fakes[2].behaviour.chunk_delay = 40, 0.05
        busy = asyncio.create_task(chat(rig, "c-only", key=BOB, stream=True))
        await rig.until(lambda: rig.chats(2) == 2)
        assert (await chat(rig, "shared", key=ALICE))[0] == 200
        assert [rig.chats(i) for i in range(3)] == [0, 1, 3]
        assert (await busy)[0] == 200
        # attic goes away too: what only it has is unreachable, the rest goes to local.
        await rig.fakes[2].stop()
        status, body = await chat(rig, "c-only", key=BOB)
        assert (status, body["error"]["code"]) == (503, "upstream_unreachable")
        assert (await chat(rig, "shared", key=ALICE))[0] == 200
        assert [rig.chats(i) for i in range(3)] == [1, 1, 3]
        status, ready = await get(rig, "/readyz", key=None)
        assert (status, ready["status"]) == (200, "degraded")
        # desk comes back and takes new conversations again; alice's stays on local.
        await rig.fakes[1].start(port=port or 0)
        await rig.until(lambda: rig.states()["desk"] == "up", within=15)
        assert (await chat(rig, "shared", key=BOB))[0] == 200
        assert (await chat(rig, "shared", key=ALICE))[0] == 200
        assert [rig.chats(i) for i in range(3)] == [2, 2, 3]
