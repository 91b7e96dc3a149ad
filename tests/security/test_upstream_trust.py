"""What several upstreams must not open up: one machine's token reaching another (a friend's
server must never see the local LM Studio's token), a request run twice because a retry
followed a failure after it went out, /readyz turned into load on every machine or into a
map of the owner's network, and a caller learning the machines' names or addresses from an
error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.fake_lmstudio import Behaviour, FakeLMStudio
from tests.several_upstreams import (
    ALICE,
    KeysAuthenticator,
    Rig,
    RigFactory,
    chat,
    get,
    several,
)
from tray_app.config.settings import Config
from tray_app.config.upstreams import LOCAL, UpstreamEntry, server_identity, token_secret_name
from tray_app.gateway.app import Gateway
from tray_app.gateway.server.runner import GatewayServer
from tray_app.secret_store.base import MemorySecretStore
from tray_app.secret_store.upstream_tokens import binding_name, fingerprint

__all__ = ["several"]  # the fixture

SWALLOWED: list[bytes] = []
PATHS_ASKED = ("/v1/models", "/v1/models/shared", "/readyz")


def tokens_seen(rig: Rig, index: int) -> set[str]:
    fake = rig.fakes[index]
    return {r.headers.get("Authorization", "") for r in [*fake.received, *fake.native]}


class TestEachMachineSeesOnlyItsOwnToken:
    async def test_on_every_kind_of_request_and_every_probe(self, several: RigFactory) -> None:
        rig = await several(
            Behaviour(models=("shared", "a-only")),
            Behaviour(models=("shared", "b-only")),
            Behaviour(models=("c-only",)),
        )
        for model in ("shared", "a-only", "b-only", "c-only"):
            assert (await chat(rig, model))[0] == 200
            assert (await chat(rig, model, stream=True))[0] == 200
        for path in PATHS_ASKED:
            assert (await get(rig, path))[0] == 200
        await rig.gateway.health.check_all()
        for index, fake in enumerate(rig.fakes):
            own = f"Bearer {fake.behaviour.require_token}"
            assert tokens_seen(rig, index) == {own}, rig.gateway.upstream_views()[index].name
            assert fake.native, "the model guard and the probe asked its model API too"


@pytest.fixture
async def swallowing_server() -> AsyncIterator[str]:
    """A server that lists its model like any other, but reads a whole generation request
    and then drops the connection without a word: the request reached it (it may be
    generating), so nobody may send it again."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # the gateway closed its pooled connection
            if head.startswith(b"GET /v1/models "):
                listed = json.dumps({"object": "list", "data": [{"id": "shared"}]}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(listed), listed)
                )
                continue
            if head.startswith(b"GET "):
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                continue
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            SWALLOWED.append(await reader.readexactly(length))
            writer.transport.abort()
            return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


class TestNoRequestIsRunTwice:
    async def test_a_failure_after_the_request_went_out_is_not_retried(
        self, several: RigFactory, swallowing_server: str
    ) -> None:
        # desk, the preferred one, answers its probe and dies on every generation it reads.
        rig = await several(
            Behaviour(models=("shared",)),
            Behaviour(),
            weights=(1, 5),
            urls={1: swallowing_server},
        )
        rig.fakes[0].loaded = []  # so that "loaded first" does not decide for local
        await rig.gateway.health.check_all()
        SWALLOWED.clear()
        for stream in (False, True):
            status, answer = await chat(rig, "shared", stream=stream)
            error = (json.loads(answer) if stream else answer)["error"]
            assert (status, error["code"]) == (502, "upstream_failed")
        assert len(SWALLOWED) == 2  # each reached desk once
        assert rig.chats(0) == 0  # and local never got a second copy
        views = {v.name: v for v in rig.gateway.upstream_views()}
        assert views["desk"].requests == 2 and views["local"].requests == 0


class TestReadinessTellsLittleAndCostsNothing:
    async def test_readyz_asks_no_machine_and_names_no_address_or_reason(
        self, several: RigFactory
    ) -> None:
        rig = await several(Behaviour(models=("a",)), Behaviour(models=("b",)))
        await rig.fakes[1].stop()
        await rig.gateway.health.check_all()
        asked = [len(f.received) + len(f.native) for f in rig.fakes]
        for _ in range(50):
            status, ready = await get(rig, "/readyz", key=None)
            assert status == 200
        assert [len(f.received) + len(f.native) for f in rig.fakes] == asked
        assert ready == {
            "status": "degraded",
            "upstreams": [{"name": LOCAL, "state": "up"}, {"name": "desk", "state": "down"}],
            "database": "up",
        }


class TestErrorsNameNoMachine:
    async def test_a_model_nobody_up_offers_and_a_refused_list(self, several: RigFactory) -> None:
        rig = await several(Behaviour(models=("a",)), Behaviour(models=("b",)))
        urls = [f.url for f in rig.fakes]
        for fake in rig.fakes:
            await fake.stop()
        await rig.gateway.health.check_all()
        for status, body in (
            await chat(rig, "b"),
            await chat(rig, "a", stream=True),
            await get(rig, "/v1/models"),
            await get(rig, "/v1/models/a"),
        ):
            text = body if isinstance(body, str) else json.dumps(body)
            assert (status, json.loads(text)["error"]["code"]) == (503, "upstream_unreachable")
            assert not any(url in text or url.split("//")[1] in text for url in urls)
            assert "desk" not in text and "127.0.0.1" not in text
            assert ALICE not in text


UNREADABLE_LISTS = {
    "html": (b"<html>hello</html>", "text/html"),
    "no data": (b'{"object": "list"}', "application/json"),
    "data not a list": (b'{"data": "everything"}', "application/json"),
    "nested too deep": (b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"),
    "over a megabyte": (
        b'{"data": [' + b",".join(b'{"id": "m%d"}' % i for i in range(80_000)) + b"]}",
        "application/json",
    ),
}


@pytest.fixture(params=sorted(UNREADABLE_LISTS))
async def unreadable_server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    """A server that answers 200 to every question with a model list LM Gate cannot read,
    and would take any generation sent to it."""
    body, content_type = UNREADABLE_LISTS[request.param]

    async def answer(incoming: web.Request) -> web.StreamResponse:
        if incoming.method == "POST":
            return web.json_response({"choices": [{"message": {"content": "from the friend"}}]})
        return web.Response(body=body, content_type=content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", request.param
    finally:
        await runner.cleanup()


class TestAListThatCannotBeReadDrawsNothing:
    async def test_the_server_is_down_and_gets_neither_typos_nor_the_owner_s_models(
        self, several: RigFactory, unreadable_server: tuple[str, str]
    ) -> None:
        url, case = unreadable_server
        rig = await several(Behaviour(models=("mine",)), Behaviour(), urls={1: url}, wait=False)
        await rig.gateway.health.check_all()
        desk = rig.gateway.pool.get("desk")
        assert desk is not None
        if case == "no data":  # read as an empty list: up, with nothing on offer
            assert (desk.up, desk.models) == (True, frozenset())
        else:
            assert (desk.up, desk.down_reason) == (
                False,
                "its model list is not one LM Gate can read",
            )
        await rig.fakes[0].stop()  # the owner's own machine goes away
        status, body = await chat(rig, "mine")
        assert (status, body["error"]["code"]) == (503, "upstream_unreachable")
        status, body = await chat(rig, "a-typo")
        # Nobody has it (404), unless desk never said what it has (then it may: 503).
        expected = (404, "model_not_found") if case == "no data" else (503, "upstream_unreachable")
        assert (status, body["error"]["code"]) == expected
        status, body = await get(rig, "/v1/models")
        if case == "no data":  # desk answers, with nothing
            assert (status, body["data"]) == (200, [])
        else:
            assert (status, body["error"]["code"]) == (503, "upstream_unreachable")


class TestATokenGoesOnlyToTheServerItWasGivenFor:
    """A name outlives its machine: a table removed by hand leaves its token in the store, and
    a table added by hand under that name, for another machine, must not be sent it."""

    async def test_an_old_machine_s_token_is_not_sent_to_a_new_one_of_its_name(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        old_machine = "http://10.9.9.9:1234"
        local, new_desk = (
            FakeLMStudio(Behaviour(models=("a",))),
            FakeLMStudio(Behaviour(models=("b",))),
        )
        await local.start()
        await new_desk.start()
        store = MemorySecretStore(
            {
                token_secret_name("desk"): "sk-old-machine",
                binding_name("desk"): f"{old_machine} {fingerprint('sk-old-machine')}",
            }
        )
        config = Config(
            server_host="127.0.0.1",
            server_port=0,
            upstream_url=local.url,
            upstreams=(UpstreamEntry(LOCAL, local.url), UpstreamEntry("desk", new_desk.url)),
            streaming_heartbeat_interval=0.0,
        )
        server = GatewayServer(Gateway(config, KeysAuthenticator(), secrets=store))
        caplog.set_level(logging.WARNING, logger="lmgate.gateway")
        await server.start()
        try:
            rig = Rig([local, new_desk], server, store)
            await rig.all_up()
            assert (await chat(rig, "b"))[0] == 200
            await rig.gateway.health.check_all()  # each probe reads the store again
            assert (await chat(rig, "b", stream=True))[0] == 200
        finally:
            await server.stop()
            await local.stop()
            await new_desk.stop()
        seen = {r.headers.get("Authorization") for r in [*new_desk.received, *new_desk.native]}
        assert seen == {None}
        told = [r.getMessage() for r in caplog.records]
        assert sum("lmgate secret set upstream-token-desk" in m for m in told) == 1  # once
        assert all("sk-old-machine" not in m for m in told)

    async def test_an_unbound_token_is_bound_where_first_sent_and_a_new_one_follows_its_name(
        self, several: RigFactory
    ) -> None:
        rig = await several(Behaviour(models=("a-only",)), Behaviour(models=("b-only",)))
        desk_token = rig.store.get(token_secret_name("desk"))
        assert desk_token is not None
        assert rig.store.get(binding_name("desk")) == (
            f"{server_identity(rig.fakes[1].url)} {fingerprint(desk_token)}"
        )
        assert rig.store.get(binding_name(LOCAL)) is None  # lmstudio-api-token is not bound
        assert (await chat(rig, "b-only"))[0] == 200
        # Moved by hand to another address with the same token: not sent there.
        rig.store.set(binding_name("desk"), f"http://10.9.9.9:1234 {fingerprint(desk_token)}")
        await rig.gateway.health.check_all()
        assert rig.states()["desk"] == "down"
        status, body = await chat(rig, "b-only")
        assert (status, body["error"]["code"]) == (503, "upstream_unreachable")
        # The owner stores this server's token (`lmgate secret set upstream-token-desk`).
        rig.fakes[1].behaviour.require_token = "sk-desk-new"
        rig.store.set(token_secret_name("desk"), "sk-desk-new")
        await rig.until(lambda: rig.states()["desk"] == "up", within=15)
        assert (await chat(rig, "b-only"))[0] == 200
        assert rig.store.get(binding_name("desk")) == (
            f"{server_identity(rig.fakes[1].url)} {fingerprint('sk-desk-new')}"
        )
