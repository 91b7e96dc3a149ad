"""Gateway overhead against a direct connection to the same fake LM Studio, in one run.

    .venv/bin/python benchmarks/bench_gateway.py [--rounds 5] [--json out.json]

Three processes on loopback: a fast fake LM Studio, the real ``lmgate serve`` with everything
on (API key authentication, rate and concurrency limits, metrics, usage accounting, JSON access
logging), and this client. Direct and gateway runs alternate (A B A B ...)
and every figure is the median over rounds, so drift on a busy machine hits both sides alike.
Reported: non-streamed chat latency p50/p99 at concurrency 1 and 16 and req/s; a 2000-chunk
stream's time to first byte and chunks/s; a paced stream (50 chunks, 2 ms apart): time to
first token and the largest gap between chunks. Bounded: about a minute with the defaults.
With ``--floors`` the same run also measures two reference proxies (``floors.py``): what a bare
aiohttp proxy and a plain TCP relay add, so LM Gate's own cost can be told from the shape's.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
CHAT = {"model": "bench", "messages": [{"role": "user", "content": "Hello"}]}


@dataclass
class Side:
    name: str
    url: str
    headers: dict[str, str]
    figures: dict[str, list[float]] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.figures.setdefault(metric, []).append(value)

    def median(self, metric: str) -> float:
        return statistics.median(self.figures[metric])


class ChunkCounter:
    """Counts the content chunks in an SSE body read in pieces of any size."""

    MARKER = b"data: {"  # starts every content chunk

    def __init__(self) -> None:
        self.seen = 0
        self._carry = b""  # a marker may be split between two reads

    def feed(self, data: bytes) -> int:
        """How many chunks start in ``data``."""
        window = self._carry + data
        count = window.count(self.MARKER)
        self._carry = window[-(len(self.MARKER) - 1) :]
        self.seen += count
        return count


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def chat_latency(
    session: aiohttp.ClientSession, side: Side, requests: int, concurrency: int
) -> None:
    latencies: list[float] = []
    per_worker = requests // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            start = time.perf_counter()
            async with session.post(
                side.url + "/v1/chat/completions", json=CHAT, headers=side.headers
            ) as r:
                body = await r.read()
                assert r.status == 200, (r.status, body[:300])
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    side.add(f"c{concurrency}_p50_ms", percentile(latencies, 0.5) * 1000)
    side.add(f"c{concurrency}_p99_ms", percentile(latencies, 0.99) * 1000)
    side.add(f"c{concurrency}_rps", len(latencies) / elapsed)


async def stream(
    session: aiohttp.ClientSession,
    side: Side,
    chunks: int,
    interval_ms: float,
    prefix: str,
    repeats: int,
) -> None:
    """``repeats`` streams; records the median of each figure over them."""
    body = {**CHAT, "stream": True, "bench_chunks": chunks, "bench_interval_ms": interval_ms}
    ttft: list[float] = []
    rate: list[float] = []
    max_gap: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        arrivals: list[float] = []
        counter = ChunkCounter()
        async with session.post(
            side.url + "/v1/chat/completions", json=body, headers=side.headers
        ) as r:
            assert r.status == 200, r.status
            async for data in r.content.iter_any():
                now = time.perf_counter()
                if counter.feed(data):
                    arrivals.append(now)
        assert counter.seen == chunks, (counter.seen, chunks)
        ttft.append((arrivals[0] - start) * 1000)
        rate.append(chunks / (arrivals[-1] - start))
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        max_gap.append(max(gaps) * 1000 if gaps else 0.0)
    side.add(f"{prefix}_ttft_ms", statistics.median(ttft))
    side.add(f"{prefix}_chunks_per_s", statistics.median(rate))
    side.add(f"{prefix}_max_gap_ms", statistics.median(max_gap))


def start_process(
    args: list[str], env: dict[str, str], pattern: str, log: Path | None = None
) -> tuple[subprocess.Popen[str], str]:
    stderr = log.open("w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(pattern, line)
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"could not start {args[0]}: {pattern!r} never appeared")


def start_upstream() -> tuple[subprocess.Popen[str], str]:
    """The fast fake LM Studio, and its URL."""
    proc, port = start_process(
        [sys.executable, str(HERE / "fast_upstream.py")], {**os.environ}, r"PORT (\d+)"
    )
    return proc, f"http://127.0.0.1:{port}"


def gateway_environment(
    home: Path, upstream_url: str, settings: Mapping[str, str] | None = None
) -> dict[str, str]:
    """What ``lmgate serve`` is started with here: everything on, ``settings`` over it."""
    return {
        **os.environ,
        "LMGATE_UPSTREAM_URL": upstream_url,
        "LMGATE_CONFIG": str(home / "none.toml"),
        "LMGATE_STORAGE_DATA_DIR": str(home / "data"),
        "LMGATE_SECRETS_STORE": "file",
        "LMGATE_SECRETS_FILE_DIR": str(home / "secrets"),
        "LMGATE_LOG_LEVEL": "info",
        # Limits stay on (their code runs for every request) but high enough not to refuse.
        "LMGATE_LIMITS_REQUESTS_PER_MINUTE": "100000000",
        "LMGATE_LIMITS_CONCURRENT_REQUESTS": "1000",
        **(settings or {}),
    }


def start_gateway(
    home: Path,
    upstream_url: str,
    log: Path | None,
    wrapper: Sequence[str] = (),
    settings: Mapping[str, str] | None = None,
    *,
    source: Path | None = None,
    key_options: Sequence[str] = (),
    ungated: bool = False,
) -> tuple[subprocess.Popen[str], str, str]:
    """``lmgate serve`` with everything on, its URL and an API key for it. ``wrapper`` goes in
    front of the command (a profiler); ``settings`` are extra LMGATE_* variables; ``source`` a
    checkout of another version to run instead (``--baseline``); ``key_options`` go to
    ``lmgate key create`` (a budget); ``ungated`` serves without the sharing gate
    (``ungated.py``)."""
    lmgate: list[str] = [str(Path(sys.executable).with_name("lmgate"))]
    if source is not None:
        lmgate = [sys.executable, "-m", "tray_app"]
    if ungated:
        lmgate = [sys.executable, str(HERE / "ungated.py")]
    gateway_env = gateway_environment(home, upstream_url, settings)
    if source is not None:
        gateway_env["PYTHONPATH"] = str(source)
    made = subprocess.run(
        [*lmgate, "key", "create", "bench", *key_options],
        env=gateway_env,
        capture_output=True,
        text=True,
        check=True,
    )
    gateway, url = start_process(
        [*wrapper, *lmgate, "serve", "--port", "0"],
        gateway_env,
        r"Listening on (http://\S+)",
        log,
    )
    return gateway, url, made.stdout.strip()


def checkout(ref: str, into: Path) -> Path:
    """The package as it was at ``ref`` (a commit, a tag), to run side by side with this one."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        # resources/ too: the package reads the phone page from it as it starts.
        ["git", "-C", str(HERE.parent), "archive", ref, "tray_app", "resources"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


async def run(
    rounds: int,
    requests: int,
    floors: bool,
    baseline: str | None = None,
    control: bool = False,
    ungated: bool = False,
) -> dict[str, dict[str, float]]:
    env = {**os.environ}
    home = Path(tempfile.mkdtemp(prefix="lmgate-bench-"))
    log = home / "gateway.log"
    # Every process started is stopped however the run ends: a gateway that fails to start
    # (a bad --baseline, a key it refuses) must not leave the upstream running.
    started: list[subprocess.Popen[str]] = []
    try:
        upstream, upstream_url = start_upstream()
        started.append(upstream)
        sides = await _start_sides(
            home, log, upstream_url, env, floors, baseline, control, ungated, started
        )
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            for side in sides:  # warm-up: connections and caches
                await chat_latency(session, side, 100, 4)
                side.figures.clear()
            tests: list[Callable[[Side], Awaitable[None]]] = [
                lambda s: chat_latency(session, s, requests, 1),
                lambda s: chat_latency(session, s, requests * 2, 16),
                lambda s: stream(session, s, 2000, 0, "s2000", 5),
                lambda s: stream(session, s, 50, 2, "paced", 10),
            ]
            for round_ in range(rounds):
                # Each round starts at the next side: the side measured right after another
                # ran measurably slower (0.1 ms p50 for the same code), so every side takes
                # every place in turn and no difference comes from the order.
                shift = round_ % len(sides)
                order = sides[shift:] + sides[:shift]
                for test in tests:
                    for side in order:
                        await test(side)
    finally:
        for proc in reversed(started):
            proc.terminate()
            proc.wait(30)
    lines = log.read_text().count('"lmgate.access"')
    print(f"(gateway wrote {lines} access log lines)", file=sys.stderr)
    return {side.name: {m: side.median(m) for m in side.figures} for side in sides}


async def _start_sides(
    home: Path,
    log: Path,
    upstream_url: str,
    env: dict[str, str],
    floors: bool,
    baseline: str | None,
    control: bool,
    ungated: bool,
    started: list[subprocess.Popen[str]],
) -> list[Side]:
    """The gateway (and the baseline and floors asked for) in front of ``upstream_url``;
    each process is added to ``started`` as soon as it runs."""
    # The key has a token budget (far from its edge): its reservation and settlement run on
    # every request, as the fair queue and the model guard do.
    # The queue stays on (every generation takes a slot) but wide enough never to wait:
    # this measures its cost, not LM Studio's parallelism.
    settings = {"LMGATE_QUEUE_GENERATIONS_IN_FLIGHT": "1000"}
    key_options = ("--budget-day", str(10**9))
    gateway, gateway_url, key = start_gateway(
        home, upstream_url, log, settings=settings, key_options=key_options
    )
    started.append(gateway)
    sides = [
        Side("direct", upstream_url, {}),
        Side("gateway", gateway_url, {"Authorization": f"Bearer {key}"}),
    ]

    def another(name: str, **options: Any) -> None:
        """One more gateway side, in a home of its own, started as the first one was."""
        side_home = home / name
        side_home.mkdir()
        proc, url, side_key = start_gateway(
            side_home, upstream_url, side_home / "gateway.log", **options
        )
        started.append(proc)
        sides.append(Side(name, url, {"Authorization": f"Bearer {side_key}"}))

    if control:
        # The same version once more, in a process of its own: how far two runs of the same
        # code differ here, the noise any difference to --baseline must stand out from.
        another("control", settings=settings, key_options=key_options)
    if ungated:
        # This version without the budget, the fair queue and the model guard, with the
        # same settings and a key with the same budget (never looked at).
        another("ungated", settings=settings, key_options=key_options, ungated=True)
    if baseline is not None:
        another("baseline", source=checkout(baseline, home / "src"))
    if floors:
        for kind in FLOORS:
            proc, url = start_process(
                [sys.executable, str(HERE / "floors.py"), kind, upstream_url],
                env,
                r"Listening on (http://\S+)",
            )
            started.append(proc)
            sides.append(Side(kind, url, {}))
    return sides


ROWS = [
    ("c1_p50_ms", "chat latency p50, concurrency 1 (ms)", "lower"),
    ("c1_p99_ms", "chat latency p99, concurrency 1 (ms)", "lower"),
    ("c16_p50_ms", "chat latency p50, concurrency 16 (ms)", "lower"),
    ("c16_p99_ms", "chat latency p99, concurrency 16 (ms)", "lower"),
    ("c1_rps", "requests/s, concurrency 1", "higher"),
    ("c16_rps", "requests/s, concurrency 16", "higher"),
    ("s2000_ttft_ms", "2000-chunk stream: time to first chunk (ms)", "lower"),
    ("s2000_chunks_per_s", "2000-chunk stream: chunks/s", "higher"),
    ("paced_ttft_ms", "paced stream (50 x 2 ms): time to first token (ms)", "lower"),
    ("paced_max_gap_ms", "paced stream: largest gap between chunks (ms, median)", "lower"),
]


FLOORS = ("bare-aiohttp", "tcp-relay")
FLOOR_ROWS = (
    "c1_p50_ms",
    "c16_p50_ms",
    "paced_ttft_ms",
    "paced_max_gap_ms",
    "s2000_ttft_ms",
    "s2000_chunks_per_s",
)


def floors_table(results: dict[str, dict[str, float]]) -> str:
    """What LM Gate adds next to what a bare aiohttp proxy and a byte relay add."""
    labels = dict((key, label) for key, label, _ in ROWS)
    names = ["gateway", *FLOORS]
    out = [
        "| measure (added over direct) | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key in FLOOR_ROWS:
        d = results["direct"][key]
        if key.endswith("_ms"):
            cells = [f"{results[n][key] - d:+.2f} ms" for n in names]
        else:
            cells = [f"{results[n][key] / d:.2f}x" for n in names]
        out.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def baseline_table(results: dict[str, dict[str, float]], ref: str, side: str = "baseline") -> str:
    """This version against ``ref`` in the same run: what the new checks cost per request
    (``side`` "control": against itself in another process, the run's noise)."""
    labels = dict((key, label) for key, label, _ in ROWS)
    out = [
        f"| measure | {ref} | this version | difference |",
        "|---|---:|---:|---:|",
    ]
    for key in ("c1_p50_ms", "c1_p99_ms", "c16_p50_ms", "paced_ttft_ms"):
        b, g = results[side][key], results["gateway"][key]
        out.append(f"| {labels[key]} | {b:,.3f} | {g:,.3f} | {g - b:+.3f} ms |")
    return "\n".join(out)


def table(results: dict[str, dict[str, float]]) -> str:
    out = [
        "| measure | direct | through LM Gate | gateway / direct | added |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label, _better in ROWS:
        d, g = results["direct"][key], results["gateway"][key]
        added = f"{g - d:+.2f} ms" if key.endswith("_ms") else ""
        out.append(f"| {label} | {d:,.2f} | {g:,.2f} | {g / d:.2f}x | {added} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--requests",
        type=int,
        default=400,
        help="requests per latency measurement at concurrency 1",
    )
    parser.add_argument(
        "--floors",
        action="store_true",
        help="also measure a bare aiohttp proxy and a TCP byte relay (benchmarks/floors.py)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run LM Gate as it was at this git commit, side by side (e.g. the commit "
        "before a change, to measure what it costs)",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run this version a second time, in its own process: the table against it "
        "shows how much two runs of the same code differ (the noise of the difference)",
    )
    parser.add_argument(
        "--ungated",
        action="store_true",
        help="also run this version without the sharing gate (budget, fair queue, model "
        "guard; benchmarks/ungated.py): the table against it is what the gate costs a request "
        "through the whole gateway",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = asyncio.run(
        run(args.rounds, args.requests, args.floors, args.baseline, args.control, args.ungated)
    )
    print(table(results))
    if args.floors:
        print()
        print(floors_table(results))
    if args.baseline:
        print()
        print(baseline_table(results, args.baseline))
    if args.control:
        print()
        print(baseline_table(results, "control (this version again)", side="control"))
    if args.ungated:
        print()
        print(baseline_table(results, "without the gate", side="ungated"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
