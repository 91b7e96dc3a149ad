"""How evenly the fair queue shares a busy upstream among many callers.

    .venv/bin/python benchmarks/fairness.py [--seconds 60] [--callers 200] [--json out.json]

One process: a fake LM Studio (an aiohttp server on loopback whose every answer takes
``--answer-ms``) and a FairQueue with ``--slots`` slots in front of it, as the gateway uses it:
``try_acquire``, else ``acquire``; then the request over a real socket; then ``release``. The
callers (distinct principal names) each keep ``--depth`` requests queued all the time, asking
again as soon as an answer ends. Two runs of ``--seconds`` each:

- even: every caller keeps the same number queued;
- heavy: one caller keeps ``--heavy-depth`` queued, every other one 1.

Reported per run: answers served, each caller's count (min / median / max; every count in the
JSON), the max/min share ratio (target at most 1.2), the heavy caller's count against the
median of the others (it must not get more than its round-robin share), and the wait for a
turn (p50 / p99). Also the fast path's cost: ``try_acquire`` + ``release`` on an idle queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tray_app.gateway.fair_queue import FairQueue
from tray_app.tasks import spawn

HEAVY = "caller-000"


@dataclass
class Run:
    name: str
    served: dict[str, int]
    waits: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        counts = sorted(self.served.values())
        others = [n for caller, n in self.served.items() if caller != HEAVY]
        waits = sorted(self.waits)
        return {
            "variant": self.name,
            "callers": len(counts),
            "served": sum(counts),
            "min": counts[0],
            "median": statistics.median(counts),
            "max": counts[-1],
            "share_ratio": counts[-1] / counts[0] if counts[0] else float("inf"),
            "heavy_vs_median": self.served[HEAVY] / statistics.median(others),
            "wait_p50_ms": _percentile(waits, 0.50) * 1000,
            "wait_p99_ms": _percentile(waits, 0.99) * 1000,
            "per_caller": dict(self.served),
        }


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _fake_upstream(answer_s: float) -> tuple[web.AppRunner, str]:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(answer_s)
        return web.json_response({"choices": [{"message": {"content": "ok"}}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"


async def _run(name: str, depths: dict[str, int], args: argparse.Namespace, url: str) -> Run:
    queue = FairQueue(
        slots=args.slots,
        per_caller=args.per_caller,
        max_waiting=sum(depths.values()),
        max_waiting_per_client=max(depths.values()),
    )
    run = Run(name, dict.fromkeys(depths, 0))
    deadline = time.monotonic() + args.seconds
    connector = aiohttp.TCPConnector(limit=args.slots)  # never more than the slots at once
    async with aiohttp.ClientSession(connector=connector) as session:

        async def keep_asking(caller: str, client: str) -> None:
            while time.monotonic() < deadline:
                asked = time.monotonic()
                turn = queue.try_acquire(caller) or await queue.acquire(
                    caller, client, max_wait=3600
                )
                waited = time.monotonic() - asked
                try:
                    async with session.post(url, json={"caller": caller}) as response:
                        await response.read()
                finally:
                    queue.release(turn)
                if time.monotonic() < deadline:  # an answer after the end is not counted
                    run.served[caller] += 1
                    run.waits.append(waited)

        workers = [
            spawn(keep_asking(caller, f"10.0.{n // 256}.{n % 256}"))  # an address each
            for n, (caller, depth) in enumerate(depths.items())
            for _ in range(depth)
        ]
        await asyncio.sleep(args.seconds)
        for worker in workers:
            worker.cancel()  # those still waiting leave the queue
        await asyncio.gather(*workers, return_exceptions=True)
    return run


def fast_path_us(rounds: int = 200_000) -> float:
    """try_acquire + release on an idle queue, in µs: what every generation request pays."""
    queue = FairQueue(slots=4, per_caller=4, max_waiting=512, max_waiting_per_client=32)
    started = time.perf_counter()
    for _ in range(rounds):
        turn = queue.try_acquire("caller")
        assert turn is not None
        queue.release(turn)
    return (time.perf_counter() - started) / rounds * 1e6


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    runner, url = await _fake_upstream(args.answer_ms / 1000)
    try:
        names = [f"caller-{n:03d}" for n in range(args.callers)]
        even = await _run("even", dict.fromkeys(names, args.depth), args, url)
        heavy_depths = dict.fromkeys(names, 1)
        heavy_depths[HEAVY] = args.heavy_depth
        heavy = await _run("heavy", heavy_depths, args, url)
    finally:
        await runner.cleanup()
    return {
        "settings": {
            "seconds": args.seconds,
            "callers": args.callers,
            "slots": args.slots,
            "per_caller": args.per_caller,
            "answer_ms": args.answer_ms,
            "depth": args.depth,
            "heavy_depth": args.heavy_depth,
            "upstream": "aiohttp server on loopback, same process",
        },
        "runs": [even.summary(), heavy.summary()],
        "fast_path_us": fast_path_us(),
    }


def table(results: dict[str, Any]) -> str:
    rows = [
        "| variant | callers | served | per caller min / median / max | max/min share "
        "| heavy / median | wait p50 ms | wait p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        rows.append(
            f"| {run['variant']} | {run['callers']} | {run['served']} "
            f"| {run['min']} / {run['median']:g} / {run['max']} | {run['share_ratio']:.2f} "
            f"| {run['heavy_vs_median']:.2f} | {run['wait_p50_ms']:.0f} "
            f"| {run['wait_p99_ms']:.0f} |"
        )
    s = results["settings"]
    rows.append("")
    rows.append(
        f"{s['slots']} slots, answers of {s['answer_ms']:g} ms, {s['seconds']:g} s a run; "
        f"heavy: one caller keeps {s['heavy_depth']} queued. "
        f"Fast path (try_acquire + release): {results['fast_path_us']:.2f} µs."
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each run")
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--per-caller", type=int, default=4, help="limits.concurrent_requests")
    parser.add_argument("--answer-ms", type=float, default=20.0)
    parser.add_argument("--depth", type=int, default=1, help="requests each caller keeps queued")
    parser.add_argument("--heavy-depth", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = asyncio.run(measure(args))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
