"""A soak with faults: mixed traffic from several callers through a team gateway while its
parts are killed and restarted in turn, then an exact account of what happened.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--faults upstream,tunnel,...]
                                        [--json out.json] [--keep]

Processes, all on 127.0.0.1: two fake LM Studios (this script's own ``--upstream`` mode: the
fast fake of ``fast_upstream.py`` plus the usage chunk LM Studio sends at the end of a stream
when asked for it, so that a stream's tokens are known to the client too); a throwaway
PostgreSQL and Redis (``tests/postgres_server.py``, ``tests/redis_server.py``); two ``lmgate
serve`` replicas on that shared state (``state.backend = "postgres"``, secrets from
``LMGATE_SECRET_*`` as a container gets them), each with both fake LM Studios as upstreams
(``[upstreams.second]`` in a config file); and replica 0 also public through the fake ngrok
agent (``tests/fake_ngrok/ngrok``, a "reserved" loopback URL, so the URL survives a
reconnect). No nginx: the client spreads requests over replica 0, replica 1 and the tunnel.

Traffic: three API keys with a day budget (``lmgate key create NAME --budget-day N``), two
workers each, at a moderate rate (a few requests a second per caller, not a stress test):
non-streamed chats, short streams (5 chunks, 20 ms apart, with ``stream_options.include_usage``)
and model lists. A fourth key ("probe") sends the requests that time each recovery.

Faults, in turn and evenly spaced over ``--minutes``: ``upstream`` (kill -9 of the first fake
LM Studio, started again on its port 3 s later), ``tunnel`` (kill -9 of the ngrok agent; LM
Gate must open the tunnel again by itself), ``replica`` (kill -9 of replica 1, started again on
its data directory and port 2 s later), ``redis`` (killed, as a crash, and started again on its
port 3 s later, empty), ``postgres`` (``pg_ctl stop -m fast``, started again 3 s later). For
each: when, and how long until requests on the path it broke succeed again.

Checks, after the traffic stops and the gateways have been idle for a few seconds:

- every request was answered, refused cleanly (a status with an LM Gate error code in its
  body), or failed to connect (it never started); a request cut after it started counts only
  if it was in flight on the path of a process killed at that moment (a stream on the killed
  LM Studio, a request on the killed replica or through the killed agent); a hang past the
  request timeout or anything else is a failure; a refusal outside every fault's window is too.
- usage per key, read with ``lmgate usage --since 2d --csv`` after the replicas stopped
  gracefully (their last counts flushed), against the client's own count: every request that
  got an answer after authentication is a request (refusals too: LM Gate counts every
  authenticated request; a 503 ``state_unavailable`` is refused before authentication, so it
  is not), and the tokens of every 200 are the usage the answer reported. A request cut by a
  killed process may or may not be counted (the restarted replica counts what its journal
  held, requests that were under way as requests with unknown tokens), as may the estimate
  LM Gate charges for a generation whose upstream failed under it: those widen the range
  the figure must be in, by one request and at most ``CUT_TOKEN_BOUND`` tokens each, and the
  report says by how much. So does a request answered by replica 1 in the second before it
  was killed: LM Gate writes a request's end to its journal after the answer went out, so
  the restarted replica may count it as one whose tokens are unknown (the range then reaches
  down by its tokens; the report says how many such requests there were). With none of them
  the figures must be equal.
- the day's tokens (the budget's "used today", the same query's ``tokens_today``) against the
  client's sum, in the same way. (A run across UTC midnight splits the day: not handled.)
- no leak in the surviving replica 0: its open file descriptors (``/proc/PID/fd``, by kind)
  and its TCP connections (by what they reach, and any socket in another state such as
  CLOSE_WAIT), idle after a warm-up before the faults and idle after them (waiting up to
  ``SETTLE_SECONDS`` for them to come back down). A pool that grew under the faults' bursts
  and keeps its idle connections (PostgreSQL's, Redis', the upstream session's keep-alive) is
  no leak while within its bound (``POOLS``); any other descriptor (a pipe, a file) or
  connection more than before is. Also ``/metrics``' generation slots in use, queued
  requests, budget reservations and active streams back at 0 on every replica (read with a
  key of scope ``metrics``, "monitor"). Replica 1 was restarted, so its figures are shown,
  not compared. asyncio tasks are not counted: the gateway exposes no count of them (and this
  benchmark adds no code to it). The report lists replica 0's descriptors before and after
  in the JSON, each pipe with the other processes that hold it.

A Markdown report goes to stdout; the exit status is 1 if any check failed (the logs and
data directory are then kept, and named on stderr; ``--keep`` keeps them always). Bounded: every
request has a timeout, every wait a deadline, the whole run ``--minutes`` plus a few minutes;
every process started here is stopped however the run ends. Needs root (PostgreSQL runs as its
own user) and Debian's postgresql-15 and redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
from aiohttp import web

from tray_app.tasks import spawn, wait_for_event

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the throwaway servers the tests use

from tests.postgres_server import PostgresServer, _binaries  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

LMGATE = str(Path(sys.executable).with_name("lmgate"))
FAKE_NGROK = ROOT / "tests" / "fake_ngrok" / "ngrok"
NGROK_TOKEN = "2fakeAuthToken_" + "soakRUNsoak" * 4
FAULTS = ("upstream", "tunnel", "replica", "redis", "postgres")
PRINCIPALS = ("alice", "bob", "carol")
PROBE = "probe"
MONITOR = "monitor"  # reads /metrics (scope metrics), each read in the ledger too
# Connections a bounded pool keeps once it has grown (not leaks, if within its bound):
# psycopg_pool's state.database_pool_size (8 by default; those above min_size=1 close after
# 10 idle minutes) and redis-py's BlockingConnectionPool (MAX_CONNECTIONS in
# tray_app/gateway/shared_limits.py, never closed while idle).
# LM Gate's upstream session keeps idle connections (aiohttp's keep-alive, limit=0): as many
# as were busy at once, here at most the client's concurrency (6 workers, the probe, the
# tunnel's checks).
POOLS = {
    "tcp to postgres": 8,
    "tcp to redis": 32,
    "tcp to upstream A": 8,
    "tcp to upstream B": 8,
}
BUDGET_DAY = 10**8
REQUEST_TIMEOUT = 30.0
RECOVERY_TIMEOUT = 90.0
SETTLE_SECONDS = 45.0
MAX_TOKENS = 64
STREAM_CHUNKS = 5
PROMPT_TOKENS = 12
CHAT_COMPLETION_TOKENS = 8
# The most a cut generation can be charged: its prompt and max_tokens, with room for an
# estimate of the prompt from its bytes.
CUT_TOKEN_BOUND = 4 * (PROMPT_TOKENS + MAX_TOKENS)
# Refused before the caller is known: not counted as a request of anyone's.
BEFORE_AUTHENTICATION = {
    "state_unavailable",
    "authentication_error",
    "credential_revoked",
    "too_many_auth_failures",
    "too_many_connections",
    "host_not_allowed",
    "header_timeout",
}
# A window around a fault's moment in which a request's cut is its doing.
CUT_SLACK = 1.0

# ---- the fake LM Studio (``--upstream``) ----------------------------------------------------

REPLY = json.dumps(
    {
        "id": "chatcmpl-soak",
        "object": "chat.completion",
        "created": 1,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Hello there, how can I help?"},
            }
        ],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": CHAT_COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + CHAT_COMPLETION_TOKENS,
        },
    }
).encode()
CHUNK = (
    b'data: {"id":"chatcmpl-soak","object":"chat.completion.chunk","created":1,'
    b'"model":"bench","choices":[{"index":0,"delta":{"content":"tok "},'
    b'"finish_reason":null}]}\n\n'
)


def usage_chunk(completion: int) -> bytes:
    usage = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": PROMPT_TOKENS + completion,
    }
    event = {"id": "chatcmpl-soak", "object": "chat.completion.chunk", "created": 1}
    return b"data: " + json.dumps({**event, "choices": [], "usage": usage}).encode() + b"\n\n"


async def upstream_main(port: int) -> None:
    async def chat(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        if not payload.get("stream"):
            return web.Response(body=REPLY, content_type="application/json")
        chunks = int(payload.get("bench_chunks", STREAM_CHUNKS))
        interval = float(payload.get("bench_interval_ms", 0)) / 1000
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(chunks):
            if interval and i:
                await asyncio.sleep(interval)
            await response.write(CHUNK)
        options = payload.get("stream_options") or {}
        if isinstance(options, dict) and options.get("include_usage"):
            await response.write(usage_chunk(chunks))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


# ---- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A child whose stdout is read on a thread (kept, so nothing blocks on a full pipe) and
    whose stderr goes to a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self._log = log.open("a")
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env
        )
        self.lines: list[str] = []
        self._done = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line of its output matching ``pattern``, within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if found := re.search(pattern, line):
                        return found
                left = deadline - time.monotonic()
                if left <= 0 or self._done:
                    break
                self._changed.wait(min(left, 0.5))
        raise RuntimeError(
            f"{self.name}: no {pattern!r} within {timeout:.0f} s (exit {self.popen.poll()}); "
            f"its output: {''.join(self.lines)[-1500:]}"
        )

    def kill(self) -> None:
        if self.alive:
            self.popen.kill()
        self.popen.wait(30)

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace``; the exit status."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(30)
        self._log.close()
        return self.popen.returncode


@dataclass
class Cluster:
    home: Path
    minutes: float
    postgres: PostgresServer | None = None
    redis: RedisServer | None = None
    processes: list[Process] = field(default_factory=list)
    upstream_ports: list[int] = field(default_factory=list)
    upstreams: list[Process] = field(default_factory=list)
    replica_ports: list[int] = field(default_factory=list)
    replicas: list[Process] = field(default_factory=list)
    database_url: str = ""
    master: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    public_url: str = ""
    agent_record: Path = Path()
    keys: dict[str, str] = field(default_factory=dict)

    # -- the pieces

    def start_upstream(self, index: int) -> Process:
        port = self.upstream_ports[index]
        proc = Process(
            f"upstream {index}",
            [sys.executable, str(Path(__file__).resolve()), "--upstream", str(port)],
            {**os.environ},
            self.home / f"upstream-{index}.log",
        )
        self.processes.append(proc)
        proc.wait_for(r"PORT (\d+)", 30)
        if index < len(self.upstreams):
            self.upstreams[index] = proc
        else:
            self.upstreams.append(proc)
        return proc

    def env(self, index: int | str) -> dict[str, str]:
        assert self.redis is not None
        variables = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_")}
        variables.update(
            {
                "LMGATE_CONFIG": str(self.home / "lmgate.toml"),
                "LMGATE_STORAGE_DATA_DIR": str(self.home / f"data-{index}"),
                "LMGATE_STATE_BACKEND": "postgres",
                "LMGATE_SECRETS_STORE": "env",
                "LMGATE_SECRET_STATE_DATABASE_URL": self.database_url,
                "LMGATE_SECRET_STATE_REDIS_URL": self.redis.url,
                "LMGATE_SECRET_JWT_SIGNING_KEY": self.master,
                "LMGATE_UPSTREAM_URL": f"http://127.0.0.1:{self.upstream_ports[0]}",
                "LMGATE_LOG_LEVEL": "info",
                # Limits stay on, high enough not to refuse this moderate traffic.
                "LMGATE_LIMITS_REQUESTS_PER_MINUTE": "100000",
                "LMGATE_LIMITS_CONCURRENT_REQUESTS": "1000",
                "LMGATE_QUEUE_GENERATIONS_IN_FLIGHT": "1000",
                # Every client here is one address (this machine), unlike real callers.
                "LMGATE_SERVER_MAX_CONNECTIONS_PER_CLIENT": "1000",
            }
        )
        return variables

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [LMGATE, *args], capture_output=True, text=True, timeout=60, env=self.env("cli")
        )
        if done.returncode != 0:
            raise RuntimeError(f"lmgate {' '.join(args)}: {done.stderr[-2000:]}")
        return done.stdout

    def start_replica(self, index: int) -> Process:
        env = self.env(index)
        if index == 0:
            env.update(
                {
                    "LMGATE_TUNNEL_PROVIDER": "ngrok",
                    "LMGATE_TUNNEL_NGROK_PATH": str(FAKE_NGROK),
                    "LMGATE_TUNNEL_NGROK_DOMAIN": self.public_url,
                    "LMGATE_SECRET_NGROK_AUTHTOKEN": NGROK_TOKEN,
                    "FAKE_NGROK_RECORD": str(self.agent_record),
                }
            )
        port = self.replica_ports[index]
        proc = Process(
            f"replica {index}",
            [LMGATE, "serve", "--port", str(port)],
            env,
            self.home / f"replica-{index}.log",
        )
        self.processes.append(proc)
        proc.wait_for(r"Listening on (http://\S+)", 60)
        if index == 0:
            proc.wait_for(r"Public URL:\s+(\S+)", 60)
        if index < len(self.replicas):
            self.replicas[index] = proc
        else:
            self.replicas.append(proc)
        return proc

    def url(self, path: str) -> str:
        if path == "tunnel":
            return self.public_url
        return f"http://127.0.0.1:{self.replica_ports[int(path[1:])]}"

    def agent_pids(self) -> list[int]:
        pids = []
        if self.agent_record.exists():
            for line in self.agent_record.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    pid = entry.get("pid") if isinstance(entry, dict) else None
                    if isinstance(pid, int) and "start" in line:
                        pids.append(pid)
        return pids

    def start(self) -> None:
        bin_dir = _binaries()
        redis_binary = shutil.which("redis-server")
        if bin_dir is None or redis_binary is None:
            raise SystemExit(
                "needs Debian's postgresql-15 and redis-server (tests/run.sh installs them)"
            )
        # A directory of its own under /tmp: PostgreSQL's user cannot enter the run's (0700).
        self.postgres = PostgresServer(bin_dir, Path(tempfile.mkdtemp(prefix="lmgate-soak-pg-")))
        (self.home / "redis").mkdir()
        self.redis = RedisServer(redis_binary, self.home / "redis")
        self.postgres.start()
        self.redis.start()
        self.database_url = self.postgres.new_database()
        self.upstream_ports = [free_port(), free_port()]
        for index in range(2):
            self.start_upstream(index)
        (self.home / "lmgate.toml").write_text(
            f'[upstreams.second]\nurl = "http://127.0.0.1:{self.upstream_ports[1]}"\n'
        )
        self.public_url = f"http://127.0.0.1:{free_port()}"
        self.agent_record = self.home / "agent.jsonl"
        for name in (*PRINCIPALS, PROBE, MONITOR):
            scope = ("--scope", "metrics") if name == MONITOR else ()
            made = self.cli("key", "create", name, "--budget-day", str(BUDGET_DAY), *scope)
            found = re.search(r"\blmg_[A-Za-z0-9_-]+", made)
            if not found:
                raise RuntimeError(f"no key in: {made}")
            self.keys[name] = found.group(0)
        self.replica_ports = [free_port(), free_port()]
        for index in range(2):
            self.start_replica(index)

    def close(self) -> None:
        """Every process started here, stopped (idempotent; never raises)."""
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop(20)
        for pid in self.agent_pids():  # tied to LM Gate, but make sure
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
        if self.postgres is not None:
            with contextlib.suppress(Exception):
                if not self.postgres.running:
                    self.postgres.running = True  # a fault may have left it between states
                self.postgres.stop()


# ---- the client's ledger --------------------------------------------------------------------


@dataclass
class Outcome:
    principal: str
    kind: str  # chat, stream, models
    path: str  # r0, r1, tunnel
    sent: float  # seconds since the soak began
    ended: float
    result: str  # ok, refused, connect_failed, cut, timeout, error
    status: int | None = None
    code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    detail: str = ""
    excused_by: str = ""  # the fault a cut is put down to
    # Answered by a replica killed at that moment: its record of the request may be gone
    # (the journal then counts it as a request whose tokens are unknown).
    answered_at_kill: bool = False


@dataclass
class Fault:
    name: str
    at: float  # seconds since the soak began
    down_s: float = 0.0  # how long the process was left down by this script
    recovered_s: float | None = None  # from the fault to requests succeeding again
    paths: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("chat", "stream", "models")
    detail: str = ""


def error_code(body: bytes) -> str | None:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        payload = json.loads(body)
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            return str(error["code"])
    return None


class Ledger:
    def __init__(self, cluster: Cluster, session: aiohttp.ClientSession) -> None:
        self.cluster = cluster
        self.session = session
        self.began = time.monotonic()
        self.outcomes: list[Outcome] = []

    def now(self) -> float:
        return time.monotonic() - self.began

    async def send(self, principal: str, kind: str, path: str) -> Outcome:
        url = self.cluster.url(path)
        headers = {"Authorization": f"Bearer {self.cluster.keys[principal]}"}
        outcome = Outcome(principal, kind, path, self.now(), 0.0, "error")
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await self._exchange(outcome, url, headers)
        except TimeoutError:
            outcome.result, outcome.detail = "timeout", f"no answer in {REQUEST_TIMEOUT:.0f} s"
        except aiohttp.ClientConnectorError as exc:
            outcome.result, outcome.detail = "connect_failed", type(exc).__name__
        except (aiohttp.ClientError, ConnectionError) as exc:
            outcome.result, outcome.detail = "cut", f"{type(exc).__name__}: {exc}"[:200]
        outcome.ended = self.now()
        self.outcomes.append(outcome)
        return outcome

    async def _exchange(self, outcome: Outcome, url: str, headers: dict[str, str]) -> None:
        body: dict[str, Any] = {
            "model": "bench",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": MAX_TOKENS,
        }
        if outcome.kind == "models":
            request = self.session.get(url + "/v1/models", headers=headers)
        else:
            if outcome.kind == "stream":
                body.update(
                    stream=True,
                    stream_options={"include_usage": True},
                    bench_chunks=STREAM_CHUNKS,
                    bench_interval_ms=20,
                )
            request = self.session.post(url + "/v1/chat/completions", json=body, headers=headers)
        async with request as r:
            outcome.status = r.status
            data = await r.read()
        if r.status != 200:
            outcome.code = error_code(data)
            outcome.result = "refused" if outcome.code else "error"
            outcome.detail = data[:200].decode(errors="replace")
            return
        if outcome.kind == "models":
            ok = b'"data"' in data
            outcome.result = "ok" if ok else "error"
            return
        if outcome.kind == "chat":
            usage = json.loads(data).get("usage") or {}
            outcome.prompt_tokens = int(usage.get("prompt_tokens", 0))
            outcome.completion_tokens = int(usage.get("completion_tokens", 0))
            outcome.result = "ok" if usage else "error"
            return
        chunks = data.count(b'"delta"')
        usage = None
        for line in data.split(b"\n"):
            if line.startswith(b"data: {") and b'"usage"' in line:
                with contextlib.suppress(ValueError):
                    usage = json.loads(line[6:]).get("usage") or usage
        if usage and chunks == STREAM_CHUNKS and data.rstrip().endswith(b"data: [DONE]"):
            outcome.prompt_tokens = int(usage.get("prompt_tokens", 0))
            outcome.completion_tokens = int(usage.get("completion_tokens", 0))
            outcome.result = "ok"
        else:
            # Begun (200, some chunks) and not finished: what a killed process leaves.
            outcome.result = "cut"
            outcome.code = error_code(data.split(b"data: ")[-1].split(b"\n")[0])
            outcome.detail = f"stream of {chunks} chunks, usage {'seen' if usage else 'missing'}"


async def worker(ledger: Ledger, principal: str, seed: int, stop: asyncio.Event) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        kind = rng.choices(("chat", "stream", "models"), (5, 3, 2))[0]
        path = rng.choices(("r0", "r1", "tunnel"), (2, 2, 1))[0]
        await ledger.send(principal, kind, path)
        await wait_for_event(stop, rng.uniform(0.15, 0.45))


# ---- faults ---------------------------------------------------------------------------------


async def succeeds(ledger: Ledger, paths: tuple[str, ...]) -> bool:
    results = [await ledger.send(PROBE, "chat", path) for path in paths]
    return all(r.result == "ok" for r in results)


async def upstream_up(session: aiohttp.ClientSession, cluster: Cluster) -> bool:
    for index in range(len(cluster.replicas)):
        try:
            async with asyncio.timeout(5):
                async with session.get(cluster.url(f"r{index}") + "/readyz") as r:
                    states = {u["name"]: u["state"] for u in (await r.json())["upstreams"]}
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            return False
        if states.get("local") != "up":
            return False
    return True


async def recover(ledger: Ledger, fault: Fault, check: Callable[[], Any], began: float) -> None:
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while time.monotonic() < deadline:
        if await check():
            fault.recovered_s = time.monotonic() - began
            return
        await asyncio.sleep(0.2)
    fault.detail += f" not recovered within {RECOVERY_TIMEOUT:.0f} s"


async def run_fault(name: str, ledger: Ledger, cluster: Cluster) -> Fault:
    loop_began = time.monotonic()
    fault = Fault(name, ledger.now())
    if name == "upstream":
        # Streams on it and requests sent to it at that moment: cut or failed over.
        fault.paths, fault.kinds = ("r0", "r1", "tunnel"), ("chat", "stream")
        cluster.upstreams[0].kill()
        await asyncio.sleep(3)
        fault.down_s = time.monotonic() - loop_began
        await asyncio.to_thread(cluster.start_upstream, 0)

        async def back() -> bool:
            return await upstream_up(ledger.session, cluster) and await succeeds(
                ledger, ("r0", "r1")
            )

        await recover(ledger, fault, back, loop_began)
    elif name == "tunnel":
        fault.paths = ("tunnel",)
        pids = cluster.agent_pids()
        if not pids:
            fault.detail = "no agent pid recorded"
            return fault
        os.kill(pids[-1], signal.SIGKILL)
        fault.detail = f"agent pid {pids[-1]} killed"

        async def back() -> bool:
            return len(cluster.agent_pids()) > len(pids) and await succeeds(ledger, ("tunnel",))

        await recover(ledger, fault, back, loop_began)
        fault.down_s = fault.recovered_s or 0.0
    elif name == "replica":
        fault.paths = ("r1",)
        cluster.replicas[1].kill()
        await asyncio.sleep(2)
        fault.down_s = time.monotonic() - loop_began
        await asyncio.to_thread(cluster.start_replica, 1)
        await recover(ledger, fault, lambda: succeeds(ledger, ("r1",)), loop_began)
    elif name == "redis":
        assert cluster.redis is not None
        await asyncio.to_thread(cluster.redis.stop)
        await asyncio.sleep(3)
        fault.down_s = time.monotonic() - loop_began
        await asyncio.to_thread(cluster.redis.start)
        await recover(ledger, fault, lambda: succeeds(ledger, ("r0", "r1")), loop_began)
    elif name == "postgres":
        assert cluster.postgres is not None
        await asyncio.to_thread(cluster.postgres.stop)
        await asyncio.sleep(3)
        fault.down_s = time.monotonic() - loop_began
        await asyncio.to_thread(cluster.postgres.start)
        await recover(ledger, fault, lambda: succeeds(ledger, ("r0", "r1")), loop_began)
    else:
        raise SystemExit(f"no such fault: {name}")
    return fault


# ---- leaks ----------------------------------------------------------------------------------


def _socket_table() -> dict[str, tuple[str, int, int]]:
    """Socket inode -> (TCP state, local port, remote port), IPv4 and IPv6."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                table[inode] = (
                    state,
                    int(local.rsplit(":", 1)[1], 16),
                    int(remote.rsplit(":", 1)[1], 16),
                )
    return table


TCP_STATES = {"02": "SYN_SENT", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
              "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING", "04": "FIN_WAIT1",
              "05": "FIN_WAIT2"}  # fmt: skip


def pipe_holders(target: str) -> set[int]:
    """The processes with a descriptor on the pipe ``target`` (``pipe:[inode]``)."""
    holders = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for entry in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if str(entry.readlink()) == target:
                        holders.add(int(fd_dir.parent.name))
                        break
    return holders


STALE = {"08", "09", "07"}  # CLOSE_WAIT, LAST_ACK, CLOSE: the peer closed first


def socket_list(pid: int) -> list[str]:
    """Each socket descriptor of ``pid``: its TCP state and ports, for the report's details."""
    sockets = _socket_table()
    found = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(entry.readlink())
            if target.startswith("socket:["):
                state, local, remote = sockets.get(target[8:-1], ("", 0, 0))
                label = "ESTABLISHED" if state == "01" else TCP_STATES.get(state, "other")
                found.append(f"fd {entry.name}: {label} {local} -> {remote}")
            elif target.startswith("pipe:"):
                others = pipe_holders(target) - {pid}
                where = f"also held by {sorted(others)}" if others else "no other process holds it"
                found.append(f"fd {entry.name}: {target} ({where})")
            elif not target.startswith("/"):
                found.append(f"fd {entry.name}: {target}")
    return sorted(found)


def resources(pid: int, cluster: Cluster) -> dict[str, int]:
    """Open descriptors and established TCP connections of ``pid``, by what they reach."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = []
    count = 0
    kinds: dict[str, int] = {}
    for entry in fd_dir.iterdir():
        count += 1
        with contextlib.suppress(OSError):
            target = str(entry.readlink())
            if target.startswith("socket:["):
                inodes.append(target[8:-1])
            kind = target.split(":", 1)[0] if ":" in target else "file"
            kinds[kind] = kinds.get(kind, 0) + 1
    sockets = _socket_table()
    names = {cluster.upstream_ports[0]: "upstream A", cluster.upstream_ports[1]: "upstream B"}
    if cluster.postgres is not None:
        names[cluster.postgres.port] = "postgres"
    if cluster.redis is not None:
        names[cluster.redis.port] = "redis"
    figures = {"fds": count, "tcp_established": 0}
    figures.update({f"fds: {kind}": n for kind, n in kinds.items()})
    for inode in inodes:
        state, _local, remote = sockets.get(inode, ("", 0, 0))
        where = f"tcp to {names.get(remote, 'clients and others')}"
        if state != "01" and not (where in POOLS and state in STALE):
            label = TCP_STATES.get(state, "non-TCP socket") if state else "non-TCP socket"
            figures[f"sockets: {label}"] = figures.get(f"sockets: {label}", 0) + 1
            continue
        # A pool's member whose server went away (CLOSE_WAIT) is still one of the pool's,
        # dropped when next taken: counted in the pool, and shown.
        if state == "01":
            figures["tcp_established"] += 1
        else:
            stale = f"info: {where} closed by the server"
            figures[stale] = figures.get(stale, 0) + 1
        figures[where] = figures.get(where, 0) + 1
    return figures


METRIC_GAUGES = (
    "lmgate_generations_in_flight",
    "lmgate_queue_waiting",
    "lmgate_budget_reserved_tokens",
    "lmgate_active_streams",
)


async def gauges(ledger: Ledger, path: str) -> dict[str, float] | str:
    outcome = Outcome(MONITOR, "metrics", path, ledger.now(), 0.0, "error")
    ledger.outcomes.append(outcome)
    headers = {"Authorization": f"Bearer {ledger.cluster.keys[MONITOR]}"}
    try:
        async with asyncio.timeout(10):
            async with ledger.session.get(
                ledger.cluster.url(path) + "/metrics", headers=headers
            ) as r:
                outcome.status = r.status
                text = await r.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome.result = "cut"
        return f"/metrics: {type(exc).__name__}"
    finally:
        outcome.ended = ledger.now()
    if r.status != 200:
        outcome.code = error_code(text.encode())
        outcome.result = "refused" if outcome.code else "error"
        return f"/metrics answered {r.status}"
    outcome.result = "ok"
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        base = name.split("{", 1)[0]
        if base in METRIC_GAUGES:
            found[name] = found.get(name, 0.0) + float(value)
    return found


# ---- the run --------------------------------------------------------------------------------


def usage_rows(cluster: Cluster) -> dict[str, dict[str, str]]:
    text = cluster.cli("usage", "--since", "2d", "--csv")
    rows = csv.DictReader(io.StringIO(text))
    return {row["name"]: row for row in rows}


def excuse_cuts(outcomes: list[Outcome], faults: list[Fault]) -> None:
    """A cut is the doing of a fault whose moment its request spanned, on that fault's path."""
    for outcome in outcomes:
        if outcome.result != "cut":
            continue
        for fault in faults:
            if outcome.path not in fault.paths or outcome.kind not in fault.kinds:
                continue
            if outcome.sent <= fault.at + CUT_SLACK and outcome.ended >= fault.at - CUT_SLACK:
                outcome.excused_by = fault.name
                break


def mark_answered_at_kill(outcomes: list[Outcome], faults: list[Fault]) -> None:
    for fault in faults:
        if fault.name != "replica":
            continue
        for o in outcomes:
            if o.result == "ok" and o.path in fault.paths:
                o.answered_at_kill = fault.at - CUT_SLACK <= o.ended <= fault.at + 0.1


def in_fault_window(at: float, faults: list[Fault]) -> str:
    for fault in faults:
        end = fault.at + (fault.recovered_s or RECOVERY_TIMEOUT) + 2 * CUT_SLACK
        if fault.at - CUT_SLACK <= at <= end:
            return fault.name
    return ""


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def account(
    outcomes: list[Outcome], rows: dict[str, dict[str, str]]
) -> tuple[list[dict[str, Any]], list[Check]]:
    table: list[dict[str, Any]] = []
    checks: list[Check] = []
    for principal in (*PRINCIPALS, PROBE, MONITOR):
        mine = [o for o in outcomes if o.principal == principal]
        answered = [o for o in mine if o.status is not None and o.result != "cut"]
        counted = [o for o in answered if o.code not in BEFORE_AUTHENTICATION]
        # Cut, hung, or a generation refused by a failing upstream: may be counted, by one
        # request, and charged up to CUT_TOKEN_BOUND.
        open_requests = [o for o in mine if o.result in {"cut", "timeout", "error"}]
        open_tokens = [
            o
            for o in mine
            if o.kind != "models"
            and (
                o.result in {"cut", "timeout", "error"}
                or (o.result == "refused" and (o.code or "").startswith("upstream_"))
            )
        ]
        prompt = sum(o.prompt_tokens for o in mine if o.result == "ok")
        completion = sum(o.completion_tokens for o in mine if o.result == "ok")
        at_kill = [o for o in mine if o.answered_at_kill]
        at_kill_tokens = sum(o.prompt_tokens + o.completion_tokens for o in at_kill)
        row = rows.get(principal, {})
        db_requests = int(row.get("requests", 0) or 0)
        db_prompt = int(row.get("prompt_tokens", 0) or 0)
        db_completion = int(row.get("completion_tokens", 0) or 0)
        db_today = int(row.get("tokens_today", 0) or 0)
        low_req, high_req = len(counted), len(counted) + len(open_requests)
        low_tok = prompt + completion - at_kill_tokens
        high_tok = prompt + completion + CUT_TOKEN_BOUND * len(open_tokens)
        entry = {
            "principal": principal,
            "sent": len(mine),
            "client_requests": [low_req, high_req],
            "db_requests": db_requests,
            "client_prompt_tokens": prompt,
            "client_completion_tokens": completion,
            "db_prompt_tokens": db_prompt,
            "db_completion_tokens": db_completion,
            "client_tokens": [low_tok, high_tok],
            "db_tokens_today": db_today,
            "uncertain_requests": len(open_requests),
            "uncertain_generations": len(open_tokens),
            "answered_at_replica_kill": len(at_kill),
            "answered_at_replica_kill_tokens": at_kill_tokens,
        }
        table.append(entry)

        certain = prompt + completion

        def within(value: int, low: int, high: int, exact: int) -> str:
            if low == high:
                return "exact" if value == low else f"{value - low:+d} against the client"
            if value == exact:
                return f"exact (range [{low}, {high}])"
            if low <= value <= high:
                return f"{value - exact:+d} against the client, within [{low}, {high}]"
            return f"{value - exact:+d} against the client, outside [{low}, {high}]"

        req = within(db_requests, low_req, high_req, low_req)
        tok = within(db_prompt + db_completion, low_tok, high_tok, certain)
        today = within(db_today, low_tok, high_tok, certain)
        if at_kill:
            tok += (
                f" ({len(at_kill)} answered as replica 1 was killed, {at_kill_tokens} tokens "
                "LM Gate may not know)"
            )
        checks.append(
            Check(
                f"usage of {principal}",
                low_req <= db_requests <= high_req
                and low_tok <= db_prompt + db_completion <= high_tok,
                f"requests {db_requests}: {req}; tokens {db_prompt + db_completion}: {tok}",
            )
        )
        checks.append(
            Check(
                f"budget of {principal} (tokens used today)",
                low_tok <= db_today <= high_tok,
                f"{db_today:,} of {BUDGET_DAY:,}: {today}",
            )
        )
    return table, checks


async def soak(args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    duration = args.minutes * 60
    faults_wanted = [f for f in args.faults.split(",") if f]
    for name in faults_wanted:
        if name not in FAULTS:
            raise SystemExit(f"no such fault {name!r}: choose from {','.join(FAULTS)}")
    await asyncio.to_thread(cluster.start)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        ledger = Ledger(cluster, session)
        # Warm-up: every path, every kind, then idle: the "before" of the leak counts.
        for path in ("r0", "r1", "tunnel"):
            for kind in ("chat", "stream", "models"):
                for principal in PRINCIPALS:
                    await ledger.send(principal, kind, path)
        await asyncio.sleep(3)
        survivor = cluster.replicas[0]
        before = resources(survivor.pid, cluster)
        sockets_before = socket_list(survivor.pid)
        stop = asyncio.Event()
        soak_began = ledger.now()
        workers = [
            spawn(worker(ledger, p, 1000 * i + j, stop))
            for i, p in enumerate(PRINCIPALS)
            for j in range(2)
        ]
        faults: list[Fault] = []
        try:
            spacing = duration / (len(faults_wanted) + 1)
            for i, name in enumerate(faults_wanted):
                wait = soak_began + spacing * (i + 1) - ledger.now()
                if wait > 0:
                    await asyncio.sleep(wait)
                print(f"[{ledger.now():7.1f} s] fault: {name}", file=sys.stderr, flush=True)
                faults.append(await run_fault(name, ledger, cluster))
            rest = soak_began + duration - ledger.now()
            await asyncio.sleep(max(rest, 3.0))
        finally:
            stop.set()
            await asyncio.wait(workers, timeout=REQUEST_TIMEOUT + 5)
        soak_s = ledger.now() - soak_began
        # Idle: everything given back, connections closed, then counted again.
        deadline = time.monotonic() + SETTLE_SECONDS
        await asyncio.sleep(3)
        after = resources(survivor.pid, cluster)
        while time.monotonic() < deadline and any(leaked(before, after).values()):
            await asyncio.sleep(1)
            after = resources(survivor.pid, cluster)
        restarted = resources(cluster.replicas[1].pid, cluster)
        sockets_after = socket_list(survivor.pid)
        metric = {
            f"replica {i}": await gauges(ledger, f"r{i}") for i in range(len(cluster.replicas))
        }
        alive = {p.name: p.alive for p in (*cluster.replicas, *cluster.upstreams)}
    # Stopped gracefully: their last counts written, then read from the database.
    stop_status = {p.name: p.stop(30) for p in cluster.replicas}
    rows = await asyncio.to_thread(usage_rows, cluster)
    outcomes = ledger.outcomes
    excuse_cuts(outcomes, faults)
    mark_answered_at_kill(outcomes, faults)
    table, checks = account(outcomes, rows)
    kinds = {"ok", "refused", "connect_failed", "cut", "timeout", "error"}
    kinds |= {o.result for o in outcomes}
    results = {r: sum(1 for o in outcomes if o.result == r) for r in sorted(kinds)}
    unexcused = [o for o in outcomes if o.result == "cut" and not o.excused_by]
    bad = [o for o in outcomes if o.result in {"timeout", "error"}]
    refused_calm = [
        o for o in outcomes if o.result == "refused" and not in_fault_window(o.sent, faults)
    ]
    checks[:0] = [
        Check(
            "every fault recovered",
            len(faults) == len(faults_wanted) and all(f.recovered_s is not None for f in faults),
            ", ".join(
                f"{f.name} {f.recovered_s:.1f} s"
                if f.recovered_s is not None
                else f"{f.name} NOT ({f.detail})"
                for f in faults
            )
            or "no faults",
        ),
        Check(
            "no request lost that had not started",
            not unexcused and not bad,
            f"{len(unexcused)} cut outside a fault on their path, {len(bad)} hung or "
            f"unclean; {sum(1 for o in outcomes if o.excused_by)} cut by a fault on their "
            "path (started, allowed)",
        ),
        Check(
            "no refusal outside a fault",
            not refused_calm,
            f"{len(refused_calm)} refused outside every fault's window",
        ),
        Check(
            "every process ran to the end",
            all(alive.values()) and all(s == 0 for s in stop_status.values()),
            f"alive before the stop: {alive}; replicas' exit status: {stop_status}",
        ),
    ]
    checks += leak_checks(before, after)
    for name, found in metric.items():
        clean = isinstance(found, dict) and bool(found) and not any(found.values())
        checks.append(Check(f"nothing held after idle ({name}, /metrics)", clean, str(found)))
    for o in (*unexcused, *bad)[:20]:
        print(f"failure: {asdict(o)}", file=sys.stderr)
    for o in refused_calm[:10]:
        print(f"refused outside a fault: {asdict(o)}", file=sys.stderr)
    return {
        "minutes": args.minutes,
        "soak_seconds": soak_s,
        "requests": len(outcomes),
        "results": results,
        "codes": _codes(outcomes),
        "faults": [asdict(f) for f in faults],
        "usage": table,
        "resources": {
            "replica 0 before": before,
            "replica 0 after": after,
            "replica 1 (restarted) after": restarted,
        },
        "metrics_after": metric,
        "replica 0 descriptors before": sockets_before,
        "replica 0 descriptors after": sockets_after,
        "not_ok": [asdict(o) for o in outcomes if o.result != "ok" or o.answered_at_kill][:2000],
        "tasks": "not counted: the gateway exposes no count of its asyncio tasks",
        "checks": [asdict(c) for c in checks],
        "passed": all(c.passed for c in checks),
        "home": str(cluster.home),
    }


def pooled_growth(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(max(0, after.get(k, 0) - min(before.get(k, 0), POOLS[k])) for k in POOLS)


def leaked(before: dict[str, int], after: dict[str, int]) -> dict[str, list[str]]:
    """What grew beyond what a bounded pool explains: descriptors that are no connection,
    and connections (or sockets in another state)."""
    grown: dict[str, list[str]] = {"descriptors": [], "connections": []}
    pooled = pooled_growth(before, after)
    for key in sorted(set(before) | set(after)):
        was, now = before.get(key, 0), after.get(key, 0)
        if key.startswith("info: "):
            continue
        if key in POOLS:
            if now > max(was, POOLS[key]):
                grown["connections"].append(f"{key} {was} -> {now} (more than its pool)")
        elif key.startswith(("tcp to ", "sockets: ")):
            if now > was:
                grown["connections"].append(f"{key} {was} -> {now}")
        elif key in {"tcp_established", "fds", "fds: socket"}:
            if now - pooled > was:
                where = "connections" if key == "tcp_established" else "descriptors"
                grown[where].append(f"{key} {was} -> {now} ({pooled} of them pooled)")
        elif now > was:
            grown["descriptors"].append(f"{key} {was} -> {now}")
    return grown


def leak_checks(before: dict[str, int], after: dict[str, int]) -> list[Check]:
    grown = leaked(before, after)
    pooled = {k: (before.get(k, 0), after.get(k, 0)) for k in POOLS if k in before or k in after}
    words = ", ".join(f"{k} {b} -> {a} (at most {POOLS[k]})" for k, (b, a) in pooled.items())
    return [
        Check(
            "no leaked file descriptor (replica 0, idle before and after)",
            not grown["descriptors"],
            f"fds {before['fds']} -> {after['fds']}"
            + (f"; grown: {'; '.join(grown['descriptors'])}" if grown["descriptors"] else ""),
        ),
        Check(
            "no leaked connection (replica 0, idle before and after)",
            not grown["connections"],
            f"TCP {before['tcp_established']} -> {after['tcp_established']}; in pools: {words}"
            + "".join(
                f"; {n} {k.removeprefix('info: ')}, still in its pool"
                for k, n in after.items()
                if k.startswith("info: ")
            )
            + (f"; grown: {'; '.join(grown['connections'])}" if grown["connections"] else ""),
        ),
    ]


def _codes(outcomes: list[Outcome]) -> dict[str, int]:
    found: dict[str, int] = {}
    for o in outcomes:
        if o.result in {"refused", "cut", "error", "timeout", "connect_failed"}:
            label = f"{o.result} {o.status or ''} {o.code or o.detail[:40]}".strip()
            label = f"{label} ({o.excused_by})" if o.excused_by else label
            found[label] = found.get(label, 0) + 1
    return dict(sorted(found.items()))


def report(figures: dict[str, Any], out: IO[str]) -> None:
    w = out.write
    w(f"# Soak with faults: {figures['minutes']:g} minutes\n\n")
    w(f"{figures['requests']:,} requests over {figures['soak_seconds']:.0f} s; ")
    w(", ".join(f"{k} {v:,}" for k, v in figures["results"].items()) + "\n\n")
    w("## Faults\n\n| fault | at (s) | down (s) | requests succeed again after (s) | note |\n")
    w("|---|---:|---:|---:|---|\n")
    for f in figures["faults"]:
        back = "never" if f["recovered_s"] is None else f"{f['recovered_s']:.1f}"
        w(f"| {f['name']} | {f['at']:.1f} | {f['down_s']:.1f} | {back} | {f['detail']} |\n")
    w("\n## Outcomes other than 200\n\n| outcome | count |\n|---|---:|\n")
    for label, count in figures["codes"].items():
        w(f"| {label} | {count} |\n")
    w("\n## Usage: client against database\n\n")
    w("| key | sent | requests (client) | requests (db) | tokens (client) | tokens (db) "
      "| used today (db) |\n|---|---:|---:|---:|---:|---:|---:|\n")  # fmt: skip
    for u in figures["usage"]:
        low, high = u["client_requests"]
        req = f"{low}" if low == high else f"{low}..{high}"
        low, high = u["client_tokens"]
        tok = f"{low}" if low == high else f"{low}..{high}"
        db_tok = u["db_prompt_tokens"] + u["db_completion_tokens"]
        w(f"| {u['principal']} | {u['sent']} | {req} | {u['db_requests']} | {tok} | {db_tok} "
          f"| {u['db_tokens_today']} |\n")  # fmt: skip
    w("\n## Resources (idle, before and after)\n\n")
    res = figures["resources"]
    keys = sorted({k for v in res.values() for k in v})
    w("| | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys) + "\n")
    for name, values in res.items():
        w(f"| {name} | " + " | ".join(str(values.get(k, 0)) for k in keys) + " |\n")
    w(f"\nasyncio tasks: {figures['tasks']}.\n\n## Checks\n\n")
    for c in figures["checks"]:
        w(f"- {'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}\n")
    w(f"\n{'All checks passed.' if figures['passed'] else 'Some checks FAILED.'}\n")


@contextlib.contextmanager
def stopped_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run as Ctrl-C does, so the cleanup runs."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the soak runs")
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"which, in order (of {','.join(FAULTS)})"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data directory")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # the fake LM Studio
    args = parser.parse_args()
    if args.upstream is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(upstream_main(args.upstream))
        return
    home = Path(tempfile.mkdtemp(prefix="lmgate-soak-"))
    cluster = Cluster(home, args.minutes)
    figures: dict[str, Any] | None = None
    with stopped_on_signals():
        try:
            bound = args.minutes * 60 + 600  # setup, faults' recoveries, settle, stop

            async def bounded() -> dict[str, Any]:
                async with asyncio.timeout(bound):
                    return await soak(args, cluster)

            figures = asyncio.run(bounded())
        finally:
            cluster.close()
            pg_dir = cluster.postgres._dir if cluster.postgres is not None else None
            if pg_dir is not None and not args.keep:
                shutil.rmtree(pg_dir, ignore_errors=True)
            if not args.keep and figures is not None and figures["passed"]:
                shutil.rmtree(home, ignore_errors=True)
    assert figures is not None
    if not figures["passed"] or args.keep:
        print(f"logs and data: {home}", file=sys.stderr)
    report(figures, sys.stdout)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    sys.exit(0 if figures["passed"] else 1)


if __name__ == "__main__":
    main()
