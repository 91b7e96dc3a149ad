"""What the team gateway's shared state costs, and what a second replica brings, in one run.

    .venv/bin/python benchmarks/bench_team.py [--rounds 5] [--json out.json]

Processes on loopback: a fast fake LM Studio (``fast_upstream.py``); ``lmgate serve`` on its
embedded state (SQLite, limits in the process); and two ``lmgate serve`` replicas on a
throwaway PostgreSQL 15 and Redis 7 from Debian's packages (``tests/postgres_server.py``,
``tests/redis_server.py``; PostgreSQL runs with fsync off, so its writes cost less than on a
real disk). Every gateway has everything on, as ``bench_gateway.py`` runs it, and a key with a
token budget, so a team request pays every shared step: the rate limit, the caller's lease,
the budget's read and reservation, the generation slot, and their give-backs in Redis.

Reported, as medians over rounds that alternate the sides: non-streamed chat p50/p99 at
concurrency 1 on SQLite and on the shared state (one replica), and requests/s at concurrency 16
for SQLite, one replica and two replicas (the client spreads requests over both). On a
2-core machine two replicas share the cores with the upstream, the databases and this client:
the figure says what a second process gains here, not what a second machine would. Needs root
(PostgreSQL runs as its own user) and Debian's postgresql-15 and redis-server. About two
minutes with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from bench_gateway import (
    CHAT,
    Side,
    chat_latency,
    gateway_environment,
    start_gateway,
    start_process,
    start_upstream,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the throwaway servers the tests use

from tests.postgres_server import PostgresServer, _binaries  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

SETTINGS = {"LMGATE_QUEUE_GENERATIONS_IN_FLIGHT": "1000", "LMGATE_LOG_LEVEL": "info"}
KEY_OPTIONS = ("--budget-day", str(10**9))
SQLITE, TEAM, TEAM_TWO = "sqlite (one machine)", "postgres + redis, 1 replica", "2 replicas"


def team_settings(database_url: str, redis_url: str, master: str) -> dict[str, str]:
    return {
        **SETTINGS,
        "LMGATE_STATE_BACKEND": "postgres",
        "LMGATE_SECRETS_STORE": "env",
        "LMGATE_SECRET_STATE_DATABASE_URL": database_url,
        "LMGATE_SECRET_STATE_REDIS_URL": redis_url,
        "LMGATE_SECRET_JWT_SIGNING_KEY": master,
    }


async def throughput(
    session: aiohttp.ClientSession, name: str, urls: list[str], key: str, requests: int
) -> float:
    """Requests/s of 16 workers sending ``requests`` chats, spread round-robin over ``urls``."""
    headers = {"Authorization": f"Bearer {key}"}
    turn = itertools.cycle(urls)

    async def worker() -> None:
        for _ in range(requests // 16):
            async with session.post(
                next(turn) + "/v1/chat/completions", json=CHAT, headers=headers
            ) as r:
                body = await r.read()
                assert r.status == 200, (name, r.status, body[:300])

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(16)))
    return (requests // 16 * 16) / (time.perf_counter() - began)


async def run(rounds: int, requests: int) -> dict[str, dict[str, float]]:
    bin_dir = _binaries()
    if bin_dir is None or shutil.which("redis-server") is None:
        raise SystemExit(
            "needs Debian's postgresql-15 and redis-server (tests/run.sh installs them)"
        )
    home = Path(tempfile.mkdtemp(prefix="lmgate-bench-team-"))
    started: list[subprocess.Popen[str]] = []
    # A directory of its own under /tmp: PostgreSQL's user cannot enter the run's (0700).
    postgres = PostgresServer(bin_dir, Path(tempfile.mkdtemp(prefix="lmgate-bench-pg-")))
    redis = RedisServer(str(shutil.which("redis-server")), home / "redis")
    (home / "redis").mkdir()
    try:
        postgres.start()
        redis.start()
        upstream, upstream_url = start_upstream()
        started.append(upstream)
        (home / "sqlite").mkdir()
        proc, sqlite_url, sqlite_key = start_gateway(
            home / "sqlite", upstream_url, home / "sqlite.log", settings=SETTINGS,
            key_options=KEY_OPTIONS,
        )  # fmt: skip
        started.append(proc)
        shared = team_settings(postgres.new_database(), redis.url, secrets.token_urlsafe(32))
        (home / "team").mkdir()
        proc, first_url, team_key = start_gateway(
            home / "team", upstream_url, home / "team.log", settings=shared,
            key_options=KEY_OPTIONS,
        )  # fmt: skip
        started.append(proc)
        second_env = gateway_environment(
            home / "team", upstream_url, {**shared, "LMGATE_STORAGE_DATA_DIR": str(home / "team-2")}
        )
        proc, second_url = start_process(
            [str(Path(sys.executable).with_name("lmgate")), "serve", "--port", "0"],
            second_env, r"Listening on (http://\S+)", home / "team-2.log",
        )  # fmt: skip
        started.append(proc)
        sides = [
            Side(SQLITE, sqlite_url, {"Authorization": f"Bearer {sqlite_key}"}),
            Side(TEAM, first_url, {"Authorization": f"Bearer {team_key}"}),
        ]
        spread: dict[str, tuple[list[str], str]] = {
            SQLITE: ([sqlite_url], sqlite_key),
            TEAM: ([first_url], team_key),
            TEAM_TWO: ([first_url, second_url], team_key),
        }
        rps: dict[str, list[float]] = {name: [] for name in spread}
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            for side in sides:  # warm-up: connections, caches, the scripts loaded in Redis
                await chat_latency(session, side, 200, 4)
                side.figures.clear()
            await throughput(session, TEAM_TWO, [first_url, second_url], team_key, 320)
            for round_ in range(rounds):
                shift = round_ % len(sides)
                for side in sides[shift:] + sides[:shift]:
                    await chat_latency(session, side, requests, 1)
                names = list(spread)
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    urls, key = spread[name]
                    rps[name].append(await throughput(session, name, urls, key, requests * 2))
    finally:
        for proc in reversed(started):
            proc.terminate()
            proc.wait(30)
        redis.stop()
        postgres.stop()
    results = {side.name: {m: side.median(m) for m in side.figures} for side in sides}
    for name, figures in rps.items():
        results.setdefault(name, {})["c16_rps"] = sorted(figures)[len(figures) // 2]
    results[TEAM]["c1_p50_added_ms"] = results[TEAM]["c1_p50_ms"] - results[SQLITE]["c1_p50_ms"]
    results[TEAM_TWO]["rps_ratio_to_one_replica"] = (
        results[TEAM_TWO]["c16_rps"] / results[TEAM]["c16_rps"]
    )
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| side | chat p50 c1 | chat p99 c1 | req/s c16 |",
        "|---|---|---|---|",
    ]
    for name in (SQLITE, TEAM, TEAM_TWO):
        row = results[name]
        p50 = f"{row['c1_p50_ms']:.2f} ms" if "c1_p50_ms" in row else "—"
        p99 = f"{row['c1_p99_ms']:.2f} ms" if "c1_p99_ms" in row else "—"
        lines.append(f"| {name} | {p50} | {p99} | {row['c16_rps']:.0f} |")
    lines.append(
        f"\nshared state adds {results[TEAM]['c1_p50_added_ms']:+.2f} ms at c1; two replicas "
        f"give {results[TEAM_TWO]['rps_ratio_to_one_replica']:.2f}x one replica's req/s"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400, help="chats per c1 measurement")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = asyncio.run(run(args.rounds, args.requests))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
