"""A fast fake LM Studio for benchmarks: answers chat requests at once, streams on demand.

The request body controls streams: ``bench_chunks`` (count) and ``bench_interval_ms`` (pacing).
Prints ``PORT <n>`` once listening on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

from tray_app.garbage import settle_after_start

REPLY = json.dumps(
    {
        "id": "chatcmpl-bench",
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
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    }
).encode()
CHUNK = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
    b'"model":"bench","choices":[{"index":0,"delta":{"content":"tok "},'
    b'"finish_reason":null}]}\n\n'
)


async def chat(request: web.Request) -> web.StreamResponse:
    payload = await request.json()
    if not payload.get("stream"):
        return web.Response(body=REPLY, content_type="application/json")
    chunks = int(payload.get("bench_chunks", 10))
    interval = float(payload.get("bench_interval_ms", 0)) / 1000
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(chunks):
        if interval and i:
            await asyncio.sleep(interval)
        await response.write(CHUNK)
    await response.write(b"data: [DONE]\n\n")
    return response


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model"}]})


async def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    # As lmgate serve does: a full collection under 1,000 streams stalls them all.
    settle_after_start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
