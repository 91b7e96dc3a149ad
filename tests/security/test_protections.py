"""Dev mode, limits, trusted proxies, CORS, usage accounting and metrics, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.fakes import FakeClock
from tests.helpers import sse_events
from tray_app.config.settings import Config
from tray_app.control.assembly import open_identity
from tray_app.errors import AuthError, ConfigError
from tray_app.gateway.limits import TokenBuckets, client_address, parse_networks
from tray_app.identity.authenticator import IdentityAuthenticator
from tray_app.identity.principal import ALL_SCOPES

# Both a request body and the OpenAI client's keyword arguments.
CHAT: dict[str, Any] = {"model": MODELS[0], "messages": [{"role": "user", "content": "hi"}]}


async def call(
    rig: IdentityRig,
    path: str = "/v1/models",
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    json_body: Any = None,
    method: str | None = None,
) -> tuple[int, Any, Any]:
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    verb = method or ("POST" if json_body is not None else "GET")
    async with (
        aiohttp.ClientSession() as s,
        s.request(verb, rig.url + path, headers=sent, json=json_body) as r,
    ):
        raw = await r.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        return r.status, body, r.headers


def new_key(
    rig: IdentityRig, scopes: frozenset[str] = frozenset({"chat", "models"}), name: str = "k"
) -> str:
    return rig.identity.api_keys.create(name, scopes=scopes)[0]


# ---- point 6: dev mode -------------------------------------------------------------------


async def test_dev_mode_is_off_by_default(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
) -> None:
    rig = await start_identity_gateway()
    status, body, _ = await call(rig, headers={"X-User-Id": "alice"})
    assert (status, body["error"]["code"]) == (401, "dev_mode_off")
    assert fake_lmstudio.received == []


async def test_dev_mode_accepts_x_user_id_from_this_machine_only(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start_identity_gateway(auth_dev_mode=True)
    status, _, _ = await call(rig, headers={"X-User-Id": "alice"})
    assert status == 200
    # A request relayed by a proxy (the tunnel agent) is not from this machine.
    status, body, _ = await call(
        rig, headers={"X-User-Id": "alice", "X-Forwarded-For": "203.0.113.7"}
    )
    assert (status, body["error"]["code"]) == (401, "dev_mode_remote")


def test_dev_mode_refuses_a_remote_peer(tmp_path: Any) -> None:
    config = Config(auth_dev_mode=True, storage_data_dir=str(tmp_path))
    identity = open_identity(config, b"k" * 32)
    authenticator: IdentityAuthenticator = identity.authenticator
    try:
        assert (
            authenticator.authenticate({"X-User-Id": "bob", "Host": "localhost"}, "::1").name
            == "dev:bob"
        )
        assert (
            authenticator.authenticate(
                {"X-User-Id": "bob", "Host": "localhost"}, "::ffff:127.0.0.1"
            ).scopes
            == ALL_SCOPES
        )
        for peer in ("203.0.113.5", "192.0.2.1", None, "not-an-ip"):
            with pytest.raises(AuthError, match="only from this machine"):
                authenticator.authenticate({"X-User-Id": "bob", "Host": "localhost"}, peer)
    finally:
        identity.close()


def test_dev_mode_cannot_listen_beyond_loopback() -> None:
    from tray_app.config.settings import check_combinations

    with pytest.raises(ConfigError, match=r"auth\.dev_mode"):
        check_combinations(Config(auth_dev_mode=True, server_host="0.0.0.0"))
    check_combinations(Config(auth_dev_mode=True, server_host="127.0.0.1"))


# ---- point 7: limits -------------------------------------------------------------------------


async def test_requests_per_minute_gives_429_with_retry_after(
    start_identity_gateway: IdentityFactory,
) -> None:
    clock = FakeClock()
    rig = await start_identity_gateway(clock=clock, limits_requests_per_minute=3)
    key, other = new_key(rig, name="a"), new_key(rig, name="b")
    for _ in range(3):
        assert (await call(rig, key=key))[0] == 200
    status, body, headers = await call(rig, key=key)
    assert (status, body["error"]["code"], body["error"]["type"]) == (
        429,
        "rate_limit_exceeded",
        "rate_limit_error",
    )
    assert int(headers["Retry-After"]) == 20  # one token per 20 s at 3 per minute
    assert (await call(rig, key=other))[0] == 200, "limits are per principal"
    clock.advance(20)
    assert (await call(rig, key=key))[0] == 200


async def test_concurrent_streams_are_capped_per_principal(
    start_identity_gateway: IdentityFactory,
    fake_lmstudio: FakeLMStudio,
) -> None:
    """Over its cap a caller waits its turn (here: too long; slots were free, so the answer
    names its own limit, 429 too_many_concurrent_requests), and no other caller waits for it."""
    rig = await start_identity_gateway(limits_concurrent_requests=1, queue_max_wait=0.3)
    key, other = new_key(rig, name="a"), new_key(rig, name="b")
    fake_lmstudio.behaviour.chunks = 50
    fake_lmstudio.behaviour.chunk_delay = 0.05
    async with aiohttp.ClientSession() as s:
        first = await s.post(
            rig.url + "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"Authorization": f"Bearer {key}"},
        )
        await first.content.readany()
        started = time.monotonic()
        status, body, headers = await call(rig, "/v1/chat/completions", key=key, json_body=CHAT)
        assert (status, body["error"]["code"]) == (429, "too_many_concurrent_requests")
        assert "limits.concurrent_requests" in body["error"]["message"]
        assert 0.3 <= time.monotonic() - started < 2.0
        assert "Retry-After" in headers
        assert (await call(rig, "/v1/chat/completions", key=other, json_body=CHAT))[0] == 200
        first.close()
    await asyncio.sleep(0.2)
    assert (await call(rig, "/v1/chat/completions", key=key, json_body=CHAT))[0] == 200


async def test_failed_authentication_is_throttled_per_address(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start_identity_gateway(clock=FakeClock(), limits_auth_failures_per_minute=3)
    key = new_key(rig)
    for _ in range(3):
        assert (await call(rig, key="lmg_guess_" + "x" * 30))[0] == 401
    status, body, headers = await call(rig, key="lmg_guess_" + "y" * 30)
    assert (status, body["error"]["code"]) == (429, "too_many_auth_failures")
    assert int(headers["Retry-After"]) >= 1
    # Others' failures at this address never refuse a valid credential.
    assert (await call(rig, key=key))[0] == 200


async def test_forwarded_for_is_ignored_without_a_trusted_proxy(
    start_identity_gateway: IdentityFactory,
) -> None:
    # No tunnel and no configured proxy: a local process cannot pick its client address.
    rig = await start_identity_gateway(clock=FakeClock(), limits_auth_failures_per_minute=2)
    for n in range(2):
        headers = {"X-Forwarded-For": f"198.51.100.{10 + n}"}
        assert (await call(rig, key="lmg_wrong_" + "z" * 30, headers=headers))[0] == 401
    spoofed = {"X-Forwarded-For": "198.51.100.99"}
    status, body, _ = await call(rig, key="lmg_wrong_" + "z" * 30, headers=spoofed)
    assert (status, body["error"]["code"]) == (429, "too_many_auth_failures")


async def test_forwarded_for_is_trusted_from_configured_proxies(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start_identity_gateway(
        clock=FakeClock(),
        limits_auth_failures_per_minute=2,
        server_trusted_proxies=("127.0.0.1/32",),
    )
    attacker = {"X-Forwarded-For": "198.51.100.1"}
    for _ in range(2):
        await call(rig, key="lmg_wrong_" + "y" * 30, headers=attacker)
    assert (await call(rig, key="lmg_wrong_" + "y" * 30, headers=attacker))[0] == 429
    # The proxy relays another client: a different address, not blocked.
    other = {"X-Forwarded-For": "198.51.100.2"}
    assert (await call(rig, key="lmg_wrong_" + "y" * 30, headers=other))[0] == 401


def test_client_address_walks_forwarded_for_from_the_right() -> None:
    trusted = parse_networks(["127.0.0.1", "10.0.0.0/8"])
    assert client_address("127.0.0.1", {}, trusted) == "127.0.0.1"
    assert client_address("127.0.0.1", {"X-Forwarded-For": "1.2.3.4"}, trusted) == "1.2.3.4"
    # A client may prepend lies; the proxies' own appended entries are the truth.
    spoofed = {"X-Forwarded-For": "6.6.6.6, 1.2.3.4, 10.0.0.5"}
    assert client_address("127.0.0.1", spoofed, trusted) == "1.2.3.4"
    assert client_address("9.9.9.9", {"X-Forwarded-For": "1.2.3.4"}, trusted) == "9.9.9.9"
    assert client_address("127.0.0.1", {"X-Forwarded-For": "junk"}, trusted) == "127.0.0.1"
    assert client_address("::ffff:127.0.0.1", {"X-Forwarded-For": "1.2.3.4"}, trusted) == "1.2.3.4"


def test_token_bucket_refills_at_its_rate() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(60, clock, capacity=2)
    assert buckets.take("a") is None and buckets.take("a") is None
    assert buckets.take("a") == pytest.approx(1.0)
    clock.advance(0.5)
    assert buckets.take("a") == pytest.approx(0.5)
    clock.advance(0.5)
    assert buckets.take("a") is None
    assert buckets.take("b") is None


# ---- point 8: CORS ---------------------------------------------------------------------------


async def test_preflight_is_answered_by_the_gateway(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
) -> None:
    rig = await start_identity_gateway(cors_allowed_origins=("https://chat.example",))
    status, _, headers = await call(
        rig,
        "/v1/chat/completions",
        method="OPTIONS",
        headers={
            "Origin": "https://chat.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "https://chat.example"
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert allowed >= {
        "authorization",
        "content-type",
        "x-api-key",
        "x-request-id",
        "ngrok-skip-browser-warning",
    }
    assert headers["Vary"] == "Origin"
    assert fake_lmstudio.received == []


async def test_foreign_origins_are_refused(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
) -> None:
    rig = await start_identity_gateway(cors_allowed_origins=("https://chat.example",))
    key = new_key(rig)
    status, body, headers = await call(
        rig,
        "/v1/chat/completions",
        method="OPTIONS",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert (status, body["error"]["code"]) == (403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in headers
    status, body, headers = await call(
        rig,
        "/v1/chat/completions",
        key=key,
        json_body=CHAT,
        headers={"Origin": "https://evil.example"},
    )
    assert (status, body["error"]["code"]) == (403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in headers
    assert fake_lmstudio.received == []


async def test_allowed_and_own_origins_get_cors_headers(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
) -> None:
    rig = await start_identity_gateway(cors_allowed_origins=("https://chat.example",))
    key = new_key(rig)
    own = rig.url  # the gateway's own page
    for origin in ("https://chat.example", own):
        status, _, headers = await call(
            rig, "/v1/chat/completions", key=key, json_body=CHAT, headers={"Origin": origin}
        )
        assert status == 200
        assert headers["Access-Control-Allow-Origin"] == origin
        assert "X-Request-ID" in headers["Access-Control-Expose-Headers"]
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            rig.url + "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"Authorization": f"Bearer {key}", "Origin": own},
        ) as r,
    ):
        assert r.headers["Access-Control-Allow-Origin"] == own  # streams too
        await r.read()
    status, body, headers = await call(
        rig, key="lmg_bad_" + "q" * 30, headers={"Origin": "https://chat.example"}
    )
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    assert headers["Access-Control-Allow-Origin"] == "https://chat.example"  # readable errors


# ---- point 9: usage accounting --------------------------------------------------------------


async def test_usage_is_counted_for_streams_without_showing_the_extra_chunk(
    start_identity_gateway: IdentityFactory,
    fake_lmstudio: FakeLMStudio,
) -> None:
    rig = await start_identity_gateway()
    key, record = rig.identity.api_keys.create("phone", scopes=frozenset({"chat"}))
    fake_lmstudio.behaviour.chunks = 4
    async with openai.AsyncOpenAI(base_url=rig.url + "/v1", api_key=key, max_retries=0) as client:
        stream = await client.chat.completions.create(**CHAT, stream=True)
        chunks = [c async for c in stream]
        assert all(c.usage is None for c in chunks)
        assert all(c.choices for c in chunks), "the usage-only chunk reached the client"
        stream = await client.chat.completions.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        )
        asked = [c async for c in stream]
        assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == 4
        await client.chat.completions.create(**CHAT)
    # LM Studio was asked for usage both times
    assert all(
        r.json()["stream_options"] == {"include_usage": True} for r in fake_lmstudio.received[:2]
    )
    rig.identity.recorder.flush()
    (row,) = rig.identity.db.usage()
    assert (row.principal, row.requests) == (record.principal_name, 3)
    assert (row.prompt_tokens, row.completion_tokens) == (21, 12)


async def test_raw_stream_without_usage_has_no_usage_event(
    start_identity_gateway: IdentityFactory,
    fake_lmstudio: FakeLMStudio,
) -> None:
    rig = await start_identity_gateway()
    key = new_key(rig)
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            rig.url + "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        events = sse_events(await r.read())
    assert events[-1] == "[DONE]"
    assert not any('"usage"' in e for e in events)
    assert len(events) == 5 + 1 + 1  # content chunks, the finish chunk, [DONE]


async def test_usage_survives_a_failed_write_and_is_never_counted_twice(
    start_identity_gateway: IdentityFactory,
) -> None:
    rig = await start_identity_gateway()
    key = new_key(rig)
    await call(rig, key=key)
    recorder = rig.identity.recorder
    db = rig.identity.db
    # A real SQLite failure late in the flush: after the usage rows, at the key's last-used
    # time. Had the rows been committed on their own, the retry would count them again.
    with db.transaction() as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON api_keys "
            "BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END"
        )
    assert recorder.flush() is False
    assert db.usage() == []
    with db.transaction() as conn:
        conn.execute("DROP TRIGGER refuse")
    await call(rig, key=key)
    assert recorder.flush() is True
    assert [u.requests for u in db.usage()] == [2]


# ---- point 10: metrics -----------------------------------------------------------------------


async def test_metrics_need_the_metrics_scope(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
) -> None:
    rig = await start_identity_gateway()
    chat_key = new_key(rig, frozenset({"chat", "models"}), "chat")
    metrics_key = new_key(rig, frozenset({"metrics"}), "prom")
    assert (await call(rig, "/metrics"))[0] == 401
    status, body, _ = await call(rig, "/metrics", key=chat_key)
    assert (status, body["error"]["code"]) == (403, "insufficient_scope")
    await call(rig, "/v1/chat/completions", key=chat_key, json_body=CHAT)
    await call(rig, key="lmg_nope_" + "n" * 30)
    await fake_lmstudio.stop()
    await call(rig, "/v1/chat/completions", key=chat_key, json_body=CHAT)
    status, text, headers = await call(rig, "/metrics", key=metrics_key)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    exposition = text.decode()
    assert 'lmgate_requests_total{route="/v1/chat/completions",status="200"} 1.0' in exposition
    assert 'lmgate_requests_total{route="/v1/chat/completions",status="502"} 1.0' in exposition
    assert (
        'lmgate_request_duration_seconds_bucket{le="0.005",route="/v1/chat/completions"}'
        in exposition
    )
    assert "lmgate_active_streams 0.0" in exposition
    assert 'lmgate_tokens_total{kind="completion"} 5.0' in exposition
    assert 'lmgate_auth_failures_total{reason="invalid_api_key"}' in exposition
    assert 'lmgate_upstream_errors_total{kind="upstream_unreachable"} 1.0' in exposition
    assert fake_lmstudio.received[0].path == "/v1/chat/completions"


def test_no_public_exposure_while_dev_mode_is_on() -> None:
    from tray_app.config.settings import ensure_public_exposure_allowed

    with pytest.raises(ConfigError, match="refuses to open a tunnel"):
        ensure_public_exposure_allowed(Config(auth_dev_mode=True))
    ensure_public_exposure_allowed(Config())
