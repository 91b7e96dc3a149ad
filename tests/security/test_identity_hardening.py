"""Issue 12's identity defects, each as a class over real sockets: the model allowlist reaches
paired devices (1); every credential is its own principal (4); claims never beat the database
and a key rotation reaches a running gateway (5); private files (6); a credential is accepted
on its first request (15); dev mode refuses relayed and rebound requests (7); and a running
stream can ask whether its credential still holds."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from tests.conftest import LMSTUDIO_TOKEN, IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.fakes import FakeClock
from tests.helpers import Env, RawResponse, _parse, start_serve
from tray_app.addresses import is_loopback_host
from tray_app.clock import Clock, SystemClock
from tray_app.config.settings import Config, dump_settings, load_config
from tray_app.control.assembly import (
    Identity,
    build_gateway,
    open_identity,
    rotate_signing_key_everywhere,
    signing_key_loader,
)
from tray_app.control.controller import Controller, ThreadedController
from tray_app.errors import AuthError, SecretStoreError
from tray_app.gateway.server.runner import GatewayServer
from tray_app.identity.authenticator import PROXY_HEADERS, IdentityAuthenticator
from tray_app.identity.principal import CredentialKind, Principal, PrincipalId
from tray_app.identity.signing_key import SIGNING_KEY, load_or_create_signing_key
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore, SecretStore
from tray_app.secret_store.keyring_store import FileSecretStore
from tray_app.storage.database import SCHEMA_VERSION, Database

CHAT_SCOPES = frozenset({"chat", "models"})


# ---- a gateway that reads its signing key again after a rotation --------------------------


@dataclass
class Gate:
    server: GatewayServer
    identity: Identity
    store: SecretStore
    config: Config

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def second_process(self) -> Identity:
        """What the CLI opens: its own connection to the same database, the same store."""
        return open_identity(self.config, load_or_create_signing_key(self.store))


GateFactory = Callable[..., Any]


@pytest.fixture
async def start_gate(fake_lmstudio: FakeLMStudio, tmp_path: Path) -> AsyncIterator[GateFactory]:
    gates: list[Gate] = []

    async def start(
        *, store: SecretStore | None = None, clock: Clock | None = None, **settings: Any
    ) -> Gate:
        settings.setdefault("upstream_url", fake_lmstudio.url)
        settings.setdefault("streaming_heartbeat_interval", 0.0)
        settings.setdefault("server_shutdown_grace", 1.0)
        settings.setdefault("limits_auth_failures_per_minute", 100_000)
        settings.setdefault("storage_data_dir", str(tmp_path / "data"))
        config = Config(server_host="127.0.0.1", server_port=0, **settings)
        if store is None:
            store = MemorySecretStore()
        store.set(LMSTUDIO_API_TOKEN, LMSTUDIO_TOKEN)
        clock = clock or SystemClock()
        identity = open_identity(
            config,
            load_or_create_signing_key(store),
            clock=clock,
            key_loader=signing_key_loader(store),
        )
        server = GatewayServer(build_gateway(config, identity, store, clock=clock))
        await server.start()
        gate = Gate(server, identity, store, config)
        gates.append(gate)
        return gate

    yield start
    for gate in gates:
        await gate.server.stop()
        gate.identity.close()


async def call(
    url: str,
    path: str = "/v1/models",
    *,
    token: str | None = None,
    body: Any = None,
    method: str | None = None,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    verb = method or ("POST" if body is not None else "GET")
    async with (
        aiohttp.ClientSession() as s,
        s.request(verb, url + path, headers=headers, json=body) as r,
    ):
        raw = await r.read()
        try:
            return r.status, json.loads(raw) if raw else None
        except ValueError:
            return r.status, raw


async def pair(url: str, code: str, name: str = "phone") -> dict[str, Any]:
    status, body = await call(url, "/pair", body={"code": code, "device_name": name})
    assert status == 200, body
    return dict(body)


def error_of(body: Any) -> tuple[str, str | None]:
    return body["error"]["code"], body["error"]["param"]


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll an async check until it returns something truthy (the gateway reads other
    processes' changes at most twice a second)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.1)


# ---- 1: the model allowlist reaches paired devices ---------------------------------------

# Every route a device's chat scope reaches with a model, and the body naming that model.
MODEL_ROUTES = {
    "/v1/chat/completions": lambda m: {"model": m, "messages": [{"role": "user", "content": "x"}]},
    "/v1/completions": lambda m: {"model": m, "prompt": "x"},
    "/api/chat": lambda m: {"model": m, "message": "x"},
}


async def models_listed(url: str, token: str) -> list[str]:
    status, body = await call(url, token=token)
    assert status == 200, body
    return [m["id"] for m in body["data"]]


class TestAllowlistReachesDevices:
    @pytest.mark.parametrize("route", sorted(MODEL_ROUTES))
    async def test_a_device_paired_under_an_allowlist_is_held_to_it(
        self, start_gate: GateFactory, fake_lmstudio: FakeLMStudio, route: str
    ) -> None:
        gate = await start_gate(auth_allowed_models=(MODELS[1],))
        code, _ = gate.identity.pairing.create_code()
        token = (await pair(gate.url, code))["token"]
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["models"] == [MODELS[1]]
        record = next(r for r in gate.identity.tokens.list() if r.kind == "device")
        assert record.models == frozenset({MODELS[1]})

        assert await models_listed(gate.url, token) == [MODELS[1]]
        status, body = await call(gate.url, route, token=token, body=MODEL_ROUTES[route](MODELS[0]))
        assert (status, error_of(body)) == (403, ("model_not_allowed", "model")), body
        assert MODELS[0] not in json.dumps([r.json() for r in fake_lmstudio.received if r.body])
        status, body = await call(gate.url, route, token=token, body=MODEL_ROUTES[route](MODELS[1]))
        assert status == 200, body

    @pytest.mark.parametrize(
        ("at_pairing", "later", "visible"),
        [
            ((), (MODELS[1],), [MODELS[1]]),  # no list when it paired; one now
            ((MODELS[0], MODELS[1]), (MODELS[1],), [MODELS[1]]),  # the list narrowed
            ((MODELS[1],), (MODELS[0], MODELS[1]), [MODELS[0], MODELS[1]]),  # widened
            ((MODELS[1],), (), list(MODELS)),  # lifted: the setting as it is now, all models
        ],
    )
    async def test_a_changed_allowlist_applies_to_devices_paired_before(
        self,
        start_gate: GateFactory,
        at_pairing: tuple[str, ...],
        later: tuple[str, ...],
        visible: list[str],
    ) -> None:
        first = await start_gate(auth_allowed_models=at_pairing)
        code, _ = first.identity.pairing.create_code()
        token = (await pair(first.url, code))["token"]
        await first.server.stop()
        # A new start on the same data directory and key, with the setting changed.
        again = await start_gate(auth_allowed_models=later, store=first.store)
        assert await models_listed(again.url, token) == visible
        refused = next((m for m in MODELS[:2] if m not in visible), None)
        if refused is None:
            return  # nothing is refused any more
        status, body = await call(
            again.url,
            "/v1/chat/completions",
            token=token,
            body=MODEL_ROUTES["/v1/chat/completions"](refused),
        )
        assert (status, error_of(body)) == (403, ("model_not_allowed", "model"))

    def test_saving_settings_in_the_tray_restricts_devices_paired_before(self, tray: Tray) -> None:
        controller = tray.controller
        controller.start().result(20)
        link = controller.pairing_link().result(5)
        token = post_json(tray.url + "/pair", {"code": link.code})[1]["token"]
        assert sync_models(tray.url, token) == list(MODELS)
        settings = controller.settings().result(5)
        controller.save_settings(replace(settings, auth_allowed_models=(MODELS[1],))).result(30)
        assert sync_models(tray.url, token) == [MODELS[1]]
        status, body = post_json(
            tray.url + "/v1/chat/completions",
            MODEL_ROUTES["/v1/chat/completions"](MODELS[0]),
            token,
        )
        assert (status, error_of(body)) == (403, ("model_not_allowed", "model"))


# ---- the tray (controller) with a file store the CLI shares ------------------------------


@dataclass
class Tray:
    controller: ThreadedController
    env: Env

    @property
    def url(self) -> str:
        url = self.controller.state.gateway_url
        assert url
        return url


@pytest.fixture
def tray(env: Env, tmp_path: Path, lmstudio_thread: FakeLMStudio) -> Iterator[Tray]:
    FileSecretStore(tmp_path / "secrets").set(LMSTUDIO_API_TOKEN, LMSTUDIO_TOKEN)
    # In a file, as a user's settings are: saving Settings rewrites it and starts again from it.
    config_path = tmp_path / "config.toml"
    settings = {
        "upstream.url": lmstudio_thread.url,
        "server.port": 0,
        "streaming.heartbeat_interval": 0.0,
        "limits.auth_failures_per_minute": 10_000,
        "storage.data_dir": str(env.data),
        "secrets.store": "file",
        "secrets.file_dir": str(tmp_path / "secrets"),
    }
    config_path.write_text(dump_settings(settings), encoding="utf-8")
    config = load_config(path=config_path, environ={})
    controller = ThreadedController(Controller(config, config_path=config_path))
    yield Tray(controller, env)
    controller.shutdown()


def request_json(
    url: str, method: str = "GET", body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        with exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None


def post_json(url: str, body: Any, token: str | None = None) -> tuple[int, Any]:
    return request_json(url, "POST", body, token)


def sync_models(url: str, token: str) -> list[str]:
    status, body = request_json(url + "/v1/models", token=token)
    assert status == 200, body
    return [m["id"] for m in body["data"]]


# ---- 4: each credential its own principal -------------------------------------------------


@dataclass
class Credential:
    secret: str
    revoke: Callable[[], None]


def _cli_token(tray: Tray) -> Credential:
    made = tray.env.run("token", "create", "friend")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    return Credential(token, lambda: _ok(tray.env.run("token", "revoke", jti)))


def _snippet(tray: Tray) -> Credential:
    snippet = tray.controller.curl_snippet().result(10)
    match = re.search(r"Authorization: Bearer ([\w.-]+)", snippet)
    assert match, snippet
    jti = jwt.decode(match.group(1), options={"verify_signature": False})["jti"]
    return Credential(match.group(1), lambda: tray.controller.revoke("token", jti).result(5))


def _api_key(tray: Tray) -> Credential:
    made = tray.env.run("key", "create", "friend")
    assert made.returncode == 0, made.stderr
    key_id = re.search(r"API key ([0-9a-f]{12}) for", made.stderr)
    assert key_id, made.stderr
    return Credential(
        made.stdout.strip(), lambda: _ok(tray.env.run("key", "revoke", key_id.group(1)))
    )


def _device(tray: Tray) -> Credential:
    link = tray.controller.pairing_link().result(5)
    status, body = post_json(tray.url + "/pair", {"code": link.code, "device_name": "friend"})
    assert status == 200, body
    device_id = body["device_id"]
    return Credential(body["token"], lambda: _ok(tray.env.run("device", "revoke", device_id)))


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr


CREDENTIAL_KINDS: dict[str, Callable[[Tray], Credential]] = {
    "cli token": _cli_token,
    "snippet token": _snippet,
    "api key": _api_key,
    "device": _device,
}


def wait_refused(url: str, token: str) -> int:
    deadline = time.monotonic() + 5
    while True:
        status, _ = request_json(url + "/api/conversations", token=token)
        if status == 401 or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


class TestEachCredentialIsItsOwnPrincipal:
    @pytest.mark.parametrize("kind", sorted(CREDENTIAL_KINDS))
    def test_same_named_credentials_share_nothing(self, tray: Tray, kind: str) -> None:
        tray.controller.start().result(20)
        make = CREDENTIAL_KINDS[kind]
        first, second = make(tray), make(tray)
        base = tray.url
        status, mine = post_json(
            base + "/api/chat", {"message": "first's secret", "model": MODELS[0]}, first.secret
        )
        assert status == 200, mine
        conversation = mine["conversation_id"]

        attempts = [
            ("POST", "/api/chat", {"message": "hi", "conversation_id": conversation}),
            ("GET", f"/api/conversations/{conversation}", None),
            ("DELETE", f"/api/conversations/{conversation}", None),
        ]
        for method, path, body in attempts:
            status, error = request_json(base + path, method, body, second.secret)
            assert (status, error_of(error)) == (404, ("conversation_not_found", None)), path
        _, listed = request_json(base + "/api/conversations", token=second.secret)
        assert conversation not in [c["id"] for c in listed["data"]]
        status, still = request_json(
            base + f"/api/conversations/{conversation}", token=first.secret
        )
        assert status == 200 and still["messages"][0]["content"] == "first's secret"

        first.revoke()
        assert wait_refused(base, first.secret) == 401
        status, body = post_json(
            base + "/api/chat", {"message": "second goes on", "model": MODELS[0]}, second.secret
        )
        assert status == 200, body
        _, listed = request_json(base + "/api/conversations", token=second.secret)
        assert [c["id"] for c in listed["data"]] == [body["conversation_id"]]


def _v1_database(path: Path) -> None:
    """A database as version 1 left it: tokens named after their name, snippets all one."""
    Database(path).close()
    conn = sqlite3.connect(path)
    rows = [
        ("a" * 24, "token:friend", "friend", "token"),
        ("b" * 24, "token:friend", "friend", "token"),
        ("c" * 24, "token:solo", "solo", "token"),
        ("d" * 24, "snippet:curl", "curl snippet", "snippet"),
        ("e" * 24, "snippet:curl", "curl snippet", "snippet"),
    ]
    with conn:
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        for jti, sub, name, kind in rows:
            conn.execute(
                "INSERT INTO tokens (jti, sub, name, kind, scopes, created, expires) "
                "VALUES (?, ?, ?, ?, 'chat', 1, 9999999999)",
                (jti, sub, name, kind),
            )
        conn.execute(
            "INSERT INTO tokens (jti, sub, name, kind, scopes, created, expires, device_id) "
            "VALUES (?, 'device:d1', 'phone', 'device', 'chat', 1, 9999999999, 'd1')",
            ("f" * 24,),
        )
        conn.execute("INSERT INTO devices (id, name, created) VALUES ('d1', 'phone', 1)")
        for principal in ("token:friend", "token:solo", "snippet:curl", "device:d1"):
            conn.execute(
                "INSERT INTO conversations (id, principal, title, model, created, updated) "
                "VALUES (?, ?, 't', NULL, 1, 1)",
                ("c-" + principal, principal),
            )
            conn.execute("INSERT INTO usage VALUES (?, 3, 0, 0, 1)", (principal,))
    conn.close()


class TestPrincipalMigration:
    def test_old_shared_principals_are_split_and_history_follows_a_sole_owner(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "lmgate.db"
        _v1_database(path)
        for _ in range(2):  # opening it again changes nothing more
            db = Database(path)
            subs = {r["jti"][0]: r["sub"] for r in db.query("SELECT jti, sub FROM tokens")}
            owners = {
                r["id"]: r["principal"] for r in db.query("SELECT id, principal FROM conversations")
            }
            usage = {u.principal for u in db.usage()}
            assert db.meta("schema_version") == str(SCHEMA_VERSION)
            db.close()
            assert subs == {
                "a": "token:" + "a" * 24,
                "b": "token:" + "b" * 24,
                "c": "token:" + "c" * 24,
                "d": "snippet:" + "d" * 24,
                "e": "snippet:" + "e" * 24,
                "f": "device:d1",
            }
            # One token held "solo": its history is its own. Two held "friend": whose it
            # was cannot be told, so neither gets it.
            assert owners == {
                "c-token:friend": "token:friend",
                "c-token:solo": "token:" + "c" * 24,
                "c-snippet:curl": "snippet:curl",
                "c-device:d1": "device:d1",
            }
            assert usage == {"token:friend", "token:" + "c" * 24, "snippet:curl", "device:d1"}

    def test_usage_names_every_principal(self, env: Env) -> None:
        env.data.mkdir(parents=True)
        _v1_database(env.data / "lmgate.db")
        usage = env.run("usage")
        assert usage.returncode == 0, usage.stderr
        lines = {line.split()[0]: line for line in usage.stdout.splitlines()[1:]}
        assert re.search(r"\ssolo\s+3\s", lines["token:" + "c" * 24])
        assert "friend (older tokens sharing that name)" in lines["token:friend"]
        assert "phone" in lines["device:d1"]


# The tokens table exactly as version 1 created it (no issued_sub column).
_V1_TOKENS = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
CREATE TABLE tokens (
    jti TEXT PRIMARY KEY, sub TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    scopes TEXT NOT NULL, models TEXT, max_tokens INTEGER, created REAL NOT NULL,
    expires REAL NOT NULL, revoked REAL, device_id TEXT);
CREATE TABLE conversations (
    id TEXT PRIMARY KEY, principal TEXT NOT NULL, title TEXT NOT NULL, model TEXT,
    created REAL NOT NULL, updated REAL NOT NULL);
"""


async def test_a_token_issued_before_the_upgrade_keeps_working_with_its_history(
    start_identity_gateway: IdentityFactory, tmp_path: Path
) -> None:
    data = tmp_path / "upgraded"
    data.mkdir()
    conn = sqlite3.connect(data / "lmgate.db")
    now = int(time.time())
    with conn:
        conn.executescript(_V1_TOKENS)
        conn.execute(
            "INSERT INTO tokens (jti, sub, name, kind, scopes, created, expires) "
            "VALUES (?, 'token:solo', 'solo', 'token', 'chat models', ?, ?)",
            ("s" * 24, now, now + 3600),
        )
        conn.execute(
            "INSERT INTO conversations VALUES ('old-chat', 'token:solo', 'Before', NULL, 1, 1)"
        )
    conn.close()
    rig = await start_identity_gateway(storage_data_dir=str(data))
    key = load_or_create_signing_key(rig.store)
    claims = {
        "sub": "token:solo",  # what version 1 put in the JWT it handed out
        "scope": "chat models",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": "s" * 24,
    }
    token = jwt.encode(claims, key, algorithm="HS256")
    async with aiohttp.ClientSession() as s:
        headers = {"Authorization": f"Bearer {token}"}
        async with s.get(rig.url + "/api/conversations", headers=headers) as r:
            assert r.status == 200, await r.text()
            assert [c["id"] for c in (await r.json())["data"]] == ["old-chat"]
        forged = jwt.encode({**claims, "sub": "token:" + "s" * 24}, key, algorithm="HS256")
        async with s.get(
            rig.url + "/v1/models", headers={"Authorization": f"Bearer {forged}"}
        ) as r:
            error = (await r.json())["error"]
            assert (r.status, error["code"]) == (401, "invalid_token")
            assert error["message"] == "The access token does not match the token LM Gate issued."


# ---- 5a: claims never trusted over the database ------------------------------------------


def _tampers() -> dict[str, Callable[[dict[str, Any]], None]]:
    def set_(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda claims: claims.__setitem__(name, value)

    def drop(name: str) -> Callable[[dict[str, Any]], None]:
        return lambda claims: claims.pop(name)

    def shift(name: str, by: int) -> Callable[[dict[str, Any]], None]:
        return lambda claims: claims.__setitem__(name, claims[name] + by)

    def backdate(claims: dict[str, Any]) -> None:
        claims["iat"] -= 3600
        claims["nbf"] -= 3600

    return {
        "sub of another token": set_("sub", "token:" + "0" * 24),
        "sub of a device": set_("sub", "device:000000000000"),
        "sub of a dev user": set_("sub", "dev:owner"),
        "more scopes": set_("scope", "chat embeddings metrics models"),
        "fewer scopes": set_("scope", "models"),
        "later exp": shift("exp", 365 * 86400),
        "earlier exp": shift("exp", -60),
        "backdated iat and nbf": backdate,
        "models removed": drop("models"),
        "models widened": set_("models", sorted(MODELS)),
        "models null": set_("models", None),
        "max_tokens removed": drop("max_tokens"),
        "max_tokens raised": set_("max_tokens", 1_000_000),
        "max_tokens as true": set_("max_tokens", True),
        "max_tokens as float": set_("max_tokens", 64.0),
        "an extra claim": set_("admin", True),
    }


TAMPERS = _tampers()


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory) -> IdentityRig:
    return await start_identity_gateway(clock=FakeClock(), limits_auth_failures_per_minute=100_000)


class TestClaimsNeverBeatTheRecord:
    def _issue(self, rig: IdentityRig) -> tuple[str, dict[str, Any]]:
        issued = rig.identity.tokens.issue(
            name="t",
            scopes=CHAT_SCOPES,
            ttl=3600,
            models=frozenset(MODELS[:2]),
            max_tokens=64,
        )
        return issued.token, jwt.decode(issued.token, options={"verify_signature": False})

    async def test_re_signing_the_same_claims_is_accepted(self, rig: IdentityRig) -> None:
        token, claims = self._issue(rig)
        claims = dict(reversed(claims.items()))  # another encoding of the same claims
        again = jwt.encode(claims, load_or_create_signing_key(rig.store), algorithm="HS256")
        assert again != token
        assert (await call(rig.url, token=again))[0] == 200
        assert (await call(rig.url, token=token))[0] == 200

    @pytest.mark.parametrize("tamper", sorted(TAMPERS))
    async def test_a_re_signed_token_that_differs_from_its_record_is_401(
        self, rig: IdentityRig, tamper: str
    ) -> None:
        token, claims = self._issue(rig)
        assert (await call(rig.url, token=token))[0] == 200  # the real one, now cached
        TAMPERS[tamper](claims)
        forged = jwt.encode(claims, load_or_create_signing_key(rig.store), algorithm="HS256")
        status, body = await call(rig.url, token=forged)
        assert (status, error_of(body)) == (401, ("invalid_token", None)), body
        assert "does not match" in body["error"]["message"]

    async def test_the_principal_comes_from_the_record(self, rig: IdentityRig) -> None:
        token, claims = self._issue(rig)
        principal = rig.identity.authenticator.authenticate(
            {"Authorization": f"Bearer {token}"}, "127.0.0.1"
        )
        assert principal == Principal(
            f"token:{claims['jti']}",
            CHAT_SCOPES,
            frozenset(MODELS[:2]),
            64,
            credential=PrincipalId(CredentialKind.TOKEN, claims["jti"]),
        )


# ---- 5b: a rotated key reaches the running gateway ----------------------------------------


class TestRotationReachesARunningGateway:
    async def test_a_second_process_rotates_and_the_gateway_follows(
        self, start_gate: GateFactory
    ) -> None:
        gate = await start_gate()
        old_token = gate.identity.tokens.issue(name="old", scopes=CHAT_SCOPES, ttl=3600).token
        code, _ = gate.identity.pairing.create_code()
        old_device = (await pair(gate.url, code))["token"]
        assert (await call(gate.url, token=old_token))[0] == 200

        cli = gate.second_process()
        try:
            rotation = rotate_signing_key_everywhere(cli, gate.store)
            assert (rotation.tokens_revoked, rotation.devices_revoked) == (2, 1)
            assert not any(d.revoked is None for d in cli.pairing.devices())
            new_token = cli.tokens.issue(name="new", scopes=CHAT_SCOPES, ttl=3600).token
            new_code, _ = cli.pairing.create_code()
        finally:
            cli.close()

        async def new_token_works() -> bool:
            return (await call(gate.url, token=new_token))[0] == 200

        assert await eventually(new_token_works), "the gateway kept the old key"
        for old in (old_token, old_device):
            status, body = await call(gate.url, token=old)
            assert status == 401 and error_of(body)[0] in {"invalid_token", "token_revoked"}
        paired = await pair(gate.url, new_code)
        new_key = load_or_create_signing_key(gate.store)
        jwt.decode(paired["token"], new_key, algorithms=["HS256"])  # signed with the new key
        assert (await call(gate.url, token=paired["token"]))[0] == 200

    async def test_lmgate_keys_rotate_reaches_a_running_gateway(
        self, start_gate: GateFactory, env: Env, tmp_path: Path
    ) -> None:
        gate = await start_gate(
            store=FileSecretStore(tmp_path / "secrets"), storage_data_dir=str(env.data)
        )
        code, _ = gate.identity.pairing.create_code()
        device = await pair(gate.url, code, "Anna's phone")
        rotated = env.run("keys", "rotate")
        assert rotated.returncode == 0, rotated.stderr
        assert "1) must pair again" in rotated.stdout
        listed = env.run("device", "list").stdout
        assert re.search(rf"^{device['device_id']}\s+Anna's phone.*revoked$", listed, re.M), listed
        made = env.run("token", "create", "after", "--scope", "models")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()

        async def works() -> bool:
            return (await call(gate.url, token=token))[0] == 200

        assert await eventually(works)
        status, body = await call(gate.url, token=device["token"])
        assert (status, body["error"]["code"]) == (401, "invalid_token"), body

    async def test_a_store_that_cannot_be_read_keeps_the_gateway_answering(
        self, start_gate: GateFactory
    ) -> None:
        store = LockableStore()
        gate = await start_gate(store=store)
        key = gate.identity.api_keys.create("k", scopes=CHAT_SCOPES)[0]
        cli = gate.second_process()
        try:
            rotate_signing_key_everywhere(cli, store)
            store.locked = True
            token = cli.tokens.issue(name="new", scopes=CHAT_SCOPES, ttl=3600).token
        finally:
            cli.close()
        await asyncio.sleep(0.6)
        assert (await call(gate.url, token=key))[0] == 200  # API keys are not signed
        status, body = await call(gate.url, token=token)
        assert (status, error_of(body)[0]) == (401, "invalid_token")
        store.locked = False
        cli = gate.second_process()  # the next change makes the gateway try again
        cli.api_keys.create("nudge", scopes=CHAT_SCOPES)
        cli.close()

        async def works() -> bool:
            return (await call(gate.url, token=token))[0] == 200

        assert await eventually(works)


class LockableStore(MemorySecretStore):
    """A keyring whose signing key can be locked away, as a desktop keyring's is after the
    screen locks."""

    locked = False

    def get(self, name: str) -> str | None:
        if self.locked and name == SIGNING_KEY:
            raise SecretStoreError("the collection is locked")
        return super().get(name)


# ---- 6: private files ---------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def database_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith("lmgate.db")]


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0)  # the worst case: nothing masked
    yield
    os.umask(old)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
class TestPrivateFiles:
    def test_a_fresh_data_directory_and_database_are_private(
        self, tmp_path: Path, loose_umask: None
    ) -> None:
        data = tmp_path / "a" / "b" / "data"
        db = Database.in_directory(data)
        try:
            with db.transaction() as conn:
                conn.execute("INSERT INTO usage (principal) VALUES ('x')")
            files = database_files(data)
            assert {p.name for p in files} >= {"lmgate.db", "lmgate.db-wal", "lmgate.db-shm"}
            assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
            for made in (tmp_path / "a", tmp_path / "a" / "b", data):
                assert mode(made) == 0o700, made
        finally:
            db.close()

    def test_an_existing_loose_data_directory_is_tightened(self, tmp_path: Path) -> None:
        data = tmp_path / "data"
        Database.in_directory(data).close()
        holder = sqlite3.connect(data / "lmgate.db")  # keeps -wal and -shm in place
        try:
            holder.execute("INSERT INTO usage (principal) VALUES ('x')")
            holder.commit()
            (data / "lmgate.db-journal").write_bytes(b"")
            loose = database_files(data)
            assert len(loose) == 4
            for path in loose:
                path.chmod(0o644)
            data.chmod(0o755)
            Database.in_directory(data).close()
            assert {p.name: mode(p) for p in loose} == {p.name: 0o600 for p in loose}
            assert mode(data) == 0o700
        finally:
            holder.close()

    def test_a_fresh_file_store_makes_every_directory_private(
        self, tmp_path: Path, loose_umask: None
    ) -> None:
        tmp_path.chmod(0o755)
        before = mode(tmp_path)
        store = FileSecretStore(tmp_path / "home" / "data" / "secrets")
        store.set("lmstudio-api-token", "sk-x")
        for made in ("home", "home/data", "home/data/secrets"):
            assert mode(tmp_path / made) == 0o700, made
        assert mode(tmp_path / "home" / "data" / "secrets" / "lmstudio-api-token") == 0o600
        assert mode(tmp_path) == before, "a directory LM Gate did not make is not its to change"

    def test_the_cli_on_a_fresh_install_with_the_file_store(self, env: Env, tmp_path: Path) -> None:
        env.vars.pop("LMGATE_SECRETS_FILE_DIR")  # the default: <data dir>/secrets
        env.vars["LMGATE_STORAGE_DATA_DIR"] = str(tmp_path / "fresh" / "data")
        made = env.run("token", "create", "t")
        assert made.returncode == 0, made.stderr
        data = tmp_path / "fresh" / "data"
        for directory in (tmp_path / "fresh", data, data / "secrets"):
            assert mode(directory) == 0o700, directory
        assert {p.name: mode(p) for p in database_files(data)} == {
            p.name: 0o600 for p in database_files(data)
        }

    def test_the_cli_tightens_an_existing_loose_install(self, env: Env) -> None:
        assert env.run("key", "list").returncode == 0
        env.data.chmod(0o755)
        (env.data / "lmgate.db").chmod(0o644)
        assert env.run("key", "list").returncode == 0
        assert mode(env.data) == 0o700
        assert mode(env.data / "lmgate.db") == 0o600

    def test_a_running_lmgate_serve_keeps_its_wal_private(self, env: Env) -> None:
        assert env.run("key", "list").returncode == 0
        env.data.chmod(0o755)
        (env.data / "lmgate.db").chmod(0o644)
        proc, _ = start_serve(env.vars)
        try:
            made = env.run("key", "create", "k")  # a write: the WAL has content now
            assert made.returncode == 0
            files = database_files(env.data)
            assert {"lmgate.db-wal", "lmgate.db-shm"} <= {p.name for p in files}
            assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
            assert mode(env.data) == 0o700
        finally:
            proc.terminate()
            proc.communicate(timeout=30)


# ---- 15: a credential the store holds is accepted on its first request --------------------


class TestNewCredentialsWorkAtOnce:
    @pytest.mark.parametrize("kind", ["api key", "token"])
    async def test_made_by_another_process_right_after_a_request(
        self, start_gate: GateFactory, kind: str
    ) -> None:
        gate = await start_gate()
        warm = gate.identity.api_keys.create("warm", scopes=CHAT_SCOPES)[0]
        cli = gate.second_process()
        try:
            for attempt in range(30):
                # A request first: the gateway has just refreshed, the next is half a second off.
                assert (await call(gate.url, token=warm))[0] == 200
                if kind == "api key":
                    new = cli.api_keys.create(f"k{attempt}", scopes=CHAT_SCOPES)[0]
                else:
                    new = cli.tokens.issue(name=f"t{attempt}", scopes=CHAT_SCOPES, ttl=60).token
                status, body = await call(gate.url, token=new)
                assert status == 200, (attempt, body)
        finally:
            cli.close()

    async def test_an_unknown_key_is_still_refused(self, start_gate: GateFactory) -> None:
        gate = await start_gate()
        status, body = await call(gate.url, token="lmg_" + "x" * 43)
        assert (status, error_of(body)) == (401, ("invalid_api_key", None))


# ---- 7 (part): dev mode only from this machine, addressed to it ----------------------------

# Names a rebinding page or a misdirected request uses; listed as allowed hosts so that only
# dev mode's own check stands between them and the gateway.
REBOUND_HOSTS = ("attacker.example", "localhost.attacker.example", "127.0.0.1.attacker.example")
PROXY_HEADER_VALUES = {
    "Forwarded": "for=127.0.0.1",
    "X-Forwarded-Host": "127.0.0.1",
    "X-Forwarded-Proto": "http",
}


async def dev_request(port: int, host: str, extra: dict[str, str] | None = None) -> RawResponse:
    lines = [
        "GET /v1/models HTTP/1.1",
        f"Host: {host}",
        "X-User-Id: alice",
        "Connection: close",
        *(f"{k}: {v}" for k, v in (extra or {}).items()),
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    return _parse(data)


@pytest.fixture
async def dev_gate(start_gate: GateFactory) -> Gate:
    gate: Gate = await start_gate(auth_dev_mode=True, server_allowed_hosts=REBOUND_HOSTS)
    return gate


class TestDevModeOnlyFromThisMachine:
    @pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "LOCALHOST:{port}"])
    async def test_loopback_hosts_without_proxy_headers_are_accepted(
        self, dev_gate: Gate, host: str
    ) -> None:
        answer = await dev_request(dev_gate.port, host.format(port=dev_gate.port))
        assert answer.status == 200, answer.body

    @pytest.mark.parametrize("header", [*PROXY_HEADERS, "x-real-ip", "CF-CONNECTING-IP"])
    async def test_every_proxy_header_is_refused(self, dev_gate: Gate, header: str) -> None:
        # Even naming this machine: a relayed request is someone else's.
        value = PROXY_HEADER_VALUES.get(header, "127.0.0.1")
        answer = await dev_request(dev_gate.port, f"127.0.0.1:{dev_gate.port}", {header: value})
        assert answer.status == 401, answer.body
        assert error_of(answer.json()) == ("dev_mode_remote", None)

    @pytest.mark.parametrize(
        "host", ["attacker.example:8787", "attacker.example", *REBOUND_HOSTS[1:]]
    )
    async def test_a_rebinding_host_is_refused(self, dev_gate: Gate, host: str) -> None:
        answer = await dev_request(dev_gate.port, host)
        assert answer.status == 401, answer.body
        assert error_of(answer.json()) == ("dev_mode_remote", None)

    @pytest.mark.parametrize(
        "host",
        ["localhost", "LocalHost:8787", "127.0.0.1", "127.5.6.7:1", "[::1]", "[::1]:8787"],
    )
    def test_host_names_of_this_machine(self, host: str) -> None:
        assert is_loopback_host(host)

    @pytest.mark.parametrize(
        "host",
        [
            None,
            "",
            "attacker.example",
            "localhost.",
            "localhost:",
            "localhost:abc",
            "localhost:80:80",
            "localhost@attacker.example",
            "127.1",
            "127.0.0.1.nip.io",
            "0.0.0.0",
            "10.0.0.1:8787",
            "::1",
            "[::1",
            "[::1]x",
            "[::2]",
            "[::1]:123456",
        ],
    )
    def test_host_names_of_other_machines(self, host: str | None) -> None:
        assert not is_loopback_host(host)

    def test_a_request_with_no_host_is_refused(self, tmp_path: Path) -> None:
        identity = open_identity(
            Config(auth_dev_mode=True, storage_data_dir=str(tmp_path)), b"k" * 32
        )
        try:
            with pytest.raises(AuthError) as caught:
                identity.authenticator.authenticate({"X-User-Id": "bob"}, "127.0.0.1")
            assert caught.value.code == "dev_mode_remote"
            principal = identity.authenticator.authenticate(
                {"X-User-Id": "bob", "Host": "localhost"}, "127.0.0.1"
            )
            assert (principal.name, str(principal.credential)) == ("dev:bob", "dev:bob")
            assert principal.credential == PrincipalId(CredentialKind.DEV, "bob")
        finally:
            identity.close()


# ---- stream revocation support: still_valid ------------------------------------------------


@dataclass
class Live:
    authenticator: IdentityAuthenticator
    identity: Identity
    other: Identity  # another process (the CLI) on the same database
    clock: FakeClock

    def principal(self, secret: str) -> Principal:
        return self.authenticator.authenticate({"Authorization": f"Bearer {secret}"}, None)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    clock = FakeClock()
    config = Config(storage_data_dir=str(tmp_path))
    identity = open_identity(config, b"k" * 32, clock=clock)
    other = open_identity(config, b"k" * 32, clock=clock)
    yield Live(identity.authenticator, identity, other, clock)
    other.close()
    identity.close()


def _live_key(live: Live) -> tuple[str, str, Callable[[], object]]:
    key, record = live.identity.api_keys.create("k", scopes=CHAT_SCOPES, ttl=60)
    return key, f"key:{record.id}", lambda: live.other.api_keys.revoke(record.id)


def _live_token(live: Live) -> tuple[str, str, Callable[[], object]]:
    issued = live.identity.tokens.issue(name="t", scopes=CHAT_SCOPES, ttl=60)
    jti = issued.record.jti
    return issued.token, f"token:{jti}", lambda: live.other.tokens.revoke(jti)


def _live_device(live: Live) -> tuple[str, str, Callable[[], object]]:
    code, _ = live.identity.pairing.create_code()
    issued = live.identity.pairing.exchange(code, "phone")
    device_id = issued.record.device_id
    assert device_id
    return (
        issued.token,
        f"token:{issued.record.jti}",
        lambda: live.other.pairing.revoke_device(device_id),
    )


def _live_device_row_only(live: Live) -> tuple[str, str, Callable[[], object]]:
    token, credential, _ = _live_device(live)
    device_id = live.identity.pairing.devices()[-1].id

    def revoke_the_device_but_not_its_tokens() -> None:  # as if interrupted half-way
        with live.other.db.transaction() as conn:
            conn.execute("UPDATE devices SET revoked = 1 WHERE id = ?", (device_id,))

    return token, credential, revoke_the_device_but_not_its_tokens


LIVE_KINDS = {
    "api key": _live_key,
    "token": _live_token,
    "device": _live_device,
    "device row only": _live_device_row_only,
}


class TestStillValid:
    @pytest.mark.parametrize("kind", sorted(LIVE_KINDS))
    def test_revoked_by_another_process_ends_within_one_refresh(
        self, live: Live, kind: str
    ) -> None:
        secret, credential, revoke = LIVE_KINDS[kind](live)
        principal = live.principal(secret)
        assert str(principal.credential) == credential
        assert live.authenticator.still_valid(principal)
        revoke()
        live.clock.advance(0.5)  # one refresh period
        assert not live.authenticator.still_valid(principal)
        with pytest.raises(AuthError):
            live.principal(secret)

    @pytest.mark.parametrize("kind", ["api key", "token"])
    def test_expired_is_no_longer_valid(self, live: Live, kind: str) -> None:
        secret, _, _ = LIVE_KINDS[kind](live)
        principal = live.principal(secret)
        live.clock.advance(30)
        assert live.authenticator.still_valid(principal)
        live.clock.advance(40)  # past 60 s and the 5 s leeway
        assert not live.authenticator.still_valid(principal)

    def test_dev_and_unknown_credentials(self, live: Live) -> None:
        dev = Principal("dev:bob", CHAT_SCOPES, credential=PrincipalId(CredentialKind.DEV, "bob"))
        assert not live.authenticator.still_valid(dev)  # dev mode is off
        live.authenticator.dev_mode = True
        assert live.authenticator.still_valid(dev)
        for credential in (
            None,
            PrincipalId(CredentialKind.TOKEN, "0" * 24),
            PrincipalId(CredentialKind.KEY, "000000000000"),
            # A device or snippet speaks through its tokens; it never is the credential.
            PrincipalId(CredentialKind.DEVICE, "000000000000"),
            PrincipalId(CredentialKind.SNIPPET, "0" * 24),
        ):
            assert not live.authenticator.still_valid(
                Principal("x", CHAT_SCOPES, credential=credential)
            )

    @pytest.mark.parametrize("text", ["", "owner", ":x", "token:", "tokens:x", "TOKEN:x", None])
    def test_what_is_no_principal_id_reads_as_none(self, text: str | None) -> None:
        assert PrincipalId.parse(text) is None
