"""Load: many concurrent paced streams through the real `lmgate serve`, with slow-loris clients.

    .venv/bin/python benchmarks/load.py [--streams 1000] [--seconds 60] [--loris 200] [--idle 100]

Each stream asks the fast fake LM Studio for chunks 100 ms apart for the whole run. Meanwhile
slow-loris clients trickle request headers one byte a second, idle clients open a connection and
send nothing, and a normal client asks for /healthz ten times a second. Reported: streams
completed, errors, the gateway's peak RSS (VmHWM), the largest gap between chunks seen by any
stream, the normal client's latencies, and how long the gateway let lorises and idle connections
stay (its header timeout must cut them; it must not cut a stream). Every protection stays on at
its default, except what one test machine cannot look like: all clients come from one address
(``server.max_connections_per_client``), and the fake LM Studio runs every stream at once
(``queue.generations_in_flight``, ``limits.concurrent_requests``). Issue 21's targets: 0 errors,
largest gap within 2x the pacing, peak RSS under 150 MB, /healthz p99 under 50 ms.
Bounded: the run ends after --seconds plus a short drain.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from bench_gateway import ChunkCounter, start_gateway, start_upstream

from tray_app.garbage import settle_after_start


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def stream(
    session: aiohttp.ClientSession, url: str, key: str, chunks: int, gaps: list[float]
) -> bool:
    body = {
        "model": "bench",
        "stream": True,
        "messages": [],
        "bench_chunks": chunks,
        "bench_interval_ms": 100,
    }
    counter = ChunkCounter()
    last = None
    async with session.post(
        url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        if r.status != 200:
            return False
        async for data in r.content.iter_any():
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
            counter.feed(data)
    return counter.seen == chunks


async def loris(host: str, port: int, seconds: float, held: list[float]) -> None:
    opened = time.monotonic()
    _reader, writer = await asyncio.open_connection(host, port)
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    deadline = time.monotonic() + seconds
    try:
        for byte in request:
            if time.monotonic() > deadline:
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1.0)
    except (ConnectionError, OSError):
        pass
    finally:
        held.append(time.monotonic() - opened)
        writer.close()


async def idle(host: str, port: int, seconds: float, held: list[float]) -> None:
    """A connection that sends nothing: how long the gateway keeps it."""
    opened = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(seconds):
            await reader.read()  # returns at EOF: the gateway closed it
    except (TimeoutError, ConnectionError, OSError):
        pass
    finally:
        held.append(time.monotonic() - opened)
        writer.close()


async def normal_client(
    session: aiohttp.ClientSession, url: str, seconds: float, latencies: list[float]
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        async with session.get(url + "/healthz") as r:
            await r.read()
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.1)


async def run(streams: int, seconds: float, lorises: int, idles: int) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="lmgate-load-"))
    upstream, upstream_url = start_upstream()
    settings = {
        "LMGATE_LOG_LEVEL": "warning",
        "LMGATE_LIMITS_CONCURRENT_REQUESTS": str(streams + 10),
        "LMGATE_LIMITS_REQUESTS_PER_MINUTE": "100000",
        "LMGATE_QUEUE_GENERATIONS_IN_FLIGHT": str(streams + 10),
        # Every client here is one address (this machine), unlike real callers.
        "LMGATE_SERVER_MAX_CONNECTIONS_PER_CLIENT": str(streams + lorises + idles + 10),
    }
    gateway, url, key = start_gateway(home, upstream_url, home / "gateway.log", settings=settings)
    print(f"gateway log: {home / 'gateway.log'}", file=sys.stderr)
    host, gport = url.removeprefix("http://").rsplit(":", 1)
    gaps: list[float] = []
    latencies: list[float] = []
    loris_held: list[float] = []
    idle_held: list[float] = []
    chunks = int(seconds * 10)
    # This client is the instrument: its own full collections (it tracks every stream's
    # objects too) would show as the gateway's gaps.
    settle_after_start()
    try:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            tasks = [stream(session, url, key, chunks, gaps) for _ in range(streams)]
            others = [loris(host, int(gport), seconds, loris_held) for _ in range(lorises)]
            others += [idle(host, int(gport), seconds, idle_held) for _ in range(idles)]
            others.append(normal_client(session, url, seconds, latencies))
            results = await asyncio.gather(*tasks, *others, return_exceptions=True)
        rss = peak_rss_mb(gateway.pid)
    finally:
        gateway.terminate()
        upstream.terminate()
        gateway.wait(30)
        upstream.wait(10)
    outcomes = results[:streams]
    ok = sum(1 for r in outcomes if r is True)
    failures = sorted({repr(r)[:120] for r in results if isinstance(r, BaseException)})
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    latencies.sort()
    return {
        "streams": streams,
        "completed": ok,
        "errors": streams - ok,
        "chunks_per_stream": chunks,
        "peak_rss_mb": rss,
        "max_gap_ms": max(gaps) * 1000 if gaps else float("nan"),
        "healthz_p50_ms": statistics.median(latencies) * 1000,
        "healthz_p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "healthz_max_ms": max(latencies) * 1000,
        "lorises": lorises,
        "loris_held_max_s": max(loris_held, default=float("nan")),
        "idle": idles,
        "idle_held_max_s": max(idle_held, default=float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--loris", type=int, default=200)
    parser.add_argument("--idle", type=int, default=100, help="connections that send nothing")
    args = parser.parse_args()
    figures = asyncio.run(run(args.streams, args.seconds, args.loris, args.idle))
    for name, value in figures.items():
        print(f"{name:20} {value:,.1f}" if isinstance(value, float) else f"{name:20} {value}")


if __name__ == "__main__":
    main()
