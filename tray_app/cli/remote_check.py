"""``lmgate check URL TOKEN``: verify a deployment end to end from any machine.

Health, that a request without a token is refused, models, a chat, a streamed chat (time to
first token), and a CORS preflight; a pass/fail table, exit 0 only if all pass.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from tray_app.gateway.upstream.failures import describe_failure

HEADERS = {"ngrok-skip-browser-warning": "1"}
SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    ok: bool
    detail: str


def _why(exc: Exception) -> str:
    """A failed step in words (it once said "ClientConnectorError: ...")."""
    if isinstance(exc, aiohttp.ClientError | TimeoutError):
        words = describe_failure(exc)
    elif isinstance(exc, ValueError):
        words = "the answer was not the JSON expected"
    else:
        words = "the answer lacked a field"
    detail = str(exc)
    return f"{words} ({detail})" if detail else words


async def _run(url: str, token: str) -> list[Step]:
    base = url.rstrip("/")
    auth = {**HEADERS, "Authorization": f"Bearer {token}"}
    steps: list[Step] = []
    timeout = aiohttp.ClientTimeout(total=SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as s:

        async def step(name: str, coro: object) -> object:
            try:
                return await coro  # type: ignore[misc]
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError) as exc:
                steps.append(Step(name, False, _why(exc)[:160]))
                return None

        async def health() -> None:
            async with s.get(base + "/healthz", headers=HEADERS) as r:
                body = await r.json(content_type=None)
                ok = r.status == 200 and body == {"status": "ok"}
                steps.append(Step("health", ok, f"{r.status} {json.dumps(body)}"))

        async def refused() -> None:
            async with s.get(base + "/v1/models", headers=HEADERS) as r:
                steps.append(
                    Step("no token is refused", r.status == 401, f"{r.status} (expected 401)")
                )

        async def models() -> list[str]:
            async with s.get(base + "/v1/models", headers=auth) as r:
                body = await r.json(content_type=None)
                ids = [m["id"] for m in body.get("data", [])] if r.status == 200 else []
                steps.append(
                    Step(
                        "models",
                        bool(ids),
                        ", ".join(ids) if ids else f"{r.status} {json.dumps(body)[:120]}",
                    )
                )
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
                    else f"{r.status} {json.dumps(body)[:120]}"
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
            first = None
            done = False
            async with s.post(base + "/v1/chat/completions", headers=auth, json=payload) as r:
                if r.status != 200:
                    steps.append(Step("streamed chat", False, f"{r.status}"))
                    return
                async for line in r.content:
                    if line.startswith(b"data:") and first is None:
                        first = time.monotonic() - started
                    if line.strip() == b"data: [DONE]":
                        done = True
            ok = first is not None and done
            steps.append(
                Step(
                    "streamed chat",
                    ok,
                    f"first token after {first * 1000:.0f} ms"
                    if ok and first is not None
                    else "no complete stream",
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
        await step("no token is refused", refused())
        ids = await step("models", models())
        if isinstance(ids, list) and ids:
            await step("chat", chat(ids[0]))
            await step("streamed chat", stream(ids[0]))
        else:
            steps.append(Step("chat", False, "skipped: no model"))
            steps.append(Step("streamed chat", False, "skipped: no model"))
        await step("CORS preflight", preflight())
    return steps


def render(url: str, steps: list[Step]) -> str:
    width = max(len(s.name) for s in steps)
    lines = [f"LM Gate at {url}", ""]
    lines += [f"{'PASS' if s.ok else 'FAIL'}  {s.name.ljust(width)}  {s.detail}" for s in steps]
    failed = sum(not s.ok for s in steps)
    lines += ["", "All checks passed." if not failed else f"{failed} check(s) failed."]
    return "\n".join(lines)


def check(url: str, token: str) -> tuple[str, bool]:
    steps = asyncio.run(_run(url, token))
    return render(url, steps), all(s.ok for s in steps)
