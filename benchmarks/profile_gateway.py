"""Where ``lmgate serve`` spends its CPU under the benchmark's load, sampled with py-spy.

    .venv/bin/python benchmarks/profile_gateway.py [--seconds 20] [--wrk] [--report out.md]

Runs the fast fake LM Studio and ``lmgate serve`` (everything on, as in bench_gateway.py)
under ``py-spy record``, drives non-streamed chats and paced streams through it, then
sorts every on-CPU sample into the layer it was taken in: LM Gate's own code, aiohttp's
server, aiohttp's client, logging, socket writes (the send system call) and the rest of
the event loop. Prints a Markdown report: the layers, then the heaviest functions.
With ``--wrk`` the load is instead ``throughput.py``'s: ``wrk`` keeping 16 chats in flight, with
the limits and the queue as wide as there (what costs CPU per request under load).
Needs py-spy (in the ``test`` extra). Loopback only; bounded by ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from bench_gateway import Side, chat_latency, start_gateway, start_upstream, stream
from throughput import SETTINGS as WRK_SETTINGS

SOCKET_WRITES = "socket writes (send system call)"  # any sample with this frame in it
SEND_FRAME = "_SelectorSocketTransport.write"
# (layer, test on a frame's "function (file:line)" text), first match wins, innermost first.
LAYERS = (
    ("sqlite3 (usage flushes)", lambda f: "sqlite3" in f or "tray_app/storage" in f),
    ("LM Gate (tray_app)", lambda f: "tray_app/" in f),
    ("logging", lambda f: "logging/" in f),
    ("aiohttp client", lambda f: "aiohttp/client" in f or "aiohttp/connector" in f),
    ("aiohttp server and HTTP writer", lambda f: "aiohttp/" in f),
    ("prometheus-client", lambda f: "prometheus_client/" in f),
)
LOOP_ROOTS = ("BaseEventLoop._run_once", "BaseEventLoop.run_forever")
IDLE = ("EpollSelector.select", "select (selectors", "_worker (concurrent/futures")


@dataclass
class Profile:
    samples: int = 0
    layers: collections.Counter[str] = field(default_factory=collections.Counter)
    own: collections.Counter[str] = field(default_factory=collections.Counter)
    inclusive: collections.Counter[str] = field(default_factory=collections.Counter)


def layer_of(frames: list[str]) -> str:
    """The layer a sample belongs to: decided by its innermost frame that any layer claims,
    except that a send() anywhere below counts as a socket write."""
    if any(f.startswith(SEND_FRAME) for f in frames):
        return SOCKET_WRITES
    for frame in reversed(frames):
        if frame.startswith(LOOP_ROOTS):
            break  # below the loop's own frames: the loop itself was working
        for name, claims in LAYERS:
            if claims(frame):
                return name
    return "event loop and other"


def function_name(frame: str) -> str:
    """``f (path/to/dir/file.py:12)`` -> ``f (dir/file.py)``: lines of one function count
    together. LM Gate's own frames keep their path from ``tray_app/`` (its subpackages name
    the layer); other frames keep their last two parts."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    _, ours, inside = path.rpartition("tray_app/")
    short = ours + inside if ours else "/".join(path.split("/")[-2:])
    return f"{name} ({short})"


def summarise(raw_lines: Iterable[str]) -> Profile:
    profile = Profile()
    for line in raw_lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f]
        if not frames or any(frames[-1].startswith(idle) for idle in IDLE):
            continue  # waiting, not working
        if any("importlib" in f for f in frames):
            continue  # start-up
        n = int(count)
        profile.samples += n
        profile.layers[layer_of(frames)] += n
        profile.own[function_name(frames[-1])] += n
        for name in {function_name(f) for f in frames}:
            profile.inclusive[name] += n
    return profile


def report(profile: Profile, seconds: float, load: str, top: int, flags: str = "") -> str:
    total = max(profile.samples, 1)
    out = [
        "# Where `lmgate serve` spends its CPU",
        "",
        f"Made by `.venv/bin/python benchmarks/profile_gateway.py --seconds {seconds:g}{flags}`: "
        f"py-spy, 1000 samples/s for {seconds:.0f} s of load: {load}; "
        f"{profile.samples} on-CPU samples.",
        "",
        "| layer | share of on-CPU samples |",
        "|---|---:|",
    ]
    out += [f"| {name} | {n / total:.1%} |" for name, n in profile.layers.most_common()]
    out += ["", "| heaviest functions (self) | share |", "|---|---:|"]
    out += [f"| `{name}` | {n / total:.1%} |" for name, n in profile.own.most_common(top)]
    ours = [
        (name, n)
        for name, n in profile.inclusive.most_common()
        if "(tray_app/" in name
        and not name.endswith("(tray_app/cli/main.py)")  # cli: the loop's root
    ]
    out += ["", "| LM Gate functions (including what they call) | share |", "|---|---:|"]
    out += [f"| `{name}` | {n / total:.1%} |" for name, n in ours[:top]]
    return "\n".join(out)


async def drive(url: str, key: str, seconds: float) -> tuple[int, int]:
    side = Side("gateway", url, {"Authorization": f"Bearer {key}"})
    requests = streams = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            await chat_latency(session, side, 200, 1)
            requests += 200
            await stream(session, side, 50, 2, "paced", 10)
            streams += 10
    return requests, streams


def drive_wrk(url: str, key: str, seconds: float, home: Path) -> str:
    from throughput import Side as WrkSide
    from throughput import lua_script, wrk

    side = WrkSide("gateway", url, {"Authorization": f"Bearer {key}"})
    rate = wrk(side, "/v1/chat/completions", seconds, 16, lua_script(home))
    if isinstance(rate, str):
        raise SystemExit(f"the load failed: {rate}")
    return f"wrk with 16 connections, non-streamed chats, {rate:,.0f} requests/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=15, help="functions listed per table")
    parser.add_argument("--report", type=Path, help="also write the report here")
    parser.add_argument("--wrk", action="store_true", help="load with wrk (throughput.py's)")
    args = parser.parse_args()
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        raise SystemExit("py-spy is not installed: pip install -e '.[test]'")
    home = Path(tempfile.mkdtemp(prefix="lmgate-profile-"))
    raw = home / "py-spy.txt"
    upstream, upstream_url = start_upstream()
    wrapper = [str(py_spy), "record", "--rate", "1000", "--nonblocking", "--format", "raw"]
    settings = WRK_SETTINGS if args.wrk else None
    gateway, url, key = start_gateway(
        home, upstream_url, home / "gateway.log", [*wrapper, "--output", str(raw), "--"], settings
    )
    try:
        if args.wrk:
            load = drive_wrk(url, key, args.seconds, home)
        else:
            requests, streams = asyncio.run(drive(url, key, args.seconds))
            load = (
                f"{requests} non-streamed chats and {streams} paced streams (50 chunks, 2 ms apart)"
            )
    finally:
        gateway.send_signal(signal.SIGINT)  # py-spy writes its file when its child ends
        gateway.wait(60)
        upstream.terminate()
        upstream.wait(10)
    if not raw.exists():
        raise SystemExit(f"py-spy wrote no profile; see {home / 'gateway.log'}")
    with raw.open() as lines:
        text = report(summarise(lines), args.seconds, load, args.top, " --wrk" * args.wrk)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
