"""Killing one of two upstreams under load: which requests are lost, and how long until the
gateway notices and, after a restart, uses the server again.

    .venv/bin/python benchmarks/bench_failover.py [--concurrency 16] [--json out.json]

Processes on loopback: two fake LM Studios serving the same model (this file's ``--upstream``
mode: ``fast_upstream.py``'s answers, plus a pause before a non-streamed answer, as if it were
generating, and a log of every request it received), the real ``lmgate serve`` in front of
both (as ``bench_gateway.py`` runs it, with ``[upstreams.second]`` in its config file), and
this client: ``--concurrency`` workers, each its own caller (a conversation stays on the
upstream that served it, per caller), alternating non-streamed and streamed chats. After
``--kill-after`` seconds the upstream named ``second`` is killed (SIGKILL), ``--down-for``
seconds later started again on its port; then a new conversation every 50 ms (each on a model
of its own, so nothing holds it elsewhere) until one lands on ``second``, and one more second
of load. Bounded: under 30 s when the rejoin is quick, at most ``--rejoin-within`` more.

Every request that did not end well is classified: *had started streaming* (content chunks
arrived, then the stream broke: allowed, issue 18 says it is not retried) or *had not started*
(nothing of the answer arrived), the latter split by whether a server's log shows it arrived
(*reached a server*: it may have been generating, so it cannot be retried), or else whether it
was sent before the kill (*in flight at the kill*: handed to the server, which had not logged
it yet when it died, as happens on a slow machine; it cannot be retried either) or after it
(*never reached*: the gateway could have sent it elsewhere; must be 0). Also timed, from
``/readyz`` polled every 20 ms: the kill until ``second`` is marked down, and the restart until
it is up again and until it receives its first request (a newcomer's).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from bench_gateway import ChunkCounter, start_gateway, start_process

from tray_app.tasks import spawn

HERE = Path(__file__).resolve()
GENERATE_MS = 100  # how long a non-streamed answer "generates", as long as a stream runs
STREAM_CHUNKS, STREAM_INTERVAL_MS = 20, 5  # a stream of about 100 ms
KILLED = "second"
# Models only the newcomers ask for: each is a conversation no upstream served yet, so it goes
# to the least busy one, where every worker's conversation stays on the upstream it started on.
NEWCOMERS = 2000  # one each 50 ms: for longer than the longest backoff


# ---- the upstream (``--upstream PORT LOG``) --------------------------------------------------


def serve_upstream(port: int, log: Path) -> None:
    from aiohttp import web
    from fast_upstream import chat

    # Written before anything else is done with a request, straight to the file: what a
    # SIGKILL cuts short is the answer, never the record that the request arrived.
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    async def logged_chat(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        os.write(fd, f"{payload.get('bench_id')} {time.time():.6f}\n".encode())
        if not payload.get("stream"):
            await asyncio.sleep(GENERATE_MS / 1000)
        return await chat(request)  # it reads the cached body again

    listed = ["bench", *(f"newcomer-{n}" for n in range(NEWCOMERS))]

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in listed]}
        )

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", logged_chat)
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
        print(f"PORT {port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def start_logged_upstream(port: int, log: Path) -> subprocess.Popen[str]:
    proc, _ = start_process(
        [sys.executable, str(HERE), "--upstream", str(port), str(log)],
        {**os.environ, "PYTHONPATH": str(HERE.parent)},
        r"PORT (\d+)",
    )
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def received(*logs: Path) -> dict[int, float]:
    """Each request id a server logged, with when it arrived (the first server's time)."""
    seen: dict[int, float] = {}
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text().splitlines():
            ident, _, at = line.partition(" ")
            if ident.isdigit():
                seen.setdefault(int(ident), float(at))
    return seen


# ---- the load ---------------------------------------------------------------------------------


@dataclass
class Result:
    ident: int
    stream: bool
    sent_at: float
    status: int = 0
    chunks: int = 0
    complete: bool = False
    failure: str = ""  # the error code, or the client-side exception

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.complete and not self.failure


def create_keys(gateway_home: Path, config: Path, count: int) -> list[str]:
    """``count`` more API keys in the store ``start_gateway`` makes in ``gateway_home``: a
    conversation stays on the upstream that served it, per caller, so one key's load would all
    go to one upstream and the other would see none of it."""
    env = {
        **os.environ,
        "LMGATE_CONFIG": str(config),
        "LMGATE_STORAGE_DATA_DIR": str(gateway_home / "data"),
        "LMGATE_SECRETS_STORE": "file",
        "LMGATE_SECRETS_FILE_DIR": str(gateway_home / "secrets"),
    }
    lmgate = str(Path(sys.executable).with_name("lmgate"))
    return [
        subprocess.run(
            [lmgate, "key", "create", f"caller-{n}"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for n in range(count)
    ]


@dataclass
class Load:
    url: str
    keys: list[str]
    results: list[Result] = field(default_factory=list)
    _next: int = 0

    async def one(
        self, session: aiohttp.ClientSession, stream: bool, key: str, model: str = "bench"
    ) -> None:
        self._next += 1
        result = Result(self._next, stream, time.time())
        self.results.append(result)
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": "Hello"}],
            "bench_id": result.ident,
            "stream": stream,
            "bench_chunks": STREAM_CHUNKS,
            "bench_interval_ms": STREAM_INTERVAL_MS,
        }
        try:
            async with session.post(
                self.url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            ) as r:
                result.status = r.status
                if not stream or r.status != 200:
                    data = await r.read()
                    result.failure = error_code(data) if r.status != 200 else ""
                    result.complete = r.status == 200 and b'"choices"' in data
                    return
                counter = ChunkCounter()
                tail = b""
                async for data in r.content.iter_any():
                    counter.feed(data)
                    tail = (tail + data)[-4096:]
                result.chunks = counter.seen - tail.count(b'data: {"error"')
                result.complete = tail.endswith(b"data: [DONE]\n\n") and b'"error"' not in tail
                if not result.complete:
                    result.failure = error_code(tail.rpartition(b"data: ")[2]) or "stream cut"
        except (aiohttp.ClientError, TimeoutError) as exc:
            result.failure = type(exc).__name__

    async def worker(self, session: aiohttp.ClientSession, done: asyncio.Event, n: int) -> None:
        turn, key = n, self.keys[n % len(self.keys)]
        while not done.is_set():
            turn += 1
            await self.one(session, turn % 2 == 0, key)

    async def newcomers(self, session: aiohttp.ClientSession, landed: Path, until: float) -> None:
        """A new conversation every 50 ms until one lands on the restarted upstream (its log
        ``landed`` has a line) or ``until`` (monotonic)."""
        for n in range(NEWCOMERS):
            if time.monotonic() >= until or received(landed):
                return
            await self.one(session, False, self.keys[0], f"newcomer-{n}")
            await asyncio.sleep(0.05)


def error_code(data: bytes) -> str:
    try:
        error = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        return "not an OpenAI error"
    if not isinstance(error, dict):
        return str(error)[:60]
    message = str(error.get("message", ""))
    # upstream_failed names the client-side failure: the mechanism the lead needs.
    detail = message.partition(": ")[2].partition(".")[0] if "failed:" in message else ""
    return f"{error.get('code')}" + (f" ({detail})" if detail else "")


async def watch_states(url: str, states: list[tuple[float, str]], stop: asyncio.Event) -> None:
    """``second``'s state each time it changes, from /readyz every 20 ms."""
    last = ""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            try:
                async with session.get(url + "/readyz") as r:
                    found = {u["name"]: u["state"] for u in (await r.json())["upstreams"]}
            except (aiohttp.ClientError, ValueError):
                found = {}
            state = found.get(KILLED, "?")
            if state != last:
                states.append((time.time(), state))
                last = state
            await asyncio.sleep(0.02)


def first_after(states: list[tuple[float, str]], state: str, since: float) -> float | None:
    return next((at - since for at, s in states if s == state and at >= since), None)


async def run(
    concurrency: int, kill_after: float, down_for: float, rejoin_within: float
) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="lmgate-bench-failover-"))
    logs = {name: home / f"{name}.log" for name in ("local", KILLED, KILLED + "-again")}
    ports = {name: free_port() for name in ("local", KILLED)}
    started: list[subprocess.Popen[str]] = []
    try:
        local = start_logged_upstream(ports["local"], logs["local"])
        started.append(local)
        victim = start_logged_upstream(ports[KILLED], logs[KILLED])
        started.append(victim)
        config = home / "lmgate.toml"
        config.write_text(f'[upstreams.{KILLED}]\nurl = "http://127.0.0.1:{ports[KILLED]}"\n')
        (home / "gw").mkdir()
        gateway, url, key = start_gateway(
            home / "gw",
            f"http://127.0.0.1:{ports['local']}",
            home / "gateway.log",
            settings={"LMGATE_CONFIG": str(config), "LMGATE_QUEUE_GENERATIONS_IN_FLIGHT": "1000"},
        )
        started.append(gateway)
        load = Load(url, [key, *create_keys(home / "gw", config, concurrency - 1)])
        states: list[tuple[float, str]] = []
        stop = asyncio.Event()
        watcher = spawn(watch_states(url, states, stop), name="readyz-watch")
        done = asyncio.Event()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            workers = asyncio.gather(*(load.worker(session, done, n) for n in range(concurrency)))
            await asyncio.sleep(kill_after)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed_at = time.time()
            await asyncio.sleep(down_for)
            started.append(start_logged_upstream(ports[KILLED], logs[KILLED + "-again"]))
            restarted_at = time.time()
            await load.newcomers(session, logs[KILLED + "-again"], time.monotonic() + rejoin_within)
            await asyncio.sleep(1)  # the load goes on a little with both upstreams back
            done.set()
            await workers
        stop.set()
        await watcher
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    return summarise(load.results, logs, states, killed_at, restarted_at)


def summarise(
    results: list[Result],
    logs: dict[str, Path],
    states: list[tuple[float, str]],
    killed_at: float,
    restarted_at: float,
) -> dict[str, Any]:
    arrived = received(*logs.values())
    failed = [r for r in results if not r.ok]
    started = [r for r in failed if r.stream and r.chunks > 0]
    not_started = [r for r in failed if not (r.stream and r.chunks > 0)]
    reached = [r for r in not_started if r.ident in arrived]
    unlogged = [r for r in not_started if r.ident not in arrived]
    in_flight = [r for r in unlogged if r.sent_at < killed_at]
    never = [r for r in unlogged if r.sent_at >= killed_at]
    again = received(logs[KILLED + "-again"])

    def by_failure(group: list[Result]) -> dict[str, int]:
        counted = collections.Counter(
            f"{'stream' if r.stream else 'plain'} {r.status} {r.failure}" for r in group
        )
        return dict(counted.most_common())

    return {
        "sent": len(results),
        "answered_200": sum(r.ok for r in results),
        "failed": len(failed),
        "failed_had_started_streaming": len(started),
        "failed_had_not_started": len(not_started),
        "failed_had_not_started_reached_a_server": len(reached),
        "failed_had_not_started_in_flight_at_kill": len(in_flight),
        "failed_had_not_started_never_reached": len(never),
        "failures_had_started": by_failure(started),
        "failures_reached_a_server": by_failure(reached),
        "failures_in_flight_at_kill": by_failure(in_flight),
        "failures_never_reached": by_failure(never),
        "failed_sent_ms_after_kill": _ms_after(failed, killed_at),
        "in_flight_sent_ms_after_kill": _ms_after(in_flight, killed_at),
        "marked_down_s": first_after(states, "down", killed_at),
        "up_again_s": first_after(states, "up", restarted_at),
        "serves_again_s": min(again.values()) - restarted_at if again else None,
        "received_by": {name: len(received(log)) for name, log in logs.items()},
        "states": [(round(at - killed_at, 3), s) for at, s in states],
    }


def _ms_after(results: list[Result], moment: float) -> list[int]:
    return sorted(round((r.sent_at - moment) * 1000) for r in results)


def report(figures: dict[str, Any]) -> str:
    rows = [
        ("requests sent", figures["sent"]),
        ("answered 200", figures["answered_200"]),
        ("failed", figures["failed"]),
        ("  had started streaming (allowed)", figures["failed_had_started_streaming"]),
        ("  had not started", figures["failed_had_not_started"]),
        ("    of which reached a server", figures["failed_had_not_started_reached_a_server"]),
        ("    of which in flight at the kill", figures["failed_had_not_started_in_flight_at_kill"]),
        (
            "    of which never reached one (must be 0)",
            figures["failed_had_not_started_never_reached"],
        ),
        ("kill -> marked down (s)", _seconds(figures["marked_down_s"])),
        ("restart -> up in /readyz (s)", _seconds(figures["up_again_s"])),
        ("restart -> its next request (s)", _seconds(figures["serves_again_s"])),
    ]
    out = ["| measure | value |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)]
    for title, key in (
        ("had started streaming", "failures_had_started"),
        ("had not started, reached a server", "failures_reached_a_server"),
        ("had not started, in flight at the kill", "failures_in_flight_at_kill"),
        ("had not started, never reached", "failures_never_reached"),
    ):
        for what, count in figures[key].items():
            out.append(f"| {title}: {what} | {count} |")
    return "\n".join(out)


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f}"


def main() -> None:
    if sys.argv[1:2] == ["--upstream"]:
        serve_upstream(int(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--kill-after", type=float, default=4.0, help="seconds of load before the kill"
    )
    parser.add_argument(
        "--down-for", type=float, default=4.0, help="seconds until the killed one is restarted"
    )
    parser.add_argument(
        "--rejoin-within",
        type=float,
        default=70.0,
        help="seconds after the restart to wait for it to serve again (the longest backoff "
        "is 60 s)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures = asyncio.run(run(args.concurrency, args.kill_after, args.down_for, args.rejoin_within))
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
