"""``lmgate check URL TOKEN``: verify a deployment end to end from any machine.

Health, that a request without a token is refused, models, a chat, a streamed chat (time to
first token, largest gap between chunks), that streams come through as they are written (the
gateway's paced ``/stream-check``: a tunnel that buffers shows each answer only when it is
finished), and a CORS preflight; a pass/fail table, exit 0 only if all pass. A step that
cannot run because an earlier one failed is skipped, not failed, and the summary names the
first failure: one cause is counted once.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from tray_app.gateway.upstream.failures import describe_failure
from tray_app.tunnel.stream_check import check_stream

HEADERS = {"ngrok-skip-browser-warning": "1"}
SECONDS = 60.0
MESSAGE_CHARS = 100  # an error's message as shown; LM Gate's are shorter
STREAMS = "streams through"


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    ok: bool
    detail: str
    skipped: bool = False


def _why(exc: Exception) -> str:
    """A failed step in words: neither a class name ("ClientConnectorError") nor aiohttp's
    own text ("Cannot connect to host ... ssl:default [Connect call failed ...]")."""
    number = exc.os_error.errno if type(exc) is aiohttp.ClientConnectorError else None
    if number is not None and number > 0:
        # The system's words for the errno ("connection refused"); a DNS or TLS failure is a
        # subclass, and describe_failure words it better.
        return f"not reachable: {os.strerror(number).lower()}"
    if isinstance(exc, aiohttp.ClientError | TimeoutError):
        return f"not reachable: {describe_failure(exc)}"
    if isinstance(exc, ValueError):
        return "the answer was not the JSON expected"
    return "the answer lacked a field"


def _short(text: str, limit: int = MESSAGE_CHARS) -> str:
    """Cut at a word, not mid-word, and say that it was cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " …"


def _refusal(status: int, body: object) -> str:
    """An error answer as its code and message (OpenAI's shape), else just its status."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        said = _short(str(message)) if message else ""
        return f"{status} {code}: {said}" if code else f"{status}: {said}"
    return f"answered {status}"


async def _run(url: str, token: str) -> list[Step]:
    base = url.rstrip("/")
    auth = {**HEADERS, "Authorization": f"Bearer {token}"}
    steps: list[Step] = []
    models_status = 0  # what /v1/models answered (401: the token is refused)
    timeout = aiohttp.ClientTimeout(total=SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as s:

        async def step(name: str, coro: object) -> object:
            try:
                return await coro  # type: ignore[misc]
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError) as exc:
                steps.append(Step(name, False, _why(exc)))
                return None

        def skip(name: str, because: str) -> None:
            steps.append(Step(name, False, because, skipped=True))

        async def health() -> None:
            async with s.get(base + "/healthz", headers=HEADERS) as r:
                body = await r.json(content_type=None)
                ok = r.status == 200 and body == {"status": "ok"}
                detail = "200 ok" if ok else _refusal(r.status, body)
                steps.append(Step("health", ok, detail))

        async def refused() -> None:
            async with s.get(base + "/v1/models", headers=HEADERS) as r:
                steps.append(
                    Step("no token is refused", r.status == 401, f"{r.status} (expected 401)")
                )

        async def models() -> list[str]:
            nonlocal models_status
            async with s.get(base + "/v1/models", headers=auth) as r:
                models_status = r.status
                body = await r.json(content_type=None)
                ids = [m["id"] for m in body.get("data", [])] if r.status == 200 else []
                if r.status == 200 and not ids:
                    detail = "LM Studio offers no model: load one"
                else:
                    detail = _short(", ".join(ids)) if ids else _refusal(r.status, body)
                steps.append(Step("models", bool(ids), detail))
                return ids

        async def chat(model: str) -> None:
            payload = {
                "model": model,
                "max_tokens": 16,
                "messages": [{"role": "user", "content": "Say hi."}],
            }
            started = time.monotonic()
            async with s.post(base + "/v1/chat/completions", headers=auth, json=payload) as r:
                body = await r.json(content_type=None)
                ok = r.status == 200 and bool(body["choices"][0]["message"].get("content"))
                detail = (
                    f"{(time.monotonic() - started) * 1000:.0f} ms"
                    if ok
                    else _refusal(r.status, body)
                )
                steps.append(Step("chat", ok, detail))

        async def stream(model: str) -> None:
            payload = {
                "model": model,
                "max_tokens": 16,
                "stream": True,
                "messages": [{"role": "user", "content": "Count to three."}],
            }
            started = time.monotonic()
            arrivals: list[float] = []
            done = False
            async with s.post(base + "/v1/chat/completions", headers=auth, json=payload) as r:
                if r.status != 200:
                    body = await r.json(content_type=None)
                    steps.append(Step("streamed chat", False, _refusal(r.status, body)))
                    return
                async for line in r.content:
                    if line.strip() == b"data: [DONE]":
                        done = True
                    elif line.startswith(b"data:"):
                        arrivals.append(time.monotonic())
            ok = bool(arrivals) and done
            if not ok:
                steps.append(Step("streamed chat", False, "no complete stream"))
                return
            detail = f"first token after {(arrivals[0] - started) * 1000:.0f} ms"
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            if gaps:
                detail += f", largest gap {max(gaps) * 1000:.0f} ms"
            steps.append(Step("streamed chat", True, detail))

        async def streams_through() -> None:
            found = await check_stream(base, token, seconds=SECONDS)
            if not found.checked:
                steps.append(Step(STREAMS, False, found.problem))
            elif found.incremental:
                steps.append(
                    Step(
                        STREAMS,
                        True,
                        f"first chunk after {found.first_chunk_ms or 0:.0f} ms, "
                        f"largest gap {found.largest_gap_ms or 0:.0f} ms",
                    )
                )
            else:
                steps.append(
                    Step(
                        STREAMS,
                        False,
                        f"in one piece: {found.chunks} chunks at once after "
                        f"{found.first_chunk_ms or 0:.0f} ms (people see each answer only "
                        "when it is finished)",
                    )
                )

        async def preflight() -> None:
            parts = urlsplit(base)
            origin = f"{parts.scheme}://{parts.netloc}"
            headers = {
                **HEADERS,
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            }
            async with s.options(base + "/v1/chat/completions", headers=headers) as r:
                allowed = r.headers.get("Access-Control-Allow-Origin")
                ok = r.status in {200, 204} and allowed == origin
                steps.append(Step("CORS preflight", ok, f"{r.status}, allows {allowed}"))

        await step("health", health())
        if not steps[-1].ok and steps[-1].detail.startswith("not reachable"):
            # Nothing answers: every other step would fail for the same reason.
            for name in ("no token is refused", "models", "chat", "streamed chat", STREAMS):
                skip(name, "the gateway is not reachable")
            skip("CORS preflight", "the gateway is not reachable")
            return steps
        await step("no token is refused", refused())
        ids = await step("models", models())
        if isinstance(ids, list) and ids:
            await step("chat", chat(ids[0]))
            await step("streamed chat", stream(ids[0]))
        else:
            skip("chat", "no model to ask (models failed)")
            skip("streamed chat", "no model to ask (models failed)")
        if models_status == 401:
            # The token was refused: the stream check would be refused for the same reason.
            skip(STREAMS, "the token was refused (models failed)")
        else:
            # No model needed: the gateway paces this stream itself.
            await step(STREAMS, streams_through())
        await step("CORS preflight", preflight())
    return steps


def render(url: str, steps: list[Step]) -> str:
    width = max(len(s.name) for s in steps)
    lines = [f"LM Gate at {url}", ""]
    lines += [f"{_mark(s)}  {s.name.ljust(width)}  {s.detail}" for s in steps]
    failed = [s for s in steps if not s.ok and not s.skipped]
    skipped = sum(s.skipped for s in steps)
    if not failed and not skipped:
        summary = "All checks passed."
    else:
        counted = f"{len(failed)} check(s) failed" + (
            f" ({skipped} more could not run)" if skipped else ""
        )
        cause = f". First cause: {failed[0].name}: {failed[0].detail}" if failed else "."
        summary = f"{counted}{cause}"
    lines += ["", summary]
    return "\n".join(lines)


def _mark(step: Step) -> str:
    if step.skipped:
        return "SKIP"
    return "PASS" if step.ok else "FAIL"


def check(url: str, token: str) -> tuple[str, bool]:
    steps = asyncio.run(_run(url, token))
    return render(url, steps), all(s.ok for s in steps)
