"""Identity over real HTTP: JWT rejection cases, scopes and model allowlists, API keys, the
signing key's rotation, and pairing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Any

import aiohttp
import jwt
import openai
import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.fakes import FakeClock
from tray_app.identity.pairing import DEVICE_SCOPES
from tray_app.identity.principal import ALL_SCOPES
from tray_app.identity.signing_key import (
    SIGNING_KEY,
    load_or_create_signing_key,
    rotate_signing_key,
)

# Both a request body and the OpenAI client's keyword arguments.
CHAT: dict[str, Any] = {"model": MODELS[0], "messages": [{"role": "user", "content": "hi"}]}


async def call(
    rig: IdentityRig,
    path: str = "/v1/models",
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    json_body: Any = None,
    method: str | None = None,
) -> tuple[int, Any, Any]:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    verb = method or ("POST" if json_body is not None else "GET")
    async with (
        aiohttp.ClientSession() as s,
        s.request(verb, rig.url + path, headers=sent, json=json_body) as r,
    ):
        text = await r.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        return r.status, body, r.headers


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forge(
    header: dict[str, Any], claims: dict[str, Any], key: bytes | None, digest: Any = hashlib.sha256
) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory) -> IdentityRig:
    return await start_identity_gateway(clock=FakeClock(), limits_auth_failures_per_minute=1000)


def issue(rig: IdentityRig, **kwargs: Any) -> str:
    kwargs.setdefault("name", "t")
    kwargs.setdefault("scopes", frozenset({"chat", "models"}))
    kwargs.setdefault("ttl", 3600)
    return rig.identity.tokens.issue(**kwargs).token


async def test_a_valid_token_works_with_the_openai_client(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    token = issue(rig)
    async with openai.AsyncOpenAI(base_url=rig.url + "/v1", api_key=token, max_retries=0) as client:
        assert [m.id for m in (await client.models.list()).data] == list(MODELS)
        reply = await client.chat.completions.create(**CHAT)
    assert reply.choices[0].message.content


# ---- point 3: every rejection case -------------------------------------------------------


async def test_missing_credentials_are_401(rig: IdentityRig) -> None:
    status, body, headers = await call(rig)
    assert (status, body["error"]["code"]) == (401, "missing_api_key")
    assert headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "credential", ["abc", "a.b.c", "eyJ.eyJ.sig", "x" * 5000, "....", "Bearer", "ey" + "A" * 40]
)
async def test_malformed_tokens_are_401(rig: IdentityRig, credential: str) -> None:
    status, body, _ = await call(rig, token=credential)
    assert status == 401
    assert body["error"]["code"] == "invalid_token"
    assert body["error"]["type"] == "authentication_error"


def claims_for(rig: IdentityRig, **override: Any) -> dict[str, Any]:
    token = issue(rig)
    claims = jwt.decode(token, options={"verify_signature": False})
    claims.update(override)
    return claims


async def test_alg_none_is_401(rig: IdentityRig) -> None:
    token = forge({"alg": "none", "typ": "JWT"}, claims_for(rig), None)
    status, body, _ = await call(rig, token=token)
    assert (status, body["error"]["code"]) == (401, "invalid_token")


async def test_hs512_with_the_right_key_is_401(rig: IdentityRig) -> None:
    key = load_or_create_signing_key(rig.store)
    token = forge({"alg": "HS512", "typ": "JWT"}, claims_for(rig), key, hashlib.sha512)
    status, body, _ = await call(rig, token=token)
    assert (status, body["error"]["code"]) == (401, "invalid_token")
    assert "algorithm" in body["error"]["message"]


async def test_rs256_confusion_is_401(rig: IdentityRig) -> None:
    # The classic confusion: claim RS256 and sign with HMAC over the "public key" bytes.
    key = load_or_create_signing_key(rig.store)
    token = forge({"alg": "RS256", "typ": "JWT"}, claims_for(rig), key)
    status, body, _ = await call(rig, token=token)
    assert (status, body["error"]["code"]) == (401, "invalid_token")
    assert "algorithm" in body["error"]["message"]


async def test_bad_signature_is_401(rig: IdentityRig) -> None:
    token = forge({"alg": "HS256", "typ": "JWT"}, claims_for(rig), b"k" * 32)
    status, body, _ = await call(rig, token=token)
    assert (status, body["error"]["code"]) == (401, "invalid_token")


async def test_tampered_payload_is_401(rig: IdentityRig) -> None:
    token = issue(rig, scopes=frozenset({"models"}))
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scope"] = "chat models metrics embeddings"
    tampered = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    status, body, _ = await call(rig, token=tampered)
    assert (status, body["error"]["code"]) == (401, "invalid_token")


async def test_expired_token_is_401(rig: IdentityRig) -> None:
    token = issue(rig, ttl=60)
    assert (await call(rig, token=token))[0] == 200
    assert isinstance(rig.clock, FakeClock)
    rig.clock.advance(120)
    status, body, _ = await call(rig, token=token)
    assert (status, body["error"]["code"]) == (401, "token_expired")


async def test_not_yet_valid_token_is_401(rig: IdentityRig) -> None:
    key = load_or_create_signing_key(rig.store)
    claims = claims_for(rig)
    claims["nbf"] = claims["iat"] + 3600  # same (registered) jti, valid only in an hour
    token = forge({"alg": "HS256", "typ": "JWT"}, claims, key)
    status, body, _ = await call(rig, token=token)
    assert (status, body["error"]["code"]) == (401, "token_not_yet_valid")


async def test_revoked_token_is_401_at_once(rig: IdentityRig) -> None:
    issued = rig.identity.tokens.issue(name="t", scopes=frozenset({"models"}), ttl=3600)
    assert (await call(rig, token=issued.token))[0] == 200  # now cached as verified
    rig.identity.tokens.revoke(issued.record.jti)
    status, body, _ = await call(rig, token=issued.token)
    assert (status, body["error"]["code"]) == (401, "token_revoked")


async def test_a_validly_signed_token_that_was_never_issued_is_401(rig: IdentityRig) -> None:
    key = load_or_create_signing_key(rig.store)
    token = forge({"alg": "HS256", "typ": "JWT"}, claims_for(rig, jti="f" * 24), key)
    status, body, _ = await call(rig, token=token)
    assert (status, body["error"]["code"]) == (401, "token_revoked")


@pytest.mark.parametrize("missing", ["sub", "scope", "iat", "nbf", "exp", "jti"])
async def test_tokens_missing_a_required_claim_are_401(rig: IdentityRig, missing: str) -> None:
    key = load_or_create_signing_key(rig.store)
    claims = claims_for(rig)
    del claims[missing]
    status, body, _ = await call(rig, token=forge({"alg": "HS256", "typ": "JWT"}, claims, key))
    assert (status, body["error"]["code"]) == (401, "invalid_token")


async def test_wrong_scope_is_403(rig: IdentityRig, fake_lmstudio: FakeLMStudio) -> None:
    token = issue(rig, scopes=frozenset({"models"}))
    status, body, _ = await call(rig, "/v1/chat/completions", token=token, json_body=CHAT)
    assert (status, body["error"]["code"]) == (403, "insufficient_scope")
    status, body, _ = await call(
        rig, "/v1/embeddings", token=issue(rig), json_body={"model": MODELS[2], "input": "x"}
    )
    assert (status, body["error"]["code"]) == (403, "insufficient_scope")
    assert [r.path for r in fake_lmstudio.received] == []


async def test_model_allowlist_is_enforced_and_filters_the_list(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    token = issue(rig, models=frozenset({MODELS[1]}))
    status, body, _ = await call(rig, token=token)
    assert [m["id"] for m in body["data"]] == [MODELS[1]]
    status, body, _ = await call(rig, "/v1/chat/completions", token=token, json_body=CHAT)
    assert (status, body["error"]["code"]) == (403, "model_not_allowed")
    status, _, _ = await call(
        rig, "/v1/chat/completions", token=token, json_body={**CHAT, "model": MODELS[1]}
    )
    assert status == 200


async def test_max_tokens_cap_is_applied(rig: IdentityRig, fake_lmstudio: FakeLMStudio) -> None:
    token = issue(rig, max_tokens=64)
    await call(rig, "/v1/chat/completions", token=token, json_body={**CHAT, "max_tokens": 4096})
    await call(rig, "/v1/chat/completions", token=token, json_body=CHAT)
    await call(rig, "/v1/chat/completions", token=token, json_body={**CHAT, "max_tokens": 10})
    sent = [r.json().get("max_tokens") for r in fake_lmstudio.received]
    assert sent == [64, 64, 10]


async def test_rotating_the_signing_key_invalidates_every_token(rig: IdentityRig) -> None:
    token = issue(rig)
    assert (await call(rig, token=token))[0] == 200
    rig.identity.tokens.replace_key(rotate_signing_key(rig.store))
    status, body, _ = await call(rig, token=token)
    assert (status, body["error"]["code"]) == (401, "invalid_token")
    assert rig.store.get(SIGNING_KEY) is not None
    assert (await call(rig, token=issue(rig)))[0] == 200  # new tokens work


# ---- point 4: API keys -------------------------------------------------------------------


async def test_api_keys_work_as_bearer_and_x_api_key(rig: IdentityRig) -> None:
    key, _record = rig.identity.api_keys.create("script", scopes=frozenset({"models"}))
    assert re.fullmatch(r"lmg_[A-Za-z0-9_-]{43}", key)  # 32 random bytes
    assert (await call(rig, token=key))[0] == 200
    assert (await call(rig, headers={"X-API-Key": key}))[0] == 200
    stored = rig.identity.db.query("SELECT * FROM api_keys")[0]
    assert stored["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert key not in json.dumps(dict(stored))


async def test_revoked_and_expired_api_keys_are_401(rig: IdentityRig) -> None:
    key, record = rig.identity.api_keys.create("a", scopes=frozenset({"models"}))
    rig.identity.api_keys.revoke(record.id)
    status, body, _ = await call(rig, token=key)
    assert (status, body["error"]["code"]) == (401, "api_key_revoked")
    key2, _ = rig.identity.api_keys.create("b", scopes=frozenset({"models"}), ttl=60)
    assert isinstance(rig.clock, FakeClock)
    rig.clock.advance(61)
    status, body, _ = await call(rig, token=key2)
    assert (status, body["error"]["code"]) == (401, "api_key_expired")
    status, body, _ = await call(rig, token="lmg_" + "x" * 43)
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")


async def test_api_key_last_used_is_recorded(rig: IdentityRig) -> None:
    key, record = rig.identity.api_keys.create("a", scopes=frozenset({"models"}))
    await call(rig, token=key)
    rig.identity.recorder.flush()
    listed = {r.id: r for r in rig.identity.api_keys.list()}
    assert listed[record.id].last_used == rig.clock.time()


# ---- point 5: pairing ----------------------------------------------------------------------


async def test_pairing_code_exchanges_once_for_a_device_token(rig: IdentityRig) -> None:
    code, expires = rig.identity.pairing.create_code()
    assert len(code) <= 24 and re.fullmatch(r"[A-Z2-7]+", code)
    assert len(code) * 5 >= 96  # bits of entropy: 24 base32 characters carry 120
    assert expires - rig.clock.time() == 600
    status, body, headers = await call(
        rig, "/pair", json_body={"code": code, "device_name": "Pixel 9"}
    )
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert set(claims["scope"].split()) == DEVICE_SCOPES
    assert claims["exp"] - claims["iat"] == 30 * 86400
    assert claims["sub"] == f"device:{body['device_id']}"
    assert (await call(rig, token=body["token"]))[0] == 200
    status, again, _ = await call(rig, "/pair", json_body={"code": code, "device_name": "x"})
    assert (status, again["error"]["code"]) == (401, "pairing_code_used")


async def test_expired_pairing_code_is_refused(rig: IdentityRig) -> None:
    code, _ = rig.identity.pairing.create_code()
    assert isinstance(rig.clock, FakeClock)
    rig.clock.advance(601)
    status, body, _ = await call(rig, "/pair", json_body={"code": code})
    assert (status, body["error"]["code"]) == (401, "pairing_code_expired")
    assert "new QR code" in body["error"]["message"]


@pytest.mark.parametrize(
    ("payload", "param"),
    # A body that is not an object names no parameter; a bad object names the code.
    [({"code": 123}, "code"), ({"device_name": "x"}, "code"), ([1], None), ("code", None)],
)
async def test_malformed_pair_requests_are_400(
    rig: IdentityRig, payload: Any, param: str | None
) -> None:
    status, body, _ = await call(rig, "/pair", json_body=payload)
    error = body["error"]
    assert (status, error["type"], error["code"], error["param"]) == (
        400,
        "invalid_request_error",
        "invalid_body",
        param,
    )


async def test_pairing_brute_force_is_throttled(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start_identity_gateway(clock=FakeClock(), limits_pairing_attempts_per_minute=5)
    code, _ = rig.identity.pairing.create_code()
    for i in range(5):
        status, body, _ = await call(rig, "/pair", json_body={"code": f"{i:0>24}"})
        assert status == 401
    status, body, headers = await call(rig, "/pair", json_body={"code": "A" * 24})
    assert (status, body["error"]["code"]) == (429, "too_many_pairing_attempts")
    assert int(headers["Retry-After"]) >= 1
    assert isinstance(rig.clock, FakeClock)
    rig.clock.advance(15)  # a minute refills five attempts: one every 12 s
    status, body, _ = await call(rig, "/pair", json_body={"code": "B" * 24})
    assert (status, body["error"]["code"]) == (401, "pairing_code_invalid")
    # Others' failed guesses at this address never refuse the valid code.
    status, body, _ = await call(rig, "/pair", json_body={"code": code})
    assert status == 200


async def test_devices_can_be_listed_and_revoked(rig: IdentityRig) -> None:
    tokens = []
    for name in ("phone", "tablet"):
        code, _ = rig.identity.pairing.create_code()
        _, body, _ = await call(rig, "/pair", json_body={"code": code, "device_name": name})
        tokens.append(body["token"])
    devices = rig.identity.pairing.devices()
    assert [d.name for d in devices] == ["phone", "tablet"]
    rig.identity.pairing.revoke_device(devices[0].id)
    assert (await call(rig, token=tokens[0]))[0] == 401
    assert (await call(rig, token=tokens[1]))[0] == 200
    assert rig.identity.pairing.revoke_all_devices() == 1
    assert (await call(rig, token=tokens[1]))[0] == 401


async def test_device_name_is_cleaned(rig: IdentityRig) -> None:
    code, _ = rig.identity.pairing.create_code()
    await call(rig, "/pair", json_body={"code": code, "device_name": "a\x00b\n\tc" + "d" * 100})
    name = rig.identity.pairing.devices()[0].name
    assert name.startswith("ab c") and len(name) == 64 and name.isprintable()


async def test_all_scopes_token_can_do_everything(rig: IdentityRig) -> None:
    token = issue(rig, scopes=ALL_SCOPES)
    assert (await call(rig, "/metrics", token=token))[0] == 200
    assert (
        await call(rig, "/v1/embeddings", token=token, json_body={"model": MODELS[2], "input": "x"})
    )[0] == 200


async def test_unknown_but_well_formed_pairing_code_is_refused(rig: IdentityRig) -> None:
    status, body, _ = await call(rig, "/pair", json_body={"code": "A" * 24})
    assert (status, body["error"]["code"]) == (401, "pairing_code_invalid")
    code, _ = rig.identity.pairing.create_code()
    spaced = "-".join(code[i : i + 4] for i in range(0, 24, 4)).lower()  # typed by hand
    status, body, _ = await call(rig, "/pair", json_body={"code": spaced})
    assert status == 200, body
