"""Load: many concurrent paced streams through the real `lmgate serve`, with slow-loris clients.

    .venv/bin/python benchmarks/load.py [--streams 200] [--seconds 60] [--loris 50]

Each stream asks the fast fake LM Studio for chunks 100 ms apart for the whole run. Meanwhile
slow-loris clients trickle request headers one byte a second, and a normal client asks for
/healthz twice a second. Reported: streams completed, errors, the gateway's peak RSS (VmHWM),
the largest gap between chunks seen by any stream, and the normal client's latencies.
Bounded: the run ends after --seconds plus a short drain.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from bench_gateway import ChunkCounter, start_gateway, start_upstream


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


async def loris(host: str, port: int, seconds: float) -> None:
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
        await asyncio.sleep(0.5)


async def run(streams: int, seconds: float, lorises: int) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="lmgate-load-"))
    upstream, upstream_url = start_upstream()
    settings = {
        "LMGATE_LOG_LEVEL": "warning",
        "LMGATE_LIMITS_CONCURRENT_REQUESTS": str(streams + 10),
        "LMGATE_LIMITS_REQUESTS_PER_MINUTE": "100000",
        # Every client here is one address (this machine), unlike real callers.
        "LMGATE_SERVER_MAX_CONNECTIONS_PER_CLIENT": str(streams + lorises + 10),
    }
    gateway, url, key = start_gateway(home, upstream_url, None, settings=settings)
    host, gport = url.removeprefix("http://").rsplit(":", 1)
    gaps: list[float] = []
    latencies: list[float] = []
    chunks = int(seconds * 10)
    try:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            tasks = [stream(session, url, key, chunks, gaps) for _ in range(streams)]
            others = [loris(host, int(gport), seconds) for _ in range(lorises)]
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
    return {
        "streams": streams,
        "completed": ok,
        "errors": streams - ok,
        "chunks_per_stream": chunks,
        "peak_rss_mb": rss,
        "max_gap_ms": max(gaps) * 1000 if gaps else float("nan"),
        "healthz_p50_ms": statistics.median(latencies) * 1000,
        "healthz_max_ms": max(latencies) * 1000,
        "lorises": lorises,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--loris", type=int, default=50)
    args = parser.parse_args()
    figures = asyncio.run(run(args.streams, args.seconds, args.loris))
    for name, value in figures.items():
        print(f"{name:20} {value:,.1f}" if isinstance(value, float) else f"{name:20} {value}")


if __name__ == "__main__":
    main()
