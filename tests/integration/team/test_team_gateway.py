"""A team's gateway for real: 2-3 `lmgate serve` replicas sharing a real PostgreSQL and a
real Redis (tests/postgres_server.py, tests/redis_server.py), with a real nginx in front made by
`lmgate deploy nginx --replica` (tests/replicas.py). What issue 19 says must hold across
replicas: a rate limit is exact, a revocation reaches every replica within a second, a pairing
code pairs one device however many replicas it is sent to at once, and a database that goes
away fails closed and comes back by itself."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.fake_lmstudio import FakeLMStudio, fake_on_a_thread
from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer
from tests.replicas import DOMAIN, TeamGateway
from tray_app.gateway.token_estimate import estimate_prompt_tokens

MakeTeam = Callable[..., TeamGateway]


@pytest.fixture
def upstream() -> Iterator[FakeLMStudio]:
    yield from fake_on_a_thread()


@pytest.fixture
def make_team(
    tmp_path: Path,
    upstream: FakeLMStudio,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
) -> Iterator[MakeTeam]:
    """A team gateway on a database of its own; settings as LMGATE_* variables."""
    made: list[TeamGateway] = []

    def make(**settings: str) -> TeamGateway:
        home = tmp_path / f"team{len(made)}"
        home.mkdir()
        gateway = TeamGateway(
            home,
            postgres_server.new_database(),
            redis_server.url,
            upstream.url,
            settings=settings,
        )
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        gateway.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Host": DOMAIN}


async def status_of(session: aiohttp.ClientSession, url: str, key: str) -> tuple[int, str]:
    async with session.get(url + "/v1/models", headers=bearer(key), ssl=False) as r:
        body = await r.read()
        code = json.loads(body).get("error", {}).get("code", "") if r.status != 200 else ""
        return r.status, code


async def answers_within(
    session: aiohttp.ClientSession, urls: list[str], key: str, want: tuple[int, str], seconds: float
) -> list[tuple[int, str]]:
    """Every replica's answer, asked again until each gives ``want`` or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        answers = [await status_of(session, u, key) for u in urls]
        if answers == [want] * len(urls) or time.monotonic() >= deadline:
            return answers
        await asyncio.sleep(0.2)


async def test_n_requests_a_minute_are_n_across_the_replicas_not_n_each(
    make_team: MakeTeam,
) -> None:
    team = make_team(LMGATE_LIMITS_REQUESTS_PER_MINUTE="10").start(3)
    key = team.create_key()
    urls = [r.url for r in team.replicas]
    async with aiohttp.ClientSession() as session:
        answers = [await status_of(session, urls[n % 3], key) for n in range(16)]
    assert Counter(answers) == {(200, ""): 10, (429, "rate_limit_exceeded"): 6}


async def test_through_nginx_the_limit_is_the_same(make_team: MakeTeam) -> None:
    team = make_team(LMGATE_LIMITS_REQUESTS_PER_MINUTE="10").start(2)
    team.start_nginx()
    key = team.create_key()
    async with aiohttp.ClientSession() as session:
        answers = [await status_of(session, team.nginx_url, key) for _ in range(14)]
    assert Counter(answers) == {(200, ""): 10, (429, "rate_limit_exceeded"): 4}


async def test_a_concurrency_cap_holds_across_the_replicas_behind_nginx(
    make_team: MakeTeam, upstream: FakeLMStudio
) -> None:
    team = make_team(LMGATE_LIMITS_CONCURRENT_REQUESTS="2").start(2)
    team.start_nginx()
    key = team.create_key()
    upstream.behaviour.header_delay = 1.0  # each answer takes a second: all overlap
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(status_of(session, team.nginx_url, key) for _ in range(6)))
    assert Counter(answers) == {(200, ""): 2, (429, "too_many_concurrent_requests"): 4}


async def test_a_callers_generations_are_capped_across_the_replicas(
    make_team: MakeTeam, upstream: FakeLMStudio
) -> None:
    team = make_team(LMGATE_LIMITS_CONCURRENT_REQUESTS="1").start(2)
    key = team.create_key()
    first, second = (r.url for r in team.replicas)
    upstream.behaviour.header_delay = 1.0  # each answer takes a second
    body = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "Hi"}]}
    async with aiohttp.ClientSession() as session:

        async def chat(url: str) -> tuple[int, str]:
            async with session.post(
                url + "/v1/chat/completions", json=body, headers=bearer(key)
            ) as r:
                answer = await r.json()
                return r.status, answer["error"]["code"] if r.status != 200 else ""

        running = asyncio.ensure_future(chat(first))
        await asyncio.sleep(0.4)
        assert await chat(second) == (429, "too_many_concurrent_requests")
        assert await running == (200, "")
        # Given back when it ended: the other replica serves the caller's next request, sent
        # the moment the answer came (the place is given back a moment after it went out).
        assert await chat(second) == (200, "")
        # On one replica a second generation waits for its turn, as on one machine.
        assert list(await asyncio.gather(chat(first), chat(first))) == [(200, "")] * 2


async def test_a_budget_is_exact_under_parallel_streams_on_the_replicas(
    make_team: MakeTeam, upstream: FakeLMStudio
) -> None:
    # Room for every stream at once: only the budget refuses.
    team = make_team(LMGATE_LIMITS_CONCURRENT_REQUESTS="32").start(2)
    key = team.create_key("budgeted", "--budget-day", "1000")
    urls = [r.url for r in team.replicas]
    messages = [{"role": "user", "content": "Hi"}]
    prompt = estimate_prompt_tokens({"messages": messages})
    upstream.behaviour.first_chunk_delay = 1.0  # every stream is running at once
    async with aiohttp.ClientSession() as session:

        async def stream(url: str, reserved: int) -> tuple[int, str]:
            body = {
                "model": "qwen2.5-7b-instruct",
                "messages": messages,
                "stream": True,
                "max_tokens": reserved - prompt,
            }
            async with session.post(
                url + "/v1/chat/completions", json=body, headers=bearer(key)
            ) as r:
                if r.status != 200:
                    return r.status, (await r.json())["error"]["code"]
                text = (await r.read()).decode()
                assert text.rstrip().endswith("data: [DONE]"), text
                return r.status, ""

        # Each reserves 100: the day's 1000 hold ten of them, whichever replica they reach.
        answers = await asyncio.gather(*(stream(urls[n % 2], 100) for n in range(16)))
        assert Counter(answers) == {(200, ""): 10, (429, "budget_exceeded"): 6}
        # Settled with what they used, on both replicas: what is left is exact on either.
        used = 10 * (7 + upstream.behaviour.chunks)  # the fake's usage per stream
        upstream.behaviour.first_chunk_delay = 0
        assert await stream(urls[0], 1000 - used + 1) == (429, "budget_exceeded")
        assert await stream(urls[1], 1000 - used) == (200, "")


async def test_two_replicas_on_one_lm_studio_run_no_more_generations_than_one_would(
    make_team: MakeTeam, upstream: FakeLMStudio
) -> None:
    team = make_team(
        LMGATE_QUEUE_GENERATIONS_IN_FLIGHT="1", LMGATE_LIMITS_CONCURRENT_REQUESTS="8"
    ).start(2)
    keys = [team.create_key(f"caller{n}") for n in range(2)]
    first, second = (r.url for r in team.replicas)
    upstream.behaviour.header_delay = 0.5
    body = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "Hi"}]}
    async with aiohttp.ClientSession() as session:

        async def chat(url: str, key: str) -> float:
            async with session.post(
                url + "/v1/chat/completions", json=body, headers=bearer(key)
            ) as r:
                assert r.status == 200, await r.text()
                return time.monotonic()

        started = time.monotonic()
        ended = await asyncio.gather(chat(first, keys[0]), chat(second, keys[1]))
    # One after the other: LM Studio's one slot, whichever replica the generation came to.
    assert max(ended) - started >= 0.95
    assert min(ended) - started < 0.9


async def test_a_key_revoked_by_the_cli_is_refused_by_every_replica_within_a_second(
    make_team: MakeTeam,
) -> None:
    team = make_team().start(3)
    key = team.create_key("leaver")
    async with aiohttp.ClientSession() as session:
        for replica in team.replicas:  # every replica has it in memory
            assert await status_of(session, replica.url, key) == (200, "")
        listed = team.cli("key", "list").stdout
        key_id = re.search(r"^([0-9a-f]{12})\s+leaver", listed, re.M)
        assert key_id, listed
        assert team.cli("key", "revoke", key_id.group(1)).returncode == 0
        revoked_at = time.monotonic()
        pending = {r.url for r in team.replicas}
        while pending and time.monotonic() - revoked_at < 1.0:
            for url in list(pending):
                if (await status_of(session, url, key))[0] == 401:
                    pending.discard(url)
            await asyncio.sleep(0.05)
    assert not pending, f"still accepted a second after the revocation: {pending}"


async def test_one_pairing_code_sent_to_every_replica_at_once_pairs_one_device(
    make_team: MakeTeam,
) -> None:
    team = make_team().start(3)
    paired = team.cli("pair", "--device", "Anna's phone", "--url", "https://" + DOMAIN)
    assert paired.returncode == 0, paired.stderr
    match = re.search(r"#([A-Z2-7]{24})", paired.stdout)
    assert match, paired.stdout
    body = {"code": match.group(1)}
    urls = [r.url for r in team.replicas]

    async def redeem(session: aiohttp.ClientSession, n: int) -> int:
        async with session.post(urls[n % 3] + "/pair", json=body, headers={"Host": DOMAIN}) as r:
            await r.read()
            return r.status

    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(redeem(session, n) for n in range(50)))
    assert statuses.count(200) == 1, Counter(statuses)
    assert set(statuses) <= {200, 401, 429}
    devices = team.cli("device", "list").stdout
    assert devices.count("Anna's phone") == 1, devices


async def test_a_database_that_goes_away_fails_closed_and_comes_back_by_itself(
    make_team: MakeTeam, postgres_server: PostgresServer
) -> None:
    team = make_team().start(2)
    key = team.create_key()
    urls = [r.url for r in team.replicas]
    async with aiohttp.ClientSession() as session:
        assert [await status_of(session, u, key) for u in urls] == [(200, "")] * 2
        postgres_server.stop()
        try:
            refused = (503, "state_unavailable")
            assert await answers_within(session, urls, key, refused, 10) == [refused] * 2
            async with session.get(urls[0] + "/readyz", headers={"Host": DOMAIN}) as r:
                assert (r.status, (await r.json())["database"]) == (503, "down")
            # Nothing waits on the missing database: not the refusals, not the health check.
            for path in ("/healthz", "/v1/models", "/healthz"):
                began = time.monotonic()
                async with session.get(urls[1] + path, headers=bearer(key)) as r:
                    await r.read()
                assert time.monotonic() - began < 0.5, path
        finally:
            postgres_server.start()
        assert await answers_within(session, urls, key, (200, ""), 20) == [(200, "")] * 2
    assert all(r.alive for r in team.replicas)


async def test_a_database_that_hangs_holds_up_no_request_and_no_stream(
    make_team: MakeTeam, postgres_server: PostgresServer, upstream: FakeLMStudio
) -> None:
    """A frozen PostgreSQL keeps its connections open and acknowledges every packet: no
    socket option ends a wait on it. The replica's loop never waits on it: a stream under way
    goes on, health checks answer at once, and a request is refused within the bound."""
    team = make_team().start(1)
    key = team.create_key()
    url = team.replicas[0].url
    upstream.behaviour.chunks, upstream.behaviour.chunk_delay = 16, 0.25
    body = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "Hi"}]}
    # A loop held by the database would hang every call: each fails in 15 s instead.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        assert await status_of(session, url, key) == (200, "")
        async with session.post(
            url + "/v1/chat/completions", json={**body, "stream": True}, headers=bearer(key)
        ) as stream:
            assert stream.status == 200
            data = await stream.content.readany()
            postgres_server.freeze()
            try:
                refused = (503, "state_unavailable")
                began = time.monotonic()
                assert await answers_within(session, [url], key, refused, 10) == [refused]
                # Told within the bound (2 s) after the replica's first read that hung.
                assert time.monotonic() - began < 4.5
                for path in ("/healthz", "/v1/models", "/readyz"):
                    began = time.monotonic()
                    async with session.get(url + path, headers=bearer(key)) as r:
                        await r.read()
                        assert r.status != 200 or path == "/healthz", path
                    assert time.monotonic() - began < 0.5, path
                data += await stream.content.read()  # the answer went on meanwhile
            finally:
                postgres_server.thaw()
    events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 17
    async with aiohttp.ClientSession() as session:
        assert await answers_within(session, [url], key, (200, ""), 20) == [(200, "")]
    assert team.replicas[0].alive


async def test_a_chat_streams_through_nginx_to_a_replica(
    make_team: MakeTeam, upstream: FakeLMStudio
) -> None:
    team = make_team().start(2)
    team.start_nginx()
    key = team.create_key()
    upstream.behaviour.chunk_delay = 0.05  # arrives in pieces, as a model's answer does
    body = {
        "model": "qwen2.5-7b-instruct",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
    }
    arrivals: list[float] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            team.nginx_url + "/v1/chat/completions", json=body, headers=bearer(key), ssl=False
        ) as r,
    ):
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        data = b""
        async for piece in r.content.iter_any():
            arrivals.append(time.monotonic())
            data += piece
    events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert len(events) >= upstream.behaviour.chunks + 1
    # Not buffered by nginx or the replica: the pieces came over the answer's whole time.
    assert arrivals[-1] - arrivals[0] > 0.15


async def test_redis_gone_refuses_on_every_replica_and_comes_back(
    make_team: MakeTeam, redis_server: RedisServer
) -> None:
    team = make_team().start(2)  # state.when_redis_is_down = closed, the default
    key = team.create_key()
    urls = [r.url for r in team.replicas]
    async with aiohttp.ClientSession() as session:
        assert [await status_of(session, u, key) for u in urls] == [(200, "")] * 2
        redis_server.stop()
        try:
            answers = [await status_of(session, u, key) for u in urls]
            assert answers == [(503, "shared_limits_unavailable")] * 2
            async with session.get(urls[0] + "/readyz", headers={"Host": DOMAIN}) as r:
                assert (r.status, (await r.json())["shared_limits"]) == (503, "down")
        finally:
            redis_server.start()
        assert await answers_within(session, urls, key, (200, ""), 10) == [(200, "")] * 2


async def test_a_killed_replica_is_stepped_around_by_nginx(make_team: MakeTeam) -> None:
    team = make_team().start(2)
    team.start_nginx()
    key = team.create_key()
    team.kill(0)  # SIGKILL: no goodbye to anyone
    async with aiohttp.ClientSession() as session:
        answers = [await status_of(session, team.nginx_url, key) for _ in range(10)]
    assert answers == [(200, "")] * 10


async def test_usage_sums_exactly_with_a_replica_killed_mid_load(
    make_team: MakeTeam, upstream: FakeLMStudio, tmp_path: Path
) -> None:
    # Chats go to both replicas, 6 at a time on each, each taking 0.1 s at LM Studio; one
    # replica is SIGKILLed in the middle and started again on its data directory. What it
    # had counted and not flushed, it writes then (its journal); what was under way is
    # counted as requests, their tokens unknown, and said so.
    team = make_team(
        LMGATE_LIMITS_CONCURRENT_REQUESTS="64",
        LMGATE_QUEUE_GENERATIONS_IN_FLIGHT="64",
        LMGATE_LIMITS_REQUESTS_PER_MINUTE="100000",
    ).start(2)
    key = team.create_key()
    upstream.behaviour.header_delay = 0.1
    per_chat = 7 + upstream.behaviour.chunks  # the fake's usage of a non-streamed chat
    urls = [r.url for r in team.replicas]
    answered = Counter[int]()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:

        async def keep_asking(replica: int) -> None:
            body = {"model": "qwen2.5-7b-instruct", "messages": [{"role": "user", "content": "Hi"}]}
            while not stop.is_set():
                try:
                    async with session.post(
                        urls[replica] + "/v1/chat/completions", json=body, headers=bearer(key)
                    ) as r:
                        await r.read()
                        assert r.status == 200
                        answered[replica] += 1
                except aiohttp.ClientError:
                    return  # the killed replica: its clients give up

        workers = [asyncio.create_task(keep_asking(n % 2)) for n in range(12)]
        await asyncio.sleep(1.5)
        await asyncio.to_thread(team.kill, 0)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)
    reached = sum(1 for r in upstream.received if r.path == "/v1/chat/completions")
    with (tmp_path / "restarted.log").open("w") as log:
        team.restart(0, stderr=log, LMGATE_LOG_LEVEL="info")
    for replica in team.replicas:
        replica.process.send_signal(signal.SIGTERM)  # a clean stop flushes what is pending
        replica.process.wait(30)
    said = (tmp_path / "restarted.log").read_text()
    under_way = re.search(r"(\d+) requests were under way when LM Gate stopped", said)
    assert under_way, said  # 6 were at LM Studio when the kill came
    unknown = int(under_way.group(1))
    assert 1 <= unknown <= 6
    # Flushes come every 2 s: what it answered since the last was only in its journal.
    saved = re.search(r"usage of (\d+) requests that LM Gate had counted but not saved", said)
    assert saved, said
    assert 0 < int(saved.group(1)) <= answered[0]

    shown = team.cli("usage", "--csv")
    assert shown.returncode == 0, shown.stderr
    (row,) = [line.split(",") for line in shown.stdout.splitlines()[1:] if line]
    header = shown.stdout.splitlines()[0].split(",")
    totals = dict(zip(header, row, strict=True))
    requests = int(totals["requests"])
    tokens = int(totals["prompt_tokens"]) + int(totals["completion_tokens"])
    # Every chat LM Studio was asked for is counted, on whichever replica; those that ended
    # with their usage, exactly; only those under way at the kill without tokens.
    assert requests >= reached >= sum(answered.values())
    assert tokens == per_chat * (requests - unknown)
    assert answered[0] > 0 and answered[1] > answered[0]  # the kill came mid-load
