"""What the sharing gate (budget, fair queue, model guard) costs one request, side by side.

    .venv/bin/python benchmarks/gate_cost.py [--requests 20000] [--rounds 5] [--json out.json]

The end-to-end benchmark (bench_gateway.py --baseline) compares two gateway processes, and on
a small shared machine two processes running the same code differ by about 0.1 ms p50 from
run to run (run it with ``--baseline HEAD`` to see): too coarse for a 0.05 ms budget. This
measures the gate itself, in one process, on the event loop, with the parts the gateway
builds (a BudgetLedger over a real SQLite database, the FairQueue, the ModelGuard over an
in-memory model API, the UsageRecorder), for a chat request as the benchmark sends it:

- ``no gate``: only the usage recorder, which every request ran before the gate existed;
- ``unbudgeted``: a caller with no budget (queue and guard only);
- ``budgeted``: a caller with a day budget far from its edge (reservation and settlement too);
- ``budgeted, no length``: the same, for a request that names no max_tokens (the default cap
  is worked out from what is left).

Each request: ``admit`` (budget), ``wait_turn`` (guard, then queue), ``release``, ``settle`` and
the recorder's ``record``; timed with ``perf_counter_ns`` around the whole step. Rounds
alternate the sides, and each side's figure is the median of its rounds' medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from tray_app.clock import SystemClock
from tray_app.config.settings import ModelSwitch
from tray_app.gateway.accounting import UsageRecorder
from tray_app.gateway.body_rules import prepare_body
from tray_app.gateway.budgets import BudgetLedger
from tray_app.gateway.fair_queue import FairQueue
from tray_app.gateway.routes import FORWARDED_ROUTES
from tray_app.gateway.sharing import Sharing
from tray_app.gateway.upstream.model_api import ModelStates
from tray_app.gateway.upstream.model_guard import ModelGuard
from tray_app.gateway.upstream.usage import Usage
from tray_app.identity.principal import Budget, Principal
from tray_app.storage.database import Database
from tray_app.storage.usage_history import UsageHistory

MODEL = "qwen2.5-7b-instruct"
QUESTION = [{"role": "user", "content": "Say hello in five words."}]


class LoadedModelApi:
    """LM Studio's model API with one model loaded, answered from memory."""

    async def loaded(self) -> ModelStates | None:
        return ModelStates(frozenset({MODEL}), frozenset({MODEL}))

    async def load(self, model: str, timeout: float) -> None:
        raise AssertionError("the benchmark's model is loaded")


async def measure(
    sharing: Sharing | None, recorder: UsageRecorder, principal: Principal, raw: bytes, n: int
) -> float:
    """The median microseconds of one request's way through the gate (``sharing`` None: only
    the recorder, what every request did before the gate)."""
    route = next(r for r in FORWARDED_ROUTES if r.path == "/v1/chat/completions")
    prepared = prepare_body(route, raw)
    times: list[int] = []
    used = Usage(12, 20)
    for _ in range(n):
        started = time.perf_counter_ns()
        if sharing is None:
            recorder.record(principal.name, used)
            times.append(time.perf_counter_ns() - started)
            continue
        generation = await sharing.admit(principal, "203.0.113.9", route, prepared)
        await generation.wait_turn(None)
        generation.release()
        counted = generation.settle(used, 100, reached=True)
        recorder.record(principal.name, counted)
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times) / 1000


async def run(requests: int, rounds: int) -> dict[str, float]:
    clock = SystemClock()
    with tempfile.TemporaryDirectory() as home:
        db = Database(Path(home) / "lmgate.db")
        recorder = UsageRecorder(db, clock)
        ledger = BudgetLedger(UsageHistory(db), clock, pending=recorder.pending_tokens)
        queue = FairQueue(slots=4, per_caller=8, max_waiting=512, max_waiting_per_client=32)
        guard = ModelGuard(LoadedModelApi(), policy=ModelSwitch.WAIT, load_timeout=300, clock=clock)
        sharing = Sharing(queue, guard=guard, ledger=ledger, max_wait=60, max_stream_wait=600)
        with_length = json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 64}).encode()
        no_length = json.dumps({"model": MODEL, "messages": QUESTION}).encode()
        budget = Budget(tokens_per_day=10**9)
        sides: dict[str, tuple[Sharing | None, Principal, bytes]] = {
            "no gate (the recorder only, as before it)": (
                None,
                Principal("key:before", frozenset({"chat"})),
                with_length,
            ),
            "unbudgeted": (sharing, Principal("key:free", frozenset({"chat"})), with_length),
            "budgeted": (
                sharing,
                Principal("key:paid", frozenset({"chat"}), budget=budget),
                with_length,
            ),
            "budgeted, no length": (
                sharing,
                Principal("key:paid2", frozenset({"chat"}), budget=budget),
                no_length,
            ),
        }
        figures: dict[str, list[float]] = {name: [] for name in sides}
        for gate, principal, raw in sides.values():  # warm-up: accounts loaded, caches filled
            await measure(gate, recorder, principal, raw, 1000)
        for round_ in range(rounds):
            order = list(sides.items())
            if round_ % 2:
                order.reverse()
            for name, (gate, principal, raw) in order:
                figures[name].append(await measure(gate, recorder, principal, raw, requests))
            recorder.flush()
        await guard.close()
        db.close()
    return {name: statistics.median(values) for name, values in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per side and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = asyncio.run(run(args.requests, args.rounds))
    before = next(iter(results.values()))
    print("| caller | per request (p50) | added by the gate |")
    print("|---|---:|---:|")
    for name, micros in results.items():
        print(f"| {name} | {micros:.1f} µs | {micros - before:+.1f} µs |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
