"""Limits shared by replicas in a real Redis: two SharedLimits (or two real gateways) on one
redis-server are two replicas, and every limit holds across them exactly, on both sides.

Redis stopped, closed refuses with 503 ``shared_limits_unavailable`` and forwards nothing;
open lets requests through, says so once in the log and in /readyz; Redis back, the limits
are back by themselves. A hung Redis (SIGSTOP) costs a request at most the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import CLIENT_KEY, LMSTUDIO_TOKEN, auth_headers
from tests.fake_lmstudio import FakeLMStudio
from tests.fakes import StaticKeyAuthenticator
from tests.redis_server import RedisServer
from tray_app.clock import SystemClock
from tray_app.config.parsers import WhenRedisIsDown
from tray_app.config.settings import Config
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.app import Gateway
from tray_app.gateway.protection import Protections
from tray_app.gateway.server.runner import GatewayServer
from tray_app.gateway.shared_limits import PREFIX, TIMEOUT_SECONDS, SharedLimits
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore

LEASE = 0.6  # seconds: small, so a crashed replica's leases expire within a test
ALICE = "key:alice"
CLIENT = "203.0.113.9"
LOGGER = "lmgate.gateway.shared_limits"


def settings(**overrides: Any) -> Config:
    values: dict[str, Any] = {
        "limits_requests_per_minute": 10,
        "limits_concurrent_requests": 2,
        "limits_auth_failures_per_minute": 3,
        "limits_pairing_attempts_per_minute": 2,
        "state_lease_seconds": LEASE,
    }
    values.update(overrides)
    return Config(**values)


Replicas = Callable[..., Awaitable[list[tuple[Protections, SharedLimits]]]]


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Replicas]:
    """``count`` replicas' protections on the test's Redis, each with its own SharedLimits."""
    opened: list[SharedLimits] = []

    async def make(count: int = 2, **overrides: Any) -> list[tuple[Protections, SharedLimits]]:
        config = settings(**overrides)
        made = []
        for _ in range(count):
            shared = SharedLimits(config, redis_server.url)
            await shared.open()
            opened.append(shared)
            made.append((Protections(config, SystemClock(), shared), shared))
        return made

    yield make
    for shared in opened:
        await shared.close()


async def refusal(call: Awaitable[object]) -> ApiError | None:
    """The ApiError ``call`` raised, None if it passed."""
    try:
        await call
    except ApiError as err:
        return err
    return None


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.02)


async def entered(side: Protections, principal: str, within: float = 2.0) -> str:
    """A place for ``principal``, once one is free within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await side.enter(principal)
        except ApiError:
            assert time.monotonic() < deadline, "no place became free"
            await asyncio.sleep(0.02)


async def shared_limits_up(http: aiohttp.ClientSession, server: GatewayServer) -> None:
    """Waits until the gateway's /readyz says Redis answers again."""
    deadline = time.monotonic() + 5.0
    while True:
        async with http.get(server.url + "/readyz") as response:
            if (await response.json())["shared_limits"] == "up":
                return
        assert time.monotonic() < deadline, "Redis was never found back"
        await asyncio.sleep(0.05)


# ---- requests per minute ------------------------------------------------------------------


async def test_a_burst_over_two_replicas_admits_exactly_the_limit(replicas: Replicas) -> None:
    (a, _), (b, _) = await replicas()
    burst = [(a if i % 2 else b).take_request(ALICE) for i in range(30)]  # 3 x 10 per minute
    refused = await asyncio.gather(*(refusal(call) for call in burst))
    assert sum(err is None for err in refused) == 10
    for err in refused:
        if err is not None:
            assert (err.status, err.code) == (429, "rate_limit_exceeded")
            assert err.headers == {"Retry-After": "6"}  # 1 token at 10/min
    # Another principal has a bucket of its own, on either replica.
    await a.take_request("key:bob")
    await b.take_request("key:bob")


async def test_a_spent_bucket_refills_by_redis_s_clock_one_token_at_a_time(
    replicas: Replicas,
) -> None:
    (a, _), (b, _) = await replicas(limits_requests_per_minute=60)  # a token a second
    for i in range(60):
        await (a if i % 2 else b).take_request(ALICE)
    assert await refusal(a.take_request(ALICE)) is not None
    await asyncio.sleep(1.1)
    await b.take_request(ALICE)  # the one token back ...
    err = await refusal(a.take_request(ALICE))  # ... and not two
    assert err is not None and err.code == "rate_limit_exceeded"


# ---- concurrency as leases ----------------------------------------------------------------


async def test_the_concurrency_cap_holds_across_replicas(replicas: Replicas) -> None:
    (a, _), (b, _) = await replicas()
    first = await a.enter(ALICE)
    await b.enter(ALICE)
    for side in (a, b):
        err = await refusal(side.enter(ALICE))
        assert err is not None
        assert (err.status, err.code) == (429, "too_many_concurrent_requests")
    await b.enter("key:bob")  # another principal's places are its own
    a.leave(ALICE, first)
    # The place given back on one replica (off the request's path) is free on the other.
    await entered(b, ALICE)
    assert await refusal(a.enter(ALICE)) is not None


async def test_a_place_given_back_here_is_free_here_at_once(replicas: Replicas) -> None:
    """The caller's next generation on a replica gets its turn the moment the last one gives
    its place back, before Redis heard of it: it is not refused for that place, every time."""
    ((a, _),) = await replicas(1, limits_concurrent_requests=1)
    lease = await a.enter(ALICE)
    for _ in range(20):
        a.leave(ALICE, lease)
        lease = await a.enter(ALICE)  # no sleep: the release is still on its way
    err = await refusal(a.enter(ALICE))
    assert err is not None and err.code == "too_many_concurrent_requests"
    # Another replica's places are not waited for: it is refused as it was.
    ((b, _),) = await replicas(1, limits_concurrent_requests=1)
    err = await refusal(b.enter(ALICE))
    assert err is not None and err.code == "too_many_concurrent_requests"


async def test_a_crashed_replica_s_leases_expire_and_a_live_one_s_do_not(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    (live, _), (crashing, crashed_limits), (other, _) = await replicas(3)
    await live.enter("key:bob")
    await live.enter("key:bob")
    await crashing.enter(ALICE)
    await crashing.enter(ALICE)
    await crashed_limits.close()  # no renewal, no release: as if the process died
    assert await refusal(other.enter(ALICE)) is not None
    started = time.monotonic()
    await asyncio.sleep(LEASE * 2.5)  # several renewals later
    # The live replica renewed its leases: bob is still at the cap ...
    err = await refusal(other.enter("key:bob"))
    assert err is not None and err.code == "too_many_concurrent_requests"
    # ... the crashed one's have expired: alice has her places back.
    await other.enter(ALICE)
    await other.enter(ALICE)
    assert await refusal(other.enter(ALICE)) is not None
    assert time.monotonic() - started < LEASE * 4
    # The lease sets expire too: nothing is kept for good.
    with redis_server.client() as redis:
        for key in redis.keys("*"):
            assert key.startswith(PREFIX)
            assert 0 < redis.pttl(key) <= LEASE * 1000 + 50


async def test_a_crashed_replica_s_lease_is_held_until_it_expires(replicas: Replicas) -> None:
    (crashing, crashed_limits), (other, _) = await replicas(limits_concurrent_requests=1)
    await crashing.enter(ALICE)
    await crashed_limits.close()
    await asyncio.sleep(LEASE * 0.5)
    assert await refusal(other.enter(ALICE)) is not None  # not yet expired: still counted
    await asyncio.sleep(LEASE * 0.7)
    await other.enter(ALICE)


# ---- guessing throttles -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "limit", "code"),
    [("auth", 3, "too_many_auth_failures"), ("pairing", 2, "too_many_pairing_attempts")],
)
async def test_a_guessing_throttle_is_shared_by_the_replicas(
    replicas: Replicas, name: str, limit: int, code: str
) -> None:
    (a, _), (b, _) = await replicas()

    def failed(side: Protections, client: str) -> Awaitable[None]:
        return side.auth_failed(client) if name == "auth" else side.pairing_failed(client)

    for i in range(limit):
        await failed(a if i % 2 else b, "2001:db8:1:2::1")
    for side in (a, b):
        err = await refusal(failed(side, "2001:db8:1:2::ffff"))  # the same /64
        assert err is not None
        assert (err.status, err.code) == (429, code)
    await failed(a, "2001:db8:1:3::1")  # another /64 is untouched, and so is the principal
    await b.take_request("2001:db8:1:2::1")


async def test_every_key_is_prefixed_and_expires(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    ((a, _),) = await replicas(1)
    await a.take_request(ALICE)
    await a.auth_failed(CLIENT)
    await a.pairing_failed(CLIENT)
    await a.enter(ALICE)
    with redis_server.client() as redis:
        keys = sorted(redis.keys("*"))
        assert keys == [
            f"{PREFIX}auth:{CLIENT}",
            f"{PREFIX}leases:{ALICE}",
            f"{PREFIX}pairing:{CLIENT}",
            f"{PREFIX}requests:{ALICE}",
        ]
        ttls = {key.split(":")[1]: redis.pttl(key) for key in keys}
    # A bucket lives until it would be full again (one token: 6 s at 10/min), plus a second.
    assert 6000 < ttls["requests"] <= 7000
    assert 20000 < ttls["auth"] <= 21000
    assert 30000 < ttls["pairing"] <= 31000
    assert 0 < ttls["leases"] <= LEASE * 1000


# ---- Redis down and back ------------------------------------------------------------------


async def test_closed_refuses_every_limited_step_while_redis_is_down_and_recovers(
    replicas: Replicas, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    ((a, shared),) = await replicas(1)
    redis_server.stop()
    steps: list[Callable[[], Awaitable[object]]] = [
        lambda: a.take_request(ALICE),
        lambda: a.enter(ALICE),
        lambda: a.auth_failed(CLIENT),
        lambda: a.pairing_failed(CLIENT),
    ]
    for _ in range(3):
        for step in steps:
            err = await refusal(step())
            assert err is not None
            assert (err.status, err.code) == (503, "shared_limits_unavailable")
            assert err.headers == {"Retry-After": "1"}
    assert not shared.available
    said = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(said) == 1 and "refused" in said[0].getMessage()  # once per outage
    redis_server.start()
    await until(lambda: shared.available)
    for _ in range(10):
        await a.take_request(ALICE)
    err = await refusal(a.take_request(ALICE))
    assert err is not None and err.code == "rate_limit_exceeded"  # counted again, in Redis


async def test_open_lets_requests_through_while_redis_is_down_and_counts_again_after(
    replicas: Replicas, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    (a, shared), (b, _) = await replicas(state_when_redis_is_down=WhenRedisIsDown.OPEN)
    redis_server.stop()
    for _ in range(30):  # three times the limit: nothing counts it
        await a.take_request(ALICE)
        await a.auth_failed(CLIENT)
        lease = await a.enter(ALICE)
        await a.enter(ALICE)
        await a.enter(ALICE)
        a.leave(ALICE, lease)
    assert not shared.available
    said = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(said) == 1 and "WITHOUT" in said[0].getMessage()
    redis_server.start()
    await until(lambda: shared.available)
    back = [r for r in caplog.records if r.name == LOGGER and "again" in r.getMessage()]
    assert len(back) == 1
    # The other replica found it back as well, and both count in Redis again.
    refused = [await refusal((a if i % 2 else b).take_request(ALICE)) for i in range(12)]
    assert sum(err is None for err in refused) == 10


async def test_a_hung_redis_costs_a_request_the_timeout_once_then_nothing(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    ((a, shared),) = await replicas(1)
    await a.take_request(ALICE)  # a pooled connection is open when it hangs
    redis_server.pause()
    try:
        started = time.monotonic()
        err = await refusal(a.take_request(ALICE))
        assert err is not None and err.code == "shared_limits_unavailable"
        assert time.monotonic() - started < TIMEOUT_SECONDS * 2.5
        started = time.monotonic()
        err = await refusal(a.take_request(ALICE))
        assert err is not None and err.code == "shared_limits_unavailable"
        assert time.monotonic() - started < 0.05  # known down: Redis is not asked
    finally:
        redis_server.resume()
    await until(lambda: shared.available)
    await a.take_request(ALICE)


async def test_a_replica_started_while_redis_is_down_serves_once_it_is_up(
    redis_server: RedisServer,
) -> None:
    redis_server.stop()
    config = settings()
    shared = SharedLimits(config, redis_server.url)
    await shared.open()
    try:
        protections = Protections(config, SystemClock(), shared)
        err = await refusal(protections.take_request(ALICE))
        assert err is not None and err.code == "shared_limits_unavailable"
        redis_server.start()
        await until(lambda: shared.available)
        await protections.take_request(ALICE)
    finally:
        await shared.close()


# ---- two real gateways --------------------------------------------------------------------


GatewayPair = Callable[..., Awaitable[tuple[GatewayServer, GatewayServer]]]


@pytest.fixture
async def two_gateways(
    fake_lmstudio: FakeLMStudio, redis_server: RedisServer
) -> AsyncIterator[GatewayPair]:
    servers: list[GatewayServer] = []

    async def start(**overrides: Any) -> tuple[GatewayServer, GatewayServer]:
        overrides.setdefault("upstream_url", fake_lmstudio.url)
        overrides.setdefault("streaming_heartbeat_interval", 0.0)
        overrides.setdefault("server_shutdown_grace", 1.0)
        config = settings(server_host="127.0.0.1", server_port=0, **overrides)
        for _ in range(2):
            gateway = Gateway(
                config,
                StaticKeyAuthenticator(CLIENT_KEY),
                secrets=MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN}),
                shared_limits=SharedLimits(config, redis_server.url),
            )
            server = GatewayServer(gateway)
            await server.start()
            servers.append(server)
        return servers[-2], servers[-1]

    yield start
    for server in servers:
        await server.stop()


CHAT = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "hi"}]}


async def test_two_gateways_admit_exactly_the_limit_between_them(
    two_gateways: GatewayPair,
) -> None:
    a, b = await two_gateways(limits_concurrent_requests=100)  # the burst is all at once
    async with aiohttp.ClientSession() as http:

        async def ask(server: GatewayServer) -> tuple[int, str | None]:
            async with http.get(server.url + "/v1/models", headers=auth_headers()) as response:
                body = await response.json()
                return response.status, body.get("error", {}).get("code")

        answers = await asyncio.gather(*(ask(a if i % 2 else b) for i in range(30)))
    assert answers.count((200, None)) == 10
    assert answers.count((429, "rate_limit_exceeded")) == 20


async def test_a_concurrency_cap_holds_across_two_gateways(
    two_gateways: GatewayPair, fake_lmstudio: FakeLMStudio
) -> None:
    a, b = await two_gateways(limits_concurrent_requests=1)
    fake_lmstudio.behaviour.header_delay = 0.5
    async with aiohttp.ClientSession() as http:

        async def ask(server: GatewayServer) -> tuple[int, str | None]:
            async with http.get(server.url + "/v1/models", headers=auth_headers()) as response:
                body = await response.json()
                return response.status, body.get("error", {}).get("code")

        slow = asyncio.ensure_future(ask(a))
        await until(lambda: len(fake_lmstudio.received) == 1)
        assert await ask(b) == (429, "too_many_concurrent_requests")
        assert await slow == (200, None)
        fake_lmstudio.behaviour.header_delay = 0.0
        # The place a's request held is given back (off the request's path): b gets it.
        for _ in range(50):
            if await ask(b) == (200, None):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the place was never given back")


async def test_closed_gateways_refuse_with_503_and_forward_nothing_while_redis_is_down(
    two_gateways: GatewayPair, fake_lmstudio: FakeLMStudio, redis_server: RedisServer
) -> None:
    a, b = await two_gateways()
    redis_server.stop()
    async with aiohttp.ClientSession() as http:
        for server in (a, b):
            async with http.post(
                server.url + "/v1/chat/completions", json=CHAT, headers=auth_headers()
            ) as response:
                body = await response.json()
                assert response.status == 503
                assert body["error"]["code"] == "shared_limits_unavailable"
                assert response.headers["Retry-After"] == "1"
            # A wrong key cannot be throttled either: refused the same way, not let guess.
            async with http.get(
                server.url + "/v1/models", headers=auth_headers("lmg_wrong")
            ) as response:
                body = await response.json()
                assert response.status == 503
                assert body["error"]["code"] == "shared_limits_unavailable"
        assert fake_lmstudio.received == []
        for server in (a, b):
            async with http.get(server.url + "/readyz") as response:
                ready = await response.json()
                assert response.status == 503
                assert (ready["status"], ready["shared_limits"]) == ("unavailable", "down")
        redis_server.start()
        for server in (a, b):
            await shared_limits_up(http, server)
            async with http.post(
                server.url + "/v1/chat/completions", json=CHAT, headers=auth_headers()
            ) as response:
                assert response.status == 200
            async with http.get(server.url + "/readyz") as response:
                ready = await response.json()
                assert (response.status, ready["shared_limits"]) == (200, "up")
                assert ready["status"] == "ready"
    assert [r.path for r in fake_lmstudio.received if r.method == "POST"] == [
        "/v1/chat/completions"
    ] * 2


async def test_open_gateways_serve_while_redis_is_down_and_readyz_says_degraded(
    two_gateways: GatewayPair, fake_lmstudio: FakeLMStudio, redis_server: RedisServer
) -> None:
    a, b = await two_gateways(state_when_redis_is_down=WhenRedisIsDown.OPEN)
    redis_server.stop()
    async with aiohttp.ClientSession() as http:
        for i in range(12):  # past the limit of 10: nothing can count it
            async with http.get(
                (a if i % 2 else b).url + "/v1/models", headers=auth_headers()
            ) as response:
                assert response.status == 200
        assert len(fake_lmstudio.received) == 12
        async with http.get(a.url + "/readyz") as response:
            ready = await response.json()
            assert response.status == 200
            assert (ready["status"], ready["shared_limits"]) == ("degraded", "down")
        redis_server.start()
        await shared_limits_up(http, a)
        await shared_limits_up(http, b)
        statuses = []
        before = len(fake_lmstudio.received)
        for i in range(12):
            async with http.get(
                (a if i % 2 else b).url + "/v1/models", headers=auth_headers()
            ) as response:
                statuses.append(response.status)
        assert statuses.count(200) == 10 and statuses.count(429) == 2
        assert len(fake_lmstudio.received) - before == 10
        async with http.get(b.url + "/readyz") as response:
            ready = await response.json()
            assert (ready["status"], ready["shared_limits"]) == ("ready", "up")


async def test_an_upstreams_generation_slots_are_counted_on_every_replica(
    replicas: Replicas,
) -> None:
    """Two replicas in front of one LM Studio run no more generations at once than one."""
    (_, a), (_, b) = await replicas(2, queue_generations_in_flight=1)
    loop = asyncio.get_running_loop()
    told: list[str] = []
    slot = await a.take_slot("lmstudio", loop.time() + 1, None)
    assert slot
    # Both sides of the edge: the one slot is A's, so B waits, is told why, and gives up at
    # its deadline; another upstream's slots are its own.
    started = time.monotonic()
    assert await b.take_slot("lmstudio", loop.time() + 0.3, told.append) is None
    assert 0.3 <= time.monotonic() - started < 0.6
    assert told == ["waiting, LM Studio is busy with answers from other replicas"]
    other = await b.take_slot("other-machine", loop.time() + 1, None)
    assert other
    # Given back on A: B, asking again every SLOT_POLL_SECONDS, has it within a few of them.
    waiting = asyncio.ensure_future(b.take_slot("lmstudio", loop.time() + 2, None))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    a.give_back_slot("lmstudio", slot)
    given_back = time.monotonic()
    assert await waiting
    assert time.monotonic() - given_back < 0.3


async def test_a_slot_given_back_here_wakes_a_generation_waiting_here_at_once(
    replicas: Replicas,
) -> None:
    ((_, a),) = await replicas(1, queue_generations_in_flight=1)
    loop = asyncio.get_running_loop()
    slot = await a.take_slot("lmstudio", loop.time() + 1, None)
    assert slot
    waiting = asyncio.ensure_future(a.take_slot("lmstudio", loop.time() + 2, None))
    await asyncio.sleep(0.02)
    a.give_back_slot("lmstudio", slot)
    given_back = time.monotonic()
    assert await waiting
    assert time.monotonic() - given_back < 0.04  # before the next poll


async def test_a_crashed_replicas_generation_slots_free_themselves(replicas: Replicas) -> None:
    (_, crashing), (_, live) = await replicas(2, queue_generations_in_flight=1)
    loop = asyncio.get_running_loop()
    assert await crashing.take_slot("lmstudio", loop.time() + 1, None)
    await crashing.close()  # no renewal, no give-back: as if the process died
    started = time.monotonic()
    assert await live.take_slot("lmstudio", loop.time() + LEASE * 4, None)
    assert LEASE * 0.8 <= time.monotonic() - started < LEASE * 3


async def test_a_generation_that_stops_waiting_for_a_slot_stops_asking(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    # Leases long enough that no renewal falls in the count below.
    (_, a), (_, b) = await replicas(2, queue_generations_in_flight=1, state_lease_seconds=30)
    loop = asyncio.get_running_loop()
    assert await a.take_slot("lmstudio", loop.time() + 1, None)
    waiters = [
        asyncio.ensure_future(b.take_slot("lmstudio", loop.time() + 30, None)) for _ in range(5)
    ]
    await asyncio.sleep(0.1)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    redis = redis_server.client()
    before = int(redis.info("commandstats")["cmdstat_evalsha"]["calls"])
    await asyncio.sleep(0.3)  # six polls' time
    assert int(redis.info("commandstats")["cmdstat_evalsha"]["calls"]) == before


async def test_a_place_another_replica_is_giving_back_is_not_refused(replicas: Replicas) -> None:
    """A client that sends its next request the moment its last answer came, to another
    replica, finds the place the first is giving back (in the background) free."""
    (a, _), (b, _) = await replicas(2, limits_concurrent_requests=1)
    lease = await a.enter(ALICE)
    asyncio.get_running_loop().call_later(0.02, a.leave, ALICE, lease)  # on its way
    started = time.monotonic()
    second = await b.enter(ALICE)
    assert time.monotonic() - started < 0.5
    # A place that is not being given back is refused, a moment later.
    err = await refusal(a.enter(ALICE))
    assert err is not None and err.code == "too_many_concurrent_requests"
    b.leave(ALICE, second)
