"""The whole gateway in front of two and three fake model servers, through real sockets:
the model list is the union, a request goes to a server with its model (loaded first, then
least busy, then weight), a conversation stays where it was served, a connection refused
before the first byte is retried once elsewhere, a stream cut mid-way is not, a server that
went away is taken out and comes back, and each server has its own token and model guard."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from tests.fake_lmstudio import Behaviour
from tests.several_upstreams import ALICE, BOB, RigFactory, chat, get, several
from tray_app.config.settings import ModelSwitch
from tray_app.config.upstreams import token_secret_name

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
