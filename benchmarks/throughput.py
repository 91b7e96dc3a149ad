"""Requests/s under ``wrk`` against the bare aiohttp proxy floor, for each way LM Gate runs.

    .venv/bin/python benchmarks/throughput.py [--rounds 5] [--seconds 5] [--connections 16]
        [--team] [--json out.json]

A latency benchmark asks one request at a time from Python; ``wrk`` (a C load generator, from
Debian's ``wrk`` package) keeps ``--connections`` requests in flight on one thread and measures
what the server can answer, so per-request CPU cost shows as it does under real load. Processes
on loopback: the fast fake LM Studio (``fast_upstream.py``); the bare aiohttp proxy
(``floors.py``), the least an aiohttp reverse proxy can do; and ``lmgate serve`` with every
protection on, as ``bench_gateway.py`` runs it (limits raised far from their edge so the proxy
path is measured, not a refusal), in these shapes:

- ``gateway``: the default embedded state (SQLite, limits in the process), a key without budget;
- ``gateway + budget``: the same with a key holding a day budget (reserved and settled on every
  request) - the fair queue runs on every generation in every shape;
- ``gateway, 2 upstreams``: a second fake LM Studio configured as ``[upstreams.second]``;
- ``team (postgres + redis)`` (``--team``, needs root and Debian's postgresql and redis-server):
  the shared state, with a budget, on a throwaway PostgreSQL and Redis.

Each round runs every side once per path (a chat POST and the model list GET), the order shifting
by one each round; figures are medians over rounds. A side whose ``wrk`` run saw any non-2xx
answer or socket error is reported as such, never as a figure. Reported: requests/s and the ratio
to the floor's in the same round; issue 21's target is >= 0.8x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from bench_gateway import CHAT, start_gateway, start_process, start_upstream

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "LMGATE_QUEUE_GENERATIONS_IN_FLIGHT": "1000",
    "LMGATE_QUEUE_MAX_WAITING_PER_CALLER": "1000",
    "LMGATE_QUEUE_MAX_WAITING_PER_CLIENT": "1000",
}
BUDGET = ("--budget-day", str(10**9))
TARGET = 0.8
PATHS = {"chat": "/v1/chat/completions", "models": "/v1/models"}


@dataclass
class Side:
    name: str
    url: str
    headers: dict[str, str]
    rps: dict[str, list[float]] = field(default_factory=dict)
    ratio: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def lua_script(home: Path) -> Path:
    """wrk's request for the chat path: a POST with the benchmark's JSON body."""
    body = json.dumps(CHAT).replace("\\", "\\\\").replace('"', '\\"')
    script = home / "chat.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{body}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


def wrk(
    side: Side, path: str, seconds: float, connections: int, script: Path | None
) -> float | str:
    """Requests/s, or why the run does not count."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s"]
    for name, value in side.headers.items():
        args += ["-H", f"{name}: {value}"]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run(
        [*args, side.url + path], capture_output=True, text=True, timeout=seconds + 30
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        bad = [line.strip() for line in out.splitlines() if "Non-2xx" in line or "Socket" in line]
        return "; ".join(bad)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        return f"wrk printed no rate: {out[-300:]!r}"
    return float(match.group(1))


async def check(side: Side) -> None:
    """Refuse to measure a side that does not answer both paths with 200."""
    async with aiohttp.ClientSession(headers=side.headers) as session:
        async with session.post(side.url + PATHS["chat"], json=CHAT) as r:
            if r.status != 200:
                raise SystemExit(f"{side.name}: chat answered {r.status}: {await r.text()}")
        async with session.get(side.url + PATHS["models"]) as r:
            if r.status != 200:
                raise SystemExit(f"{side.name}: models answered {r.status}: {await r.text()}")


def start_sides(
    home: Path, team: bool, started: list[subprocess.Popen[str]], stack: list[object]
) -> list[Side]:
    upstream, upstream_url = start_upstream()
    started.append(upstream)
    floor, floor_url = start_process(
        [sys.executable, str(HERE / "floors.py"), "bare-aiohttp", upstream_url],
        {**os.environ},
        r"Listening on (http://\S+)",
    )
    started.append(floor)
    sides = [Side("bare aiohttp proxy (floor)", floor_url, {})]

    def gateway(name: str, settings: dict[str, str], key_options: tuple[str, ...] = ()) -> None:
        side_home = home / re.sub(r"\W+", "-", name)
        side_home.mkdir()
        proc, url, key = start_gateway(
            side_home,
            upstream_url,
            side_home / "gateway.log",
            settings={**SETTINGS, **settings},
            key_options=key_options,
        )
        started.append(proc)
        sides.append(Side(name, url, {"Authorization": f"Bearer {key}"}))

    gateway("gateway", {})
    gateway("gateway + budget", {}, BUDGET)
    second, second_url = start_upstream()
    started.append(second)
    config = home / "two.toml"
    config.write_text(f'[upstreams.second]\nurl = "{second_url}"\n')
    gateway("gateway, 2 upstreams", {"LMGATE_CONFIG": str(config)})
    if team:
        sys.path.insert(0, str(HERE.parent))
        from tests.postgres_server import PostgresServer, _binaries
        from tests.redis_server import RedisServer

        bin_dir, redis_binary = _binaries(), shutil.which("redis-server")
        if bin_dir is None or redis_binary is None:
            raise SystemExit("--team needs Debian's postgresql and redis-server")
        # A directory of its own under /tmp: PostgreSQL's user cannot enter the run's (0700).
        postgres = PostgresServer(bin_dir, Path(tempfile.mkdtemp(prefix="lmgate-bench-pg-")))
        (home / "redis").mkdir()
        redis = RedisServer(redis_binary, home / "redis")
        postgres.start()
        stack.append(postgres)
        redis.start()
        stack.append(redis)
        gateway(
            "team (postgres + redis)",
            {
                "LMGATE_STATE_BACKEND": "postgres",
                "LMGATE_SECRETS_STORE": "env",
                "LMGATE_SECRET_STATE_DATABASE_URL": postgres.new_database(),
                "LMGATE_SECRET_STATE_REDIS_URL": redis.url,
                "LMGATE_SECRET_JWT_SIGNING_KEY": secrets.token_urlsafe(32),
            },
            BUDGET,
        )
    return sides


def run(rounds: int, seconds: float, connections: int, team: bool) -> list[Side]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    home = Path(tempfile.mkdtemp(prefix="lmgate-bench-wrk-"))
    script = lua_script(home)
    started: list[subprocess.Popen[str]] = []
    stack: list[object] = []
    try:
        sides = start_sides(home, team, started, stack)
        for side in sides:
            asyncio.run(check(side))
            for path in PATHS.values():  # warm-up: connections, caches
                wrk(side, path, 1, connections, script if path == PATHS["chat"] else None)
        for round_ in range(rounds):
            shift = round_ % len(sides)
            order = sides[shift:] + sides[:shift]
            for kind, path in PATHS.items():
                measured: dict[str, float] = {}
                for side in order:
                    got = wrk(side, path, seconds, connections, script if kind == "chat" else None)
                    if isinstance(got, str):
                        side.failures.append(f"{kind}: {got}")
                        continue
                    side.rps.setdefault(kind, []).append(got)
                    measured[side.name] = got
                floor = measured.get(sides[0].name)
                for side in sides:
                    if floor and side.name in measured:
                        side.ratio.setdefault(kind, []).append(measured[side.name] / floor)
                print(f"round {round_ + 1} {kind}: {measured}", file=sys.stderr)
    finally:
        for proc in reversed(started):
            proc.terminate()
            proc.wait(30)
        for server in reversed(stack):
            server.stop()  # type: ignore[attr-defined]
    return sides


def table(sides: list[Side]) -> str:
    out = [
        "| side | chat requests/s | chat / floor | model list requests/s | model list / floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for side in sides:
        cells = []
        for kind in PATHS:
            if side.failures and kind not in side.rps:
                cells += ["failed", ""]
                continue
            rps = statistics.median(side.rps[kind])
            ratio = statistics.median(side.ratio[kind])
            mark = "" if ratio >= TARGET or side is sides[0] else " (below 0.8x)"
            cells += [f"{rps:,.0f}", f"{ratio:.2f}x{mark}"]
        out.append(f"| {side.name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each wrk run")
    parser.add_argument("--connections", type=int, default=16, help="wrk's open connections")
    parser.add_argument("--team", action="store_true", help="also the PostgreSQL + Redis state")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    sides = run(args.rounds, args.seconds, args.connections, args.team)
    print(table(sides))
    for side in sides:
        for failure in side.failures:
            print(f"{side.name}: {failure}")
    if args.json:
        args.json.write_text(
            json.dumps({s.name: {"rps": s.rps, "ratio": s.ratio} for s in sides}, indent=2)
        )


if __name__ == "__main__":
    main()
