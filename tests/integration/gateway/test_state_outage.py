"""The gateway while credentials cannot be checked (the database out of reach): every
authenticated route answers 503 ``state_unavailable`` and forwards nothing, /readyz says so,
a route whose own store fails (the phone's conversations) answers the same, and all of it
comes back by itself once the database answers."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLIENT_KEY, GatewayFactory, auth_headers
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.fakes import StaticKeyAuthenticator
from tests.helpers import raw_request
from tray_app.clock import SystemClock
from tray_app.config.settings import Config
from tray_app.errors import StorageError
from tray_app.gateway.app import Gateway
from tray_app.gateway.server.runner import GatewayServer
from tray_app.identity.principal import Principal
from tray_app.secret_store.base import MemorySecretStore
from tray_app.storage.conversations import ConversationStore
from tray_app.storage.database import Database, Row

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
ROUTES = [
    ("POST", "/v1/chat/completions", CHAT),
    ("GET", "/v1/models", b""),
    ("POST", "/v1/embeddings", json.dumps({"model": "m", "input": "hi"}).encode()),
]


class OutageAuthenticator(StaticKeyAuthenticator):
    """The static key, behind a database that can be taken away: raises what the real
    authenticator raises then (tests/unit/identity/test_authenticator_outage.py)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.down = False

    def _database(self) -> None:
        if self.down:
            raise StorageError("LM Gate's database db.example:5432/lmgate could not be read.")

    def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        self._database()
        return super().authenticate(headers, peer)

    def still_valid(self, principal: Principal) -> bool:
        self._database()
        return super().still_valid(principal)

    def check_state(self) -> None:
        self._database()


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_nothing_is_forwarded_on_a_credential_that_cannot_be_checked(
    start_gateway: GatewayFactory,
    fake_lmstudio: FakeLMStudio,
    method: str,
    path: str,
    body: bytes,
) -> None:
    auth = OutageAuthenticator(CLIENT_KEY)
    server = await start_gateway(authenticator=auth)
    headers = {**auth_headers(), "Content-Type": "application/json"}
    auth.down = True
    refused = await raw_request(server.port or 0, method, path, headers, body)
    assert refused.status == 503
    assert refused.json()["error"]["code"] == "state_unavailable"
    assert refused.headers["retry-after"] == "1"
    assert "db.example" not in refused.body.decode()  # the owner's business, not the caller's
    assert fake_lmstudio.paths == []

    auth.down = False
    served = await raw_request(server.port or 0, method, path, headers, body)
    assert served.status == 200
    assert fake_lmstudio.paths == [path]


async def test_readyz_is_unavailable_while_the_database_is_and_ready_after(
    start_gateway: GatewayFactory,
) -> None:
    auth = OutageAuthenticator(CLIENT_KEY)
    server = await start_gateway(authenticator=auth)
    auth.down = True
    down = await raw_request(server.port or 0, "GET", "/readyz")
    assert (down.status, down.json()) == (
        503,
        {
            "status": "unavailable",
            "upstreams": [{"name": "local", "state": "up"}],
            "database": "down",
        },
    )
    alive = await raw_request(server.port or 0, "GET", "/healthz")
    assert alive.status == 200  # the process is alive: nothing to restart

    auth.down = False
    up = await raw_request(server.port or 0, "GET", "/readyz")
    assert up.status == 200
    assert up.json()["status"] == "ready" and up.json()["database"] == "up"


async def test_a_bad_key_is_not_told_apart_from_a_good_one_during_an_outage(
    start_gateway: GatewayFactory,
) -> None:
    # Nothing is checked, so a guess learns nothing, and is not counted as a failure either.
    auth = OutageAuthenticator(CLIENT_KEY)
    server = await start_gateway(authenticator=auth)
    auth.down = True
    answers = [
        await raw_request(server.port or 0, "GET", "/v1/models", auth_headers(key))
        for key in (CLIENT_KEY, "lmg_wrong_" + "x" * 30)
    ]
    assert [(a.status, a.json()["error"]["code"]) for a in answers] == [
        (503, "state_unavailable"),
        (503, "state_unavailable"),
    ]


async def phone_gateway(conversations: ConversationStore, upstream: FakeLMStudio) -> GatewayServer:
    """A started gateway whose phone routes keep their conversations in ``conversations``."""
    config = Config(server_host="127.0.0.1", server_port=0, upstream_url=upstream.url)
    gateway = Gateway(
        config,
        StaticKeyAuthenticator(CLIENT_KEY),
        secrets=MemorySecretStore(),
        conversations=conversations,
    )
    server = GatewayServer(gateway)
    await server.start()
    return server


JSON_AUTH_HEADERS = {**auth_headers(), "Content-Type": "application/json"}


class UnreadableDatabase(Database):
    """A real database whose reads fail, as an unreachable server's would."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.down = False

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[Row]:
        if self.down:
            raise StorageError("LM Gate's database db.example:5432/lmgate could not be read.")
        return super().query(sql, params)


async def test_the_phones_routes_answer_503_when_their_store_cannot_be_read(
    tmp_path: Path, fake_lmstudio: FakeLMStudio, caplog: pytest.LogCaptureFixture
) -> None:
    # Not a bug (500 and a traceback): the database's outage, said once per request.
    db = UnreadableDatabase(tmp_path / "lmgate.db")
    server = await phone_gateway(ConversationStore(db, SystemClock()), fake_lmstudio)
    try:
        listed = await raw_request(server.port or 0, "GET", "/api/conversations", auth_headers())
        assert listed.status == 200
        db.down = True
        with caplog.at_level(logging.WARNING, logger="lmgate.gateway"):
            refused = await raw_request(
                server.port or 0, "GET", "/api/conversations", auth_headers()
            )
        assert refused.status == 503
        assert refused.json()["error"]["code"] == "state_unavailable"
        assert "db.example" not in refused.body.decode()
        assert not any(r.exc_info for r in caplog.records)  # no traceback: not a bug
        assert any("db.example" in r.getMessage() for r in caplog.records)  # the owner's
        db.down = False
        again = await raw_request(server.port or 0, "GET", "/api/conversations", auth_headers())
        assert again.status == 200
    finally:
        await server.stop()
        db.close()


class AnswersUnkept(ConversationStore):
    """The real store, whose writes of an answer fail as a database gone away would."""

    def append(self, conversation_id: str, role: str, content: str, **rest: Any) -> Any:
        if role == "assistant":
            raise StorageError("LM Gate's database db.example:5432/lmgate could not be written.")
        return super().append(conversation_id, role, content, **rest)


async def test_a_streamed_answer_that_cannot_be_kept_ends_as_streamed_with_no_second_answer(
    tmp_path: Path, fake_lmstudio: FakeLMStudio, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(tmp_path / "lmgate.db")
    server = await phone_gateway(AnswersUnkept(db, SystemClock()), fake_lmstudio)
    fake_lmstudio.behaviour.chunks = 2
    body = json.dumps({"message": "hi", "model": MODELS[0], "stream": True}).encode()
    try:
        with caplog.at_level(logging.WARNING, logger="lmgate.gateway"):
            answer = await raw_request(
                server.port or 0, "POST", "/api/chat", JSON_AUTH_HEADERS, body
            )
        assert answer.status == 200
        assert b"HTTP/1.1" not in answer.body, "a second answer inside the stream"
        assert b"tok1" in answer.body and b"state_unavailable" not in answer.body
        assert any("sent but not kept" in r.getMessage() for r in caplog.records)
    finally:
        await server.stop()
        db.close()


async def test_an_answer_that_cannot_be_kept_is_given_all_the_same(
    tmp_path: Path, fake_lmstudio: FakeLMStudio, caplog: pytest.LogCaptureFixture
) -> None:
    """Generated and charged: a 503 would say nothing was forwarded, and the retry it invites
    would generate and charge the answer again."""
    db = Database(tmp_path / "lmgate.db")
    server = await phone_gateway(AnswersUnkept(db, SystemClock()), fake_lmstudio)
    body = json.dumps({"message": "hi", "model": MODELS[0]}).encode()
    try:
        with caplog.at_level(logging.WARNING, logger="lmgate.gateway"):
            answer = await raw_request(
                server.port or 0, "POST", "/api/chat", JSON_AUTH_HEADERS, body
            )
        assert answer.status == 200, answer.body
        assert answer.json()["response"]
        assert any("sent but not kept" in r.getMessage() for r in caplog.records)
    finally:
        await server.stop()
        db.close()
