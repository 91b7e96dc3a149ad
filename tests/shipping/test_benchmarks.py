"""The benchmark, load and profile scripts still run and report what they claim (short runs;
their figures are not checked here: performance claims come from full runs, not tests)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"


def _script(name: str, *args: str, timeout: float) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCHMARKS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _module(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other as siblings
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_chunk_counter_counts_markers_cut_anywhere() -> None:
    counter_type = _module("bench_gateway").ChunkCounter
    body = b"".join(b'data: {"n":%d}\n\n' % i for i in range(5)) + b"data: [DONE]\n\n"
    for size in range(1, 12):
        counter = counter_type()
        for start in range(0, len(body), size):
            counter.feed(body[start : start + size])
        assert counter.seen == 5, size


def test_profile_summary_sorts_samples_into_layers() -> None:
    profile = _module("profile_gateway")
    lines = [
        "main (tray_app/cli/main.py:1);BaseEventLoop._run_once (asyncio/base_events.py:1);"
        "EpollSelector.select (selectors.py:468) 50",  # idle: not counted
        "main (tray_app/cli/main.py:1);BaseEventLoop._run_once (asyncio/base_events.py:1);"
        "Gateway._handle (tray_app/gateway/app.py:9);"
        "normalise_path (tray_app/gateway/routes.py:3) 3",
        "main (tray_app/cli/main.py:1);Gateway._handle (tray_app/gateway/app.py:9);"
        "StreamWriter.write (aiohttp/http_writer.py:5);"
        "_SelectorSocketTransport.write (asyncio/selector_events.py:1) 4",
        "main (tray_app/cli/main.py:1);BaseEventLoop._run_once (asyncio/base_events.py:1);"
        "Handle._run (asyncio/events.py:80) 2",
        "Forwarder._open (tray_app/gateway/upstream/forwarding.py:1);"
        "ClientSession._request (aiohttp/client.py:2) 1",
        "_worker (concurrent/futures/thread.py:1);"
        "UsageRecorder.flush (tray_app/gateway/accounting.py:5);"
        "Database.add_usage (tray_app/storage/database.py:9) 2",
    ]
    summary = profile.summarise(lines)
    assert summary.samples == 12
    assert summary.layers == {
        "sqlite3 (usage flushes)": 2,  # LM Gate's storage module, but the database's time
        "LM Gate (tray_app)": 3,
        "socket writes (send system call)": 4,
        "event loop and other": 2,  # the loop's own work is not LM Gate's, though cli.py is root
        "aiohttp client": 1,
    }
    assert summary.inclusive["Gateway._handle (tray_app/gateway/app.py)"] == 7


@pytest.mark.slow
def test_benchmark_measures_every_side_and_figure(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    text = _script(
        "bench_gateway.py",
        "--rounds",
        "1",
        "--requests",
        "32",
        "--floors",
        "--control",
        "--ungated",
        "--json",
        str(out),
        timeout=240,
    )
    figures = json.loads(out.read_text())
    assert set(figures) == {"direct", "gateway", "control", "ungated", "bare-aiohttp", "tcp-relay"}
    assert "| measure | control (this version again) | this version | difference |" in text
    assert "| measure | without the gate | this version | difference |" in text
    metrics = {key for key, _label, _better in _module("bench_gateway").ROWS}
    for side, values in figures.items():
        assert metrics <= set(values), side
        assert all(value > 0 for value in values.values()), side
    assert "| paced stream (50 x 2 ms): time to first token (ms) |" in text


def test_the_ungated_side_serves_what_the_gate_refuses(tmp_path: Path) -> None:
    # The --ungated side's claim: the same gateway, minus the budget (and the queue and the
    # model guard). A key whose day budget cannot hold the request is refused 429 by the
    # gateway and served by the ungated one; everything else (the key, the body) is checked.
    import aiohttp

    bench = _module("bench_gateway")
    started: list[subprocess.Popen[str]] = []
    try:
        upstream, upstream_url = bench.start_upstream()
        started.append(upstream)
        answers: dict[bool, tuple[int, int]] = {}
        for ungated in (False, True):
            home = tmp_path / str(ungated)
            home.mkdir()
            gateway, url, key = bench.start_gateway(
                home, upstream_url, None, key_options=("--budget-day", "20"), ungated=ungated
            )
            started.append(gateway)

            async def ask(url: str = url, key: str = key) -> tuple[int, int]:
                async with aiohttp.ClientSession() as session:
                    statuses = []
                    for token in (key, key + "x"):
                        async with session.post(
                            url + "/v1/chat/completions",
                            json={**bench.CHAT, "max_tokens": 1000},
                            headers={"Authorization": f"Bearer {token}"},
                        ) as r:
                            statuses.append(r.status)
                    return statuses[0], statuses[1]

            answers[ungated] = asyncio.run(ask())
        assert answers == {False: (429, 401), True: (200, 401)}
    finally:
        for proc in reversed(started):
            proc.terminate()
            proc.wait(30)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.mark.slow
def test_load_script_completes_every_stream() -> None:
    text = _script("load.py", "--streams", "10", "--seconds", "3", "--loris", "3", timeout=240)
    figures = dict(line.split(None, 1) for line in text.splitlines())
    assert figures["completed"] == "10"
    assert figures["errors"] == "0"
    assert float(figures["peak_rss_mb"].replace(",", "")) > 0


@pytest.mark.slow
def test_profile_script_reports_layers(tmp_path: Path) -> None:
    report = tmp_path / "profile.md"
    _script("profile_gateway.py", "--seconds", "3", "--report", str(report), timeout=240)
    text = report.read_text()
    assert "| socket writes (send system call) |" in text
    assert "| LM Gate (tray_app) |" in text
    assert "`Gateway.dispatch (tray_app/gateway/app.py)`" in text


def test_routing_benchmark_measures_one_two_and_the_control(tmp_path: Path) -> None:
    out = tmp_path / "routing.json"
    _script(
        "bench_routing.py", "--rounds", "1", "--requests", "30", "--json", str(out), timeout=300
    )
    figures = json.loads(out.read_text())
    assert set(figures) == {"one upstream", "two upstreams", "one upstream (control)", "in process"}
    assert figures["two upstreams"]["c1_p50_ms"] > 0


def test_failover_benchmark_kills_one_and_sees_it_rejoin(tmp_path: Path) -> None:
    out = tmp_path / "failover.json"
    _script(
        "bench_failover.py",
        *("--concurrency", "4", "--kill-after", "1", "--down-for", "1", "--json", str(out)),
        timeout=300,
    )
    figures = json.loads(out.read_text())
    # What was sent after the kill and never reached a server could have gone to the other
    # one; a request in flight at the kill could not be retried (a server may have had it).
    assert figures["sent"] > 0
    assert figures["failed_had_not_started_never_reached"] == 0, figures["failures_never_reached"]
    # ... and was sent moments before it: a request the gateway held on to for longer
    # (past a whole answer's time) and then lost is not in flight, it is lost.
    assert all(-1000 < at < 0 for at in figures["in_flight_sent_ms_after_kill"])
    assert figures["marked_down_s"] is not None and figures["serves_again_s"] is not None


def test_team_benchmark_measures_sqlite_one_replica_and_two(tmp_path: Path) -> None:
    from tests.helpers import missing_tool
    from tests.postgres_server import _binaries

    if _binaries() is None:
        missing_tool("PostgreSQL (initdb)", "LMGATE_REQUIRE_POSTGRES")
    out = tmp_path / "team.json"
    printed = _script(
        "bench_team.py", "--rounds", "1", "--requests", "32", "--json", str(out), timeout=300
    )
    figures = json.loads(out.read_text())
    assert set(figures) == {"sqlite (one machine)", "postgres + redis, 1 replica", "2 replicas"}
    assert all(side["c16_rps"] > 0 for side in figures.values())
    assert "c1_p50_added_ms" in figures["postgres + redis, 1 replica"]
    assert "two replicas give" in printed


@pytest.mark.slow
def test_throughput_benchmark_measures_every_side_against_the_floor(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    printed = _script(
        "throughput.py", "--rounds", "1", "--seconds", "1", "--json", str(out), timeout=300
    )
    figures = json.loads(out.read_text())
    assert set(figures) == {
        "bare aiohttp proxy (floor)",
        "gateway",
        "gateway + budget",
        "gateway, 2 upstreams",
    }
    for side, values in figures.items():
        assert set(values["rps"]) == {"chat", "models"}, side
        assert all(rate > 0 for rates in values["rps"].values() for rate in rates), side
    assert figures["bare aiohttp proxy (floor)"]["ratio"]["chat"] == [1.0]
    assert "| gateway + budget |" in printed


def test_a_wrk_run_with_refusals_is_no_figure() -> None:
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bench = _module("throughput")
        side = bench.Side("refusing", f"http://127.0.0.1:{server.server_port}", {})
        got = bench.wrk(side, "/v1/models", 1, 2, None)
    finally:
        server.shutdown()
        server.server_close()
    assert isinstance(got, str) and "Non-2xx" in got
