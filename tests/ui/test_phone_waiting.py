"""The phone page while its answer waits for a turn in the gateway's fair queue, in Debian's
headless Chromium (the phone page's own browser fixture).

The gateway tells a waiting stream its place in SSE comments (": waiting, 2 ahead"). Here a
real aiohttp server on loopback plays the gateway: it serves the page's own files with the
gateway's security headers and answers /api/chat with the comments a waiting stream gets, one
step at a time as the test says, so each state of the bubble can be seen: the place in words
until the first token, keep-alives changing nothing, and the queue's errors in the phone's
words.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from tests.ui import test_phone_page
from tests.ui.test_phone_markdown import answer_js, shot
from tests.ui.test_phone_page import PHONE
from tray_app.gateway.webpage import SECURITY_HEADERS, WebPage

browser = test_phone_page.browser

STEP = object()  # in a script: wait here until the test calls step()


def token(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"


@dataclass
class FakeGateway:
    """The page's files and the few API answers it needs, on a loop in its own thread."""

    script: list[object] = field(default_factory=list)
    url: str = ""
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _steps: asyncio.Queue[None] | None = None

    def step(self) -> None:
        assert self._steps is not None
        self._loop.call_soon_threadsafe(self._steps.put_nowait, None)

    async def _file(self, request: web.Request) -> web.Response:
        return self._page.response(request.path, "req-fake")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "qwen/qwen3-4b"}]})

    async def _conversations(self, request: web.Request) -> web.Response:
        return web.json_response({"data": []})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        assert self._steps is not None
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Conversation-ID": "c1"}
        )
        await response.prepare(request)
        for item in self.script:
            if item is STEP:
                await self._steps.get()
            else:
                assert isinstance(item, bytes)
                await response.write(item)
        return response

    async def _start(self) -> web.AppRunner:
        self._page = WebPage()
        self._steps = asyncio.Queue()
        app = web.Application()
        for path in self._page.paths:
            app.router.add_get(path, self._file)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/api/conversations", self._conversations)
        app.router.add_post("/api/chat", self._chat)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return runner

    def run(self) -> Iterator[FakeGateway]:
        started = threading.Event()
        runner: list[web.AppRunner] = []

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            runner.append(self._loop.run_until_complete(self._start()))
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(runner[0].cleanup())
            self._loop.close()

        thread = threading.Thread(target=serve, name="fake-gateway", daemon=True)
        thread.start()
        assert started.wait(10), "the fake gateway did not start"
        try:
            yield self
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            thread.join(10)


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    yield from FakeGateway().run()


def open_chat(browser: Any, gateway: FakeGateway) -> tuple[Any, Any]:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    context.add_init_script("localStorage.setItem('lmgate.token', 'a.paired.device');")
    page = context.new_page()
    page.goto(gateway.url + "/")
    page.wait_for_selector("#chat-screen:not([hidden])", timeout=10000)
    return context, page


def bubble_text(page: Any) -> str:
    text: str = page.evaluate(answer_js("a.innerText.trim()"))
    return text


def wait_for_bubble(page: Any, text: str) -> None:
    page.wait_for_function(answer_js(f"a.innerText.trim() === {json.dumps(text)}"), timeout=10000)


def test_a_waiting_answer_shows_its_place_in_words_until_its_first_token(
    browser: Any, gateway: FakeGateway
) -> None:
    gateway.script = [
        b": keep-alive\n\n",
        b": waiting, 2 ahead\n\n",
        STEP,
        b": keep-alive\n\n",  # a keep-alive between notices changes nothing
        STEP,
        b": waiting, 1 ahead\n\n",
        STEP,
        token("Hello"),
        b": waiting, 9 ahead\n\n",  # once the answer is coming, a notice is not shown
        token(" there"),
        b"data: [DONE]\n\n",
    ]
    context, page = open_chat(browser, gateway)
    page.fill("#input", "Hi")
    page.click("#send")
    wait_for_bubble(page, "Waiting, 2 ahead")
    assert page.evaluate(answer_js("a.querySelector('.waiting').getAttribute('role')")) == (
        "status"
    )
    shot(page, "phone-waiting", publish=False)
    gateway.step()
    page.wait_for_timeout(200)
    assert bubble_text(page) == "Waiting, 2 ahead"
    gateway.step()
    wait_for_bubble(page, "Waiting, 1 ahead")
    gateway.step()
    page.wait_for_function("() => !document.querySelector('#stop:not([hidden])')", timeout=10000)
    assert bubble_text(page) == "Hello there"
    assert page.evaluate(answer_js("a.querySelector('.waiting')")) is None
    context.close()


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("queue_timeout", "The computer stayed busy answering others for too long."),
        ("queue_full", "The computer is busy answering others, and too many are already"),
        ("model_busy", "The computer is answering others with another model;"),
        ("model_load_timeout", "The computer's LM Studio took too long to load this model."),
    ],
)
def test_a_wait_that_ends_in_a_queue_error_says_so_in_words(
    browser: Any, gateway: FakeGateway, code: str, words: str
) -> None:
    error = {"error": {"message": "LM Studio stayed busy", "type": "server_error", "code": code}}
    gateway.script = [
        b": waiting, 0 ahead\n\n",
        STEP,
        b"data: " + json.dumps(error).encode() + b"\n\n",
    ]
    context, page = open_chat(browser, gateway)
    page.fill("#input", "Hi")
    page.click("#send")
    wait_for_bubble(page, "Next in line")
    gateway.step()
    page.wait_for_selector(".message.error .error-line", timeout=10000)
    assert page.inner_text(".message.error .error-line").startswith(words)
    assert page.evaluate("document.querySelector('.waiting')") is None
    assert not page.is_hidden("#retry")
    context.close()


@pytest.mark.parametrize("notice", [b"waiting, 0 ahead", b"waiting, next in line"])
def test_first_in_the_queue_is_next_in_line(
    browser: Any, gateway: FakeGateway, notice: bytes
) -> None:
    gateway.script = [
        b": waiting, 1 ahead\n\n",
        STEP,
        b": " + notice + b"\n\n",
        STEP,
        b": waiting, 10 ahead\n\n",  # 10 is not 0: told as it came
        STEP,
        token("Hi"),
        b"data: [DONE]\n\n",
    ]
    context, page = open_chat(browser, gateway)
    page.fill("#input", "Hi")
    page.click("#send")
    wait_for_bubble(page, "Waiting, 1 ahead")
    gateway.step()
    wait_for_bubble(page, "Next in line")
    gateway.step()
    wait_for_bubble(page, "Waiting, 10 ahead")
    gateway.step()
    wait_for_bubble(page, "Hi")
    context.close()


def test_the_fake_serves_the_page_with_the_gateways_headers(gateway: FakeGateway) -> None:
    # The page runs here under the same CSP as behind the real gateway.
    import urllib.request

    with urllib.request.urlopen(gateway.url + "/app.js", timeout=5) as answer:
        assert (
            answer.headers["Content-Security-Policy"]
            == (SECURITY_HEADERS["Content-Security-Policy"])
        )
