"""Issue 12's gateway-level defects, each as a class of cases through real sockets: the Host
name (DNS rebinding), whose forwarding headers are believed, body size and time limits on every
JSON endpoint, CORS for the conversation API, phone chats counted like any other, /readyz
caching, CONNECT, and streams ended when their credential is revoked."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.fakes import FakeClock
from tests.helpers import LogCapture, raw_request, sse_events
from tray_app.identity.principal import ALL_SCOPES

CHAT = {"model": MODELS[0], "messages": [{"role": "user", "content": "hi"}]}


def key_for(rig: IdentityRig, name: str = "k", **kwargs: Any) -> str:
    return rig.identity.api_keys.create(name, scopes=ALL_SCOPES, **kwargs)[0]


def bearer(key: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **more}


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory) -> IdentityRig:
    # /v1/messages/count_tokens is served only with the messages route on.
    return await start_identity_gateway(routes_enable_messages=True)


# ---- defect 7: the Host header ------------------------------------------------------------

# (method, path, body): one of each kind of endpoint the gateway answers.
ENDPOINTS = [
    ("GET", "/readyz", b""),
    ("GET", "/metrics", b""),
    ("GET", "/", b""),
    ("GET", "/v1/models", b""),
    ("POST", "/v1/chat/completions", json.dumps(CHAT).encode()),
    ("POST", "/v1/messages/count_tokens", json.dumps(CHAT).encode()),
    ("POST", "/stream-check", b""),
    ("GET", "/api/conversations", b""),
    ("GET", "/api/conversations/abc123", b""),
    ("DELETE", "/api/conversations/abc123", b""),
    ("POST", "/api/chat", b'{"message": "hi"}'),
    ("POST", "/pair", b'{"code": "AAAAAAAAAAAAAAAAAAAAAAAA"}'),
]
FOREIGN_HOSTS = [
    "attacker.example",
    "attacker.example:8787",
    "evil.localhost",
    "localhost.attacker.example",
    "127.0.0.1.nip.io",
]


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
async def test_a_foreign_host_name_is_refused_everywhere(
    rig: IdentityRig,
    fake_lmstudio: FakeLMStudio,
    method: str,
    path: str,
    body: bytes,
    host: str,
) -> None:
    key = key_for(rig)
    assert rig.server.port is not None
    headers = {**bearer(key), "Host": host, "Content-Type": "application/json"}
    answer = await raw_request(rig.server.port, method, path, headers, body)
    assert answer.status == 421, answer.body
    error = answer.json()["error"]
    assert (error["code"], error["type"], error["param"]) == (
        "host_not_allowed",
        "invalid_request_error",
        None,
    )
    assert "server.allowed_hosts" in error["message"]
    assert fake_lmstudio.received == []


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:8787", "10.1.2.3"])
async def test_addresses_and_localhost_are_served(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio, host: str
) -> None:
    key = key_for(rig)
    assert rig.server.port is not None
    headers = {**bearer(key), "Host": host.format(port=rig.server.port)}
    answer = await raw_request(rig.server.port, "GET", "/v1/models", headers)
    assert answer.status == 200, answer.body


async def test_healthz_answers_any_host_so_a_new_tunnel_can_prove_itself(
    rig: IdentityRig,
) -> None:
    assert rig.server.port is not None
    answer = await raw_request(rig.server.port, "GET", "/healthz", {"Host": "new.ngrok.app"})
    assert (answer.status, answer.json()) == (200, {"status": "ok"})


async def test_configured_names_and_the_tunnels_public_host_are_served(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start_identity_gateway(server_allowed_hosts=("llm.example.com",))
    key = key_for(rig)
    port = rig.server.port
    assert port is not None

    async def status(host: str) -> int:
        return (await raw_request(port, "GET", "/v1/models", {**bearer(key), "Host": host})).status

    assert await status("LLM.example.com.") == 200  # case and a trailing dot do not matter
    assert await status("calm-otter.ngrok-free.app") == 421
    rig.server.gateway.tunnel_opened("https://calm-otter.ngrok-free.app", "X-Forwarded-For")
    assert await status("calm-otter.ngrok-free.app") == 200
    assert await status("other.ngrok-free.app") == 421
    rig.server.gateway.tunnel_closed()
    assert await status("calm-otter.ngrok-free.app") == 421


# ---- defect 10: whose forwarding headers are believed ----------------------------------------


async def logged_client(rig: IdentityRig, headers: dict[str, str]) -> str:
    with LogCapture() as logs:
        async with (
            aiohttp.ClientSession() as s,
            s.get(rig.url + "/healthz", headers=headers) as r,
        ):
            await r.read()
        await asyncio.sleep(0.01)  # the access line is written just after the answer
    return str(logs.access()[-1]["client"])


SPOOFS = [
    {"X-Forwarded-For": "203.0.113.7"},
    {"CF-Connecting-IP": "203.0.113.7"},
    {"X-Real-IP": "203.0.113.7"},
    {"Forwarded": "for=203.0.113.7"},
    {"True-Client-IP": "203.0.113.7"},
]


@pytest.mark.parametrize("spoof", SPOOFS, ids=lambda h: next(iter(h)))
async def test_no_forwarding_header_is_believed_without_a_tunnel_or_proxy(
    rig: IdentityRig, spoof: dict[str, str]
) -> None:
    assert await logged_client(rig, spoof) == "127.0.0.1"


@pytest.mark.parametrize(
    ("tunnel_header", "believed"),
    [("X-Forwarded-For", "X-Forwarded-For"), ("CF-Connecting-IP", "CF-Connecting-IP")],
)
async def test_only_the_running_tunnels_own_header_is_believed(
    rig: IdentityRig, tunnel_header: str, believed: str
) -> None:
    rig.server.gateway.tunnel_opened("https://x.example", tunnel_header)
    for spoof in SPOOFS:
        (name,) = spoof
        expected = "203.0.113.7" if name == believed else "127.0.0.1"
        assert await logged_client(rig, spoof) == expected, name
    rig.server.gateway.tunnel_closed()
    for spoof in SPOOFS:
        assert await logged_client(rig, spoof) == "127.0.0.1"


async def test_a_tunnel_without_an_agent_trusts_no_header(rig: IdentityRig) -> None:
    rig.server.gateway.tunnel_opened("http://192.168.1.20:8787", None)  # LAN mode
    assert await logged_client(rig, {"X-Forwarded-For": "203.0.113.7"}) == "127.0.0.1"
    assert not rig.server.gateway.trusts_peer("127.0.0.1")


async def test_trusts_peer_follows_the_tunnel_and_the_configuration(
    start_identity_gateway: IdentityFactory,
) -> None:
    plain = await start_identity_gateway()
    gateway = plain.server.gateway
    assert not gateway.trusts_peer("127.0.0.1")
    gateway.tunnel_opened("https://x.example", "X-Forwarded-For")
    assert gateway.trusts_peer("127.0.0.1") and gateway.trusts_peer("::1")
    assert not gateway.trusts_peer("192.0.2.1")
    gateway.tunnel_closed()
    assert not gateway.trusts_peer("127.0.0.1")
    proxied = await start_identity_gateway(server_trusted_proxies=("192.0.2.0/24",))
    assert proxied.server.gateway.trusts_peer("192.0.2.1")
    assert not proxied.server.gateway.trusts_peer("127.0.0.1")


async def test_a_locked_out_address_can_still_pair_with_a_valid_code(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start_identity_gateway(clock=FakeClock(), limits_pairing_attempts_per_minute=2)
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(rig.url + "/pair", json={"code": "A" * 24}) as r:
                assert r.status == 401
        async with s.post(rig.url + "/pair", json={"code": "B" * 24}) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (
                429,
                "too_many_pairing_attempts",
            )
        code, _ = rig.identity.pairing.create_code()
        async with s.post(rig.url + "/pair", json={"code": code}) as r:
            assert r.status == 200


@pytest.mark.parametrize(
    "body", [b"", b"[]", b"{", b'{"code": 5}', b"\xff\xfe", b'{"code": "x"' + b" " * 10]
)
async def test_malformed_pairing_bodies_count_against_the_pairing_throttle(
    start_identity_gateway: IdentityFactory, body: bytes
) -> None:
    rig = await start_identity_gateway(clock=FakeClock(), limits_pairing_attempts_per_minute=3)
    assert rig.server.port is not None
    headers = {"Content-Type": "application/json"}
    for _ in range(3):
        answer = await raw_request(rig.server.port, "POST", "/pair", headers, body)
        assert answer.status == 400 and answer.json()["error"]["code"] == "invalid_body"
    answer = await raw_request(rig.server.port, "POST", "/pair", headers, body)
    assert (answer.status, answer.json()["error"]["code"]) == (429, "too_many_pairing_attempts")


# ---- defect 12 and the body timeout: every JSON endpoint ----------------------------------

JSON_ENDPOINTS = [
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/messages/count_tokens",
    "/api/chat",
    "/pair",
    "/stream-check",
]
# The options that serve every JSON endpoint (count_tokens is /v1/messages' own).
EVERY_ROUTE = {"routes_enable_messages": True}


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
async def test_bodies_over_the_limit_are_413_everywhere(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio, path: str
) -> None:
    rig = await start_identity_gateway(limits_max_body_bytes=2048, **EVERY_ROUTE)
    key = key_for(rig)
    fits = json.dumps({"message": "x" * 1500, **CHAT}).encode()
    assert len(fits) <= 2048
    too_big = json.dumps({"message": "x" * 2100, **CHAT}).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(rig.url + path, data=fits, headers=bearer(key)) as r:
            assert r.status != 413
        for chunked in (False, True):
            data: Any = too_big
            if chunked:

                async def parts() -> Any:
                    yield too_big[:1000]
                    yield too_big[1000:]

                data = parts()
            async with s.post(rig.url + path, data=data, headers=bearer(key)) as r:
                error = (await r.json())["error"]
                assert (r.status, error["code"], error["param"]) == (413, "body_too_large", None)
                assert "limits.max_body_bytes" in error["message"]
    assert await healthy(rig)


def padded_body(size: int) -> bytes:
    """A chat body of exactly ``size`` bytes."""
    bare = json.dumps({"message": "", **CHAT}).encode()
    body = json.dumps({"message": "x" * (size - len(bare)), **CHAT}).encode()
    assert len(body) == size
    return body


async def send_whole_chunked(port: int, path: str, key: str, body: bytes) -> str | None:
    """The head and the whole chunked body in one write, so the body has ended before the
    gateway reads it (the path that takes it without waiting); the refusal's error code, or
    None for an answer that is no refusal."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    half = len(body) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:]))
    writer.write(
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        + chunks
        + b"0\r\n\r\n"
    )
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return refusal_code(answer.partition(b"\r\n\r\n")[2])


def refusal_code(body: bytes) -> str | None:
    """The ``error.code`` of an answer in the error shape, else None."""
    if b"\r\n" in body[:8]:  # chunked framing: the JSON starts after the size line
        body = body.split(b"\r\n", 1)[1]
    try:
        error = json.loads(body.split(b"\r\n", 1)[0]).get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
async def test_a_body_that_came_whole_is_held_to_the_limit_on_both_sides_of_it(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio, path: str
) -> None:
    limit = 2048
    rig = await start_identity_gateway(limits_max_body_bytes=limit, **EVERY_ROUTE)
    key = key_for(rig)
    port = rig.server.port
    assert port is not None
    for size, refused in ((limit, False), (limit + 1, True)):
        code = await send_whole_chunked(port, path, key, padded_body(size))
        assert (code == "body_too_large") is refused, (size, code)
        answer = await raw_request(port, "POST", path, bearer(key), padded_body(size))
        assert (refusal_code(answer.body) == "body_too_large") is refused, (size, answer.body)
    assert await healthy(rig)


async def healthy(rig: IdentityRig) -> bool:
    async with aiohttp.ClientSession() as s, s.get(rig.url + "/healthz") as r:
        return r.status == 200


async def send_slowly(port: int, path: str, key: str, body: bytes, pause: float) -> bytes:
    """Send the head and half the body, then the rest after ``pause`` unless the gateway has
    answered by then; the answer's bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    writer.write(head + body[: len(body) // 2])
    await writer.drain()
    # The first bytes of the answer: after a 408 the gateway still drains the connection for a
    # moment (bounded), but the answer itself must come at the timeout.
    answer = asyncio.ensure_future(reader.read(65536))
    try:
        done, _ = await asyncio.wait({answer}, timeout=pause)
        if not done:
            writer.write(body[len(body) // 2 :])
            await writer.drain()
        return await asyncio.wait_for(answer, 10)
    finally:
        writer.close()


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
async def test_a_body_must_arrive_within_the_body_timeout(
    start_identity_gateway: IdentityFactory, path: str
) -> None:
    rig = await start_identity_gateway(server_body_timeout=0.6, **EVERY_ROUTE)
    key = key_for(rig)
    port = rig.server.port
    assert port is not None
    body = json.dumps({"message": "hi", **CHAT}).encode()
    in_time = await send_slowly(port, path, key, body, 0.3)
    assert b" 408 " not in in_time.split(b"\r\n", 1)[0], in_time[:200]
    started = time.monotonic()
    late = await send_slowly(port, path, key, body, 5.0)
    assert late.startswith(b"HTTP/1.1 408 "), late[:200]
    assert b'"body_timeout"' in late and b"server.body_timeout" in late
    assert 0.5 < time.monotonic() - started < 2.0


# ---- defect 13: CORS for the conversation API ---------------------------------------------


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/api/chat", "POST, OPTIONS"),
        ("/api/conversations", "GET, OPTIONS"),
        ("/api/conversations/abc123", "GET, DELETE, OPTIONS"),
        ("/v1/chat/completions", "POST, OPTIONS"),
        ("/v1/models", "GET, OPTIONS"),
    ],
)
async def test_preflights_from_allowed_origins_name_the_paths_methods(
    start_identity_gateway: IdentityFactory, path: str, methods: str
) -> None:
    origin = "https://app.example.com"
    rig = await start_identity_gateway(cors_allowed_origins=(origin,))
    headers = {"Origin": origin, "Access-Control-Request-Method": methods.split(",")[0]}
    async with aiohttp.ClientSession() as s, s.options(rig.url + path, headers=headers) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Methods"] == methods
        assert r.headers["Access-Control-Allow-Origin"] == origin
    refused = {**headers, "Origin": "https://other.example"}
    async with aiohttp.ClientSession() as s, s.options(rig.url + path, headers=refused) as r:
        assert (r.status, (await r.json())["error"]["code"]) == (403, "origin_not_allowed")


async def test_a_browser_app_can_chat_read_and_delete_conversations(
    start_identity_gateway: IdentityFactory,
) -> None:
    origin = "https://app.example.com"
    rig = await start_identity_gateway(cors_allowed_origins=(origin,))
    key = key_for(rig)
    headers = bearer(key, Origin=origin)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            rig.url + "/api/chat", json={"message": "hi", "model": MODELS[0]}, headers=headers
        ) as r:
            assert r.status == 200
            assert "X-Conversation-ID" in r.headers["Access-Control-Expose-Headers"]
            conversation = r.headers["X-Conversation-ID"]
        url = rig.url + f"/api/conversations/{conversation}"
        async with s.delete(url, headers=headers) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == origin
        async with s.get(url, headers=headers) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (404, "conversation_not_found")


# ---- defect 9 and 2 on /api/chat: phone chats are counted and capped ------------------------


async def test_streamed_phone_chats_are_counted_logged_and_hide_the_usage_chunk(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    key = key_for(rig, name="phone")
    with LogCapture() as logs:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                rig.url + "/api/chat",
                json={"message": "hi", "model": MODELS[0], "stream": True},
                headers=bearer(key),
            ) as r,
        ):
            events = sse_events(await r.read())
        await asyncio.sleep(0.05)
    sent = fake_lmstudio.received[-1].json()
    assert sent["stream_options"] == {"include_usage": True}
    assert not any('"usage"' in e for e in events), "the phone did not ask for usage"
    line = next(a for a in logs.access() if a["path"] == "/api/chat")
    assert (line["stream"], line["model"]) == (True, MODELS[0])
    assert line["completion_tokens"] > 0 and line["bytes_out"] > 0
    rig.identity.recorder.flush()
    (usage,) = [u for u in rig.identity.db.usage() if u.principal.startswith("key:")]
    assert usage.completion_tokens == line["completion_tokens"] and usage.prompt_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_capped_token_is_capped_on_api_chat(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio, stream: bool
) -> None:
    issued = rig.identity.tokens.issue(
        name="capped", scopes=frozenset({"chat"}), ttl=600, max_tokens=7
    )
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            rig.url + "/api/chat",
            json={"message": "hi", "model": MODELS[0], "stream": stream},
            headers=bearer(issued.token),
        ) as r,
    ):
        assert r.status == 200
        await r.read()
    assert fake_lmstudio.received[-1].json()["max_tokens"] == 7


async def test_api_chat_refuses_a_model_outside_the_allowlist(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    key = key_for(rig, models=frozenset({MODELS[0]}))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            rig.url + "/api/chat", json={"message": "hi", "model": MODELS[1]}, headers=bearer(key)
        ) as r,
    ):
        error = (await r.json())["error"]
    assert (r.status, error["code"], error["param"]) == (403, "model_not_allowed", "model")
    assert fake_lmstudio.received == []


# ---- defect 17: /readyz, CONNECT, revoked streams -----------------------------------------


async def test_readyz_probes_lm_studio_at_most_once_per_cache_period(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    async with aiohttp.ClientSession() as s:

        async def ready() -> int:
            async with s.get(rig.url + "/readyz") as r:
                return r.status

        assert set(await asyncio.gather(*(ready() for _ in range(30)))) == {200}
        for _ in range(10):
            assert await ready() == 200
    assert fake_lmstudio.paths.count("/v1/models") == 1


async def test_readyz_says_unavailable_when_lm_studio_stops(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tray_app.gateway.app.READY_CACHE_SECONDS", 0.2)
    async with aiohttp.ClientSession() as s:
        async with s.get(rig.url + "/readyz") as r:
            assert r.status == 200
        await fake_lmstudio.stop()
        await asyncio.sleep(0.3)
        async with s.get(rig.url + "/readyz") as r:
            assert (r.status, await r.json()) == (
                503,
                {
                    "status": "unavailable",
                    "upstreams": [{"name": "local", "state": "down"}],
                    "database": "up",
                },
            )


@pytest.mark.parametrize(
    "target", ["example.com:443", "127.0.0.1:1234", "http://127.0.0.1:1234/v1/models"]
)
@pytest.mark.parametrize("method", ["CONNECT", "GET"])
async def test_connect_and_absolute_targets_get_the_json_404_and_a_log_line(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio, method: str, target: str
) -> None:
    assert rig.server.port is not None
    with LogCapture() as logs:
        answer = await raw_request(rig.server.port, method, target, {})
        await asyncio.sleep(0.05)
    assert answer.status in {400, 404}, answer.body
    error = answer.json()["error"]
    assert error["code"] in {"path_not_allowed", "bad_request"}
    assert [a["status"] for a in logs.access()] == [answer.status]
    assert fake_lmstudio.received == []


async def test_a_running_stream_ends_soon_after_its_credential_is_revoked(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    fake_lmstudio.behaviour.chunks = 400
    fake_lmstudio.behaviour.chunk_delay = 0.05  # 20 s of answer
    key, record = rig.identity.api_keys.create("friend", scopes=ALL_SCOPES)
    other = key_for(rig, name="other")
    async with aiohttp.ClientSession() as s:
        doomed = await s.post(
            rig.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(key)
        )
        kept = await s.post(
            rig.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(other)
        )
        await doomed.content.readany()
        rig.identity.api_keys.revoke(record.id)
        revoked_at = time.monotonic()
        body = await asyncio.wait_for(doomed.read(), 10)
        ended_after = time.monotonic() - revoked_at
        assert kept.status == 200 and await kept.content.readany()
        kept.close()
    events = sse_events(body)
    assert json.loads(events[-1])["error"]["code"] == "credential_revoked"
    assert ended_after < 4.0
    assert await healthy(rig)


# ---- what the adversarial review found ------------------------------------------------------


async def test_pair_takes_only_a_small_body_and_a_flood_of_objects_is_refused_fast(
    rig: IdentityRig,
) -> None:
    from tray_app.gateway.app import PAIR_MAX_BODY_BYTES

    code, _ = rig.identity.pairing.create_code()
    fits = json.dumps({"code": code, "device_name": "x" * (PAIR_MAX_BODY_BYTES - 60)}).encode()
    assert len(fits) <= PAIR_MAX_BODY_BYTES
    async with aiohttp.ClientSession() as s:
        async with s.post(rig.url + "/pair", data=fits) as r:
            assert r.status == 200
        big = b'{"a":[' + b"{}," * 11_000_000 + b"{}]}"  # 33 MB of tiny objects
        started = time.monotonic()
        for path, headers in (("/pair", {}), ("/v1/chat/completions", bearer(key_for(rig)))):
            async with s.post(rig.url + path, data=io.BytesIO(big), headers=headers) as r:
                error = (await r.json())["error"]
                assert r.status in {400, 413}, error
                assert error["code"] in {"invalid_body", "body_too_large"}
        assert time.monotonic() - started < 5.0, "refused in seconds, not parsed for half a minute"
        async with s.get(rig.url + "/healthz") as r:
            assert r.status == 200


def _compressed(encoding: str, data: bytes) -> bytes:
    import gzip
    import zlib

    return zlib.compress(data) if "deflate" in encoding else gzip.compress(data)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP", "x-gzip", "gzip, identity"])
@pytest.mark.parametrize("path", JSON_ENDPOINTS)
async def test_compressed_request_bodies_are_415(
    start_identity_gateway: IdentityFactory, path: str, encoding: str
) -> None:
    rig = await start_identity_gateway(
        clock=FakeClock(), limits_pairing_attempts_per_minute=2, **EVERY_ROUTE
    )
    # 1 MB of JSON in a few KB: inflating it would come before any size limit.
    body = _compressed(encoding, b'{"code": "' + b"A" * 24 + b'"}' + b" " * 1_000_000)
    headers = {**bearer(key_for(rig)), "Content-Encoding": encoding}
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(rig.url + path, data=body, headers=headers) as r:
                error = (await r.json())["error"]
                assert (r.status, error["code"]) == (415, "unsupported_content_encoding")
                assert error["type"] == "invalid_request_error"
    assert await healthy(rig)


async def test_an_encoding_aiohttp_cannot_decode_is_refused_in_the_error_shape(
    rig: IdentityRig,
) -> None:
    headers = {**bearer(key_for(rig)), "Content-Encoding": "br"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(rig.url + "/v1/chat/completions", data=b"\x0b\x02\x80{}\x03", headers=headers) as r,
    ):
        error = (await r.json())["error"]
    assert r.status in {400, 415}
    assert error["code"] in {"bad_request", "unsupported_content_encoding"}


@pytest.mark.parametrize(
    "header", ["Authorization: Bearer \xff", "X-API-Key: lmg_\xff\xfe", "Authorization: Bearer é"]
)
@pytest.mark.parametrize("path", ["/v1/models", "/api/conversations", "/metrics"])
async def test_a_credential_that_is_not_ascii_is_a_counted_401(
    start_identity_gateway: IdentityFactory, header: str, path: str
) -> None:
    rig = await start_identity_gateway(clock=FakeClock(), limits_auth_failures_per_minute=2)
    port = rig.server.port
    assert port is not None
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{header}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    statuses = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        code = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"]
        statuses.append((int(answer.split(b" ")[1]), code))
    refused = (401, "invalid_api_key")
    assert statuses == [refused, refused, (429, "too_many_auth_failures")]


async def test_a_valid_key_with_an_x_user_id_header_works_when_dev_mode_is_off(
    rig: IdentityRig,
) -> None:
    key = key_for(rig)
    async with (
        aiohttp.ClientSession() as s,
        s.get(rig.url + "/v1/models", headers=bearer(key, **{"X-User-Id": "alice"})) as r,
    ):
        assert r.status == 200
    async with (
        aiohttp.ClientSession() as s,
        s.get(rig.url + "/v1/models", headers={"X-User-Id": "alice"}) as r,
    ):
        assert (r.status, (await r.json())["error"]["code"]) == (401, "dev_mode_off")


@pytest.mark.parametrize("how", ["revoke_all_devices", "rotate"])
async def test_a_qr_code_shown_before_revoke_all_or_rotation_no_longer_pairs(
    rig: IdentityRig, how: str
) -> None:
    from tray_app.control.assembly import rotate_signing_key_everywhere

    code, _ = rig.identity.pairing.create_code()
    if how == "rotate":
        rotate_signing_key_everywhere(rig.identity, rig.store)
    else:
        rig.identity.pairing.revoke_all_devices()
    async with aiohttp.ClientSession() as s, s.post(rig.url + "/pair", json={"code": code}) as r:
        assert (r.status, (await r.json())["error"]["code"]) == (401, "pairing_code_expired")
    fresh, _ = rig.identity.pairing.create_code()
    async with aiohttp.ClientSession() as s, s.post(rig.url + "/pair", json={"code": fresh}) as r:
        assert r.status == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
async def test_a_request_waiting_for_lm_studio_ends_when_its_credential_is_revoked(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio, path: str
) -> None:
    fake_lmstudio.behaviour.header_delay = 20.0  # a very slow prompt
    key, record = rig.identity.api_keys.create("friend", scopes=ALL_SCOPES)
    body = {**CHAT, "message": "hi"}
    async with aiohttp.ClientSession() as s:
        pending = asyncio.ensure_future(s.post(rig.url + path, json=body, headers=bearer(key)))
        await asyncio.sleep(0.3)
        rig.identity.api_keys.revoke(record.id)
        started = time.monotonic()
        r = await asyncio.wait_for(pending, 10)
        error = (await r.json())["error"]
        r.close()
    assert (r.status, error["code"], error["type"]) == (
        401,
        "credential_revoked",
        "authentication_error",
    )
    assert time.monotonic() - started < 4.0
    await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 5)


async def test_deleting_a_conversation_while_its_answer_streams_is_no_error(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    fake_lmstudio.behaviour.chunks = 10
    fake_lmstudio.behaviour.chunk_delay = 0.05
    key = key_for(rig)
    with LogCapture() as logs:
        async with aiohttp.ClientSession() as s:
            r = await s.post(
                rig.url + "/api/chat",
                json={"message": "hi", "model": MODELS[0], "stream": True},
                headers=bearer(key),
            )
            conversation = r.headers["X-Conversation-ID"]
            await r.content.readany()
            async with s.delete(
                rig.url + f"/api/conversations/{conversation}", headers=bearer(key)
            ) as gone:
                assert gone.status == 204
            events = sse_events(await r.read())
        await asyncio.sleep(0.05)
    assert events[-1] == "[DONE]"
    assert "Traceback" not in logs.text and "internal_error" not in logs.text


@pytest.mark.parametrize("method", ["PUT", "PATCH", "POST"])
async def test_other_methods_on_a_conversation_are_405_whether_or_not_it_exists(
    rig: IdentityRig, method: str
) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method, rig.url + "/api/conversations/nope", headers=bearer(key_for(rig)), json={}
        ) as r,
    ):
        assert (r.status, r.headers["Allow"]) == (405, "GET, DELETE")


@pytest.mark.parametrize("expect", ["bogus", "200-ok", "100-continue, x"])
async def test_an_unknown_expectation_is_a_json_417(rig: IdentityRig, expect: str) -> None:
    assert rig.server.port is not None
    answer = await raw_request(rig.server.port, "GET", "/v1/models", {"Expect": expect})
    assert answer.status == 417
    assert answer.json()["error"]["code"] == "expectation_failed"


async def test_expect_100_continue_still_works(rig: IdentityRig) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            rig.url + "/v1/chat/completions",
            json=CHAT,
            headers=bearer(key_for(rig)),
            expect100=True,
        ) as r,
    ):
        assert r.status == 200


async def test_ipv6_guesses_are_throttled_per_64(start_identity_gateway: IdentityFactory) -> None:
    rig = await start_identity_gateway(
        clock=FakeClock(),
        limits_auth_failures_per_minute=2,
        server_trusted_proxies=("127.0.0.1/32",),
    )
    async with aiohttp.ClientSession() as s:
        statuses = []
        for n in range(3):
            headers = {"X-Forwarded-For": f"2001:db8:1:2::{n + 1}", **bearer("lmg_" + "x" * 40)}
            async with s.get(rig.url + "/v1/models", headers=headers) as r:
                statuses.append((r.status, (await r.json())["error"]["code"]))
        other = {"X-Forwarded-For": "2001:db8:1:3::1", **bearer("lmg_" + "x" * 40)}
        async with s.get(rig.url + "/v1/models", headers=other) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (401, "invalid_api_key")
    refused = (401, "invalid_api_key")
    assert statuses == [refused, refused, (429, "too_many_auth_failures")]


# ---- what the second adversarial review found -----------------------------------------------

HUGE_ANSWER = (
    b'{"choices":[' + b"{}," * 3_000_000 + b'{}],"usage":{"prompt_tokens":3,"completion_tokens":4}}'
)


async def test_a_huge_json_answer_is_relayed_without_being_parsed(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    fake_lmstudio.behaviour.status = 200
    fake_lmstudio.behaviour.error_body = HUGE_ANSWER  # 9 MB of tiny objects
    key = key_for(rig)
    with LogCapture() as logs:
        async with aiohttp.ClientSession() as s:
            chat = asyncio.ensure_future(
                s.post(rig.url + "/v1/chat/completions", json=CHAT, headers=bearer(key))
            )
            await asyncio.sleep(0.05)
            started = time.monotonic()
            async with s.get(rig.url + "/healthz") as health:
                assert health.status == 200
            assert time.monotonic() - started < 1.0
            r = await chat
            assert r.status == 200 and await r.read() == HUGE_ANSWER
            r.close()
        await asyncio.sleep(0.05)
    line = next(a for a in logs.access() if a["path"] == "/v1/chat/completions")
    assert (line["prompt_tokens"], line["completion_tokens"]) == (3, 4)


@pytest.mark.parametrize("path", ["/v1/models", "/api/chat"])
async def test_a_huge_answer_gateway_must_read_is_a_502(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio, path: str
) -> None:
    fake_lmstudio.behaviour.status = 200
    fake_lmstudio.behaviour.error_body = HUGE_ANSWER
    key = key_for(rig, models=frozenset({MODELS[0]}))  # a restricted list must be read
    if path == "/v1/models":
        fake_lmstudio.behaviour.status = None
        fake_lmstudio.behaviour.error_body = None
        fake_lmstudio.behaviour.json_bytes = None
    async with aiohttp.ClientSession() as s:
        if path == "/api/chat":
            async with s.post(
                rig.url + path, json={"message": "hi", "model": MODELS[0]}, headers=bearer(key)
            ) as r:
                error = (await r.json())["error"]
            assert (r.status, error["code"]) == (502, "upstream_response_too_large")
        else:
            async with s.get(rig.url + path, headers=bearer(key)) as r:
                assert r.status == 200  # a normal list is still read and filtered
            assert await healthy(rig)


async def test_lm_studios_redirects_are_never_followed(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    fake_lmstudio.behaviour.status = 307
    fake_lmstudio.behaviour.extra_response_headers = {"Location": "/api/v1/models/load"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(rig.url + "/v1/chat/completions", json=CHAT, headers=bearer(key_for(rig))) as r,
    ):
        error = (await r.json())["error"]
    assert (r.status, error["code"]) == (502, "upstream_bad_response")
    assert fake_lmstudio.paths == ["/v1/chat/completions"]


@pytest.mark.parametrize(("write_timeout", "cut_off"), [(1.0, True), (30.0, False)])
async def test_a_client_that_stops_reading_is_cut_off_and_lm_studio_stops(
    start_identity_gateway: IdentityFactory,
    fake_lmstudio: FakeLMStudio,
    write_timeout: float,
    cut_off: bool,
) -> None:
    import socket

    rig = await start_identity_gateway(server_write_timeout=write_timeout)
    port = rig.server.port
    assert port is not None
    fake_lmstudio.behaviour.reply = "x" * 20_000_000  # far more than any socket buffers
    fake_lmstudio.behaviour.chunks = 2000
    body = json.dumps({**CHAT, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key_for(rig)}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        # Never read: the gateway's buffer fills, and its writes wait.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fake_lmstudio.disconnected.wait(), 4.0)
        assert fake_lmstudio.disconnected.is_set() is cut_off
    finally:
        sock.close()
    assert await healthy(rig)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
async def test_an_answer_nested_too_deep_is_a_502_not_a_500(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio, path: str
) -> None:
    fake_lmstudio.behaviour.status = 200
    fake_lmstudio.behaviour.error_body = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with (
        aiohttp.ClientSession() as s,
        s.post(rig.url + path, json={**CHAT, "message": "hi"}, headers=bearer(key_for(rig))) as r,
    ):
        error = (await r.json())["error"]
    assert (r.status, error["code"]) == (502, "upstream_bad_response")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/healthz"),
        ("GET", "/app.js"),
        ("GET", "/v1/models"),
        ("POST", "/pair"),
        ("POST", "/v1/messages/count_tokens"),
        ("POST", "/stream-check"),
    ],
)
@pytest.mark.parametrize(
    "encodings", [["gzip"], ["identity", "gzip"], ["identity, gzip"]], ids=["one", "two", "list"]
)
async def test_a_compressed_body_is_refused_on_every_path_and_never_inflated(
    rig: IdentityRig, method: str, path: str, encodings: list[str]
) -> None:
    import gzip

    port = rig.server.port
    assert port is not None
    bomb = gzip.compress(b"\0" * 200_000_000)  # 200 MB of work in 200 KB
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    head += "".join(f"Content-Encoding: {e}\r\n" for e in encodings)
    head += f"Content-Length: {len(bomb)}\r\n\r\n"
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + bomb)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 415 "), answer[:200]
    assert b'"unsupported_content_encoding"' in answer
    async with aiohttp.ClientSession() as s, s.get(rig.url + "/healthz") as r:
        assert r.status == 200
    assert time.monotonic() - started < 2.0, "the bomb was inflated"


async def test_dev_mode_refuses_whole_families_of_proxy_headers(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start_identity_gateway(auth_dev_mode=True)
    port = rig.server.port
    assert port is not None
    for header in (
        "Cf-Ray",
        "CDN-Loop",
        "X-Forwarded-Ssl",
        "X-Envoy-External-Address",
        "Fly-Client-IP",
        "Tailscale-User-Login",
    ):
        answer = await raw_request(
            port, "GET", "/v1/models", {"X-User-Id": "bob", "Host": "localhost", header: "1"}
        )
        assert (answer.status, answer.json()["error"]["code"]) == (401, "dev_mode_remote"), header
    plain = await raw_request(port, "GET", "/v1/models", {"X-User-Id": "bob", "Host": "localhost"})
    assert plain.status == 200
