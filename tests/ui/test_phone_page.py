"""The phone page in Debian's headless Chromium, driven by Playwright at a phone viewport.

The QR image is the one the app draws; zxing-cpp decodes it; the browser opens what it says,
pairs, lists models, streams, stops, keeps conversations apart — and a second device sees none of
the first one's. tests/run.sh installs Chromium and sets LMGATE_REQUIRE_BROWSER=1, so in CI a
missing browser is a failure. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveGateway
from tests.fake_lmstudio import MODELS
from tests.helpers import FAKE_NGROK_AGENT, REPO_ROOT, publish_screenshot
from tray_app.secret_store.base import MemorySecretStore

ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PHONE = {"width": 360, "height": 740}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("LMGATE_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium is required (tests/run.sh installs Debian's chromium)")
        pytest.skip("no Chromium here (tests/run.sh installs it)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()


class Live(LiveGateway):
    def qr_url(self) -> str:
        """Pair the way a person does: the app draws the QR code, a camera reads it."""
        import zxingcpp
        from PIL import Image

        from tray_app.ui.qr import qr_image

        code, _ = self.identity.pairing.create_code()
        link = f"{self.server.url}/#{code}"
        assert len(link) <= 200
        path = ARTIFACTS / f"pairing-qr-{code[:6]}.png"
        path.parent.mkdir(exist_ok=True)
        qr_image(link, module_px=6).save(str(path))
        with Image.open(path) as image:
            (decoded,) = [r.text for r in zxingcpp.read_barcodes(image)]
        return decoded


@pytest.fixture
def live(tmp_path: Path, qapp: Any) -> Iterator[Live]:  # qapp: the QR is drawn with Qt
    rig = Live(tmp_path, server_shutdown_grace=1)
    yield rig
    rig.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"phone-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if name in {"streamed", "hostile-output"}:
        publish_screenshot(path, f"phone-{name}.png")


def pair(browser: Any, live: Live) -> tuple[Any, Any]:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(live.qr_url())
    page.wait_for_selector("#chat-screen:not([hidden])", timeout=10000)
    assert "#" not in page.url, "the code left the address bar"
    assert page.evaluate("localStorage.getItem('lmgate.token')").count(".") == 2
    assert all(url.startswith(live.server.url) for url in requests), "no third-party request"
    return context, page


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")


# What the README's screenshot shows streaming in: a reply a person could have had.
GREETING = (
    "Hello! I'm running on your computer, and LM Gate brings me to your phone. Ask me "
    "anything: a recipe, a translation, or help with an email."
)


def test_pair_list_models_stream_and_keep_conversations_apart(browser: Any, live: Live) -> None:
    live.fake.behaviour.reply = GREETING
    live.fake.behaviour.chunks = 12
    live.fake.behaviour.chunk_delay = 0.05
    context, page = pair(browser, live)
    shot(page, "paired")
    options = page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
    assert options == list(MODELS)

    send(page, "First conversation: hello")
    bubble = page.locator(".message.assistant").last
    page.wait_for_function(
        "() => { const b = [...document.querySelectorAll('.message.assistant')].pop();"
        " return b && b.textContent.includes('Hello!') && !b.textContent.includes('email.'); }",
        timeout=10000,
    )  # seen mid-stream: piece by piece, not all at the end
    page.wait_for_function("() => !document.querySelector('#stop:not([hidden])')", timeout=10000)
    assert bubble.inner_text().strip() == GREETING
    shot(page, "streamed")
    live.fake.behaviour.reply = None

    page.click("#new-chat")
    send(page, "Second conversation: bonjour")
    page.wait_for_function("() => !document.querySelector('#stop:not([hidden])')", timeout=10000)
    page.click("#conversations-button")
    titles = page.eval_on_selector_all(
        "#conversation-list .open", "els => els.map(e => e.textContent)"
    )
    assert sorted(titles) == ["First conversation: hello", "Second conversation: bonjour"]
    page.click("text=First conversation: hello")
    page.wait_for_function(
        "() => document.querySelector('.message.user').textContent === 'First conversation: hello'"
    )
    users = page.eval_on_selector_all(".message.user", "els => els.map(e => e.textContent)")
    assert users == ["First conversation: hello"], "the conversations stay apart"
    shot(page, "conversations")

    # A second device pairs with its own code and sees nothing of the first one's.
    other_context, other = pair(browser, live)
    other.click("#conversations-button")
    other.wait_for_selector("#conversation-list li")
    assert other.inner_text("#conversation-list") == "No conversations yet."
    first_id = page.evaluate(
        "fetch('/api/conversations', {headers: {Authorization: 'Bearer ' +"
        " localStorage.getItem('lmgate.token')}}).then(r => r.json())"
        ".then(j => j.data[0].id)"
    )
    answer = other.evaluate(
        f"fetch('/api/conversations/{first_id}', {{headers: "
        "{Authorization: 'Bearer ' + localStorage.getItem('lmgate.token')}})"
        ".then(async r => [r.status, (await r.json()).error.code])"
    )
    assert answer == [404, "conversation_not_found"]
    other_context.close()
    context.close()


def test_stop_aborts_the_generation_upstream(browser: Any, live: Live) -> None:
    live.fake.behaviour.chunks = 2000
    live.fake.behaviour.chunk_delay = 0.05
    context, page = pair(browser, live)
    send(page, "Tell me a very long story")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.message.assistant')].pop().textContent"
        ".includes('tok3')",
        timeout=10000,
    )
    stopped_at = time.monotonic()
    page.click("#stop")
    page.wait_for_selector(".message .stopped")
    deadline = time.monotonic() + 3
    while not live.fake.disconnects and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.fake.disconnects, "LM Studio never saw the cancel"
    assert live.fake.disconnects[0] - stopped_at < 1.0
    assert len(live.fake.chunk_sent_at) < 200
    shot(page, "stopped")
    context.close()


def test_used_expired_and_revoked_are_explained(browser: Any, live: Live) -> None:
    context, page = pair(browser, live)
    # A code that was already used:
    code, _ = live.identity.pairing.create_code()
    first = browser.new_context(viewport=PHONE)
    first_page = first.new_page()
    first_page.goto(f"{live.server.url}/#{code}")
    first_page.wait_for_selector("#chat-screen:not([hidden])")
    again = browser.new_context(viewport=PHONE)
    again_page = again.new_page()
    again_page.goto(f"{live.server.url}/#{code}")
    again_page.wait_for_selector("#pair-screen:not([hidden])")
    assert "already used" in again_page.inner_text("#pair-status")
    assert "new QR code" in again_page.inner_text("#pair-status")
    shot(again_page, "used-code")

    # A revoked device is told so and returns to the scan screen.
    live.identity.pairing.revoke_all_devices()
    page.reload()
    page.wait_for_selector("#pair-screen:not([hidden])")
    assert "revoked" in page.inner_text("#pair-status")
    assert page.evaluate("localStorage.getItem('lmgate.token')") is None
    shot(page, "revoked")
    for c in (context, first, again):
        c.close()


def test_unreachable_gateway_is_explained(browser: Any, live: Live) -> None:
    context, page = pair(browser, live)
    live.thread.submit(live.server.stop()).result(10)
    send(page, "Are you there?")
    page.wait_for_selector(".message.error")
    assert "Can't reach LM Gate" in page.inner_text(".message.error")
    assert page.is_visible("#retry")
    context.close()


def test_model_output_is_never_html(browser: Any, live: Live) -> None:
    live.fake.behaviour.chunks = 5
    live.fake.behaviour.reply = (
        'Look: <img src=x onerror="window.__pwned=true"> and **bold** and `x<b>`\n\n'
        "```html\n<script>window.__pwned=true</script>\n```"
    )
    context, page = pair(browser, live)
    page.evaluate("() => { window.__pwned = false; }")
    send(page, "Say something nasty")
    page.wait_for_function("() => !document.querySelector('#stop:not([hidden])')")
    answer = page.locator(".message.assistant").last
    assert page.evaluate("document.querySelectorAll('#messages img, #messages script').length") == 0
    assert page.evaluate("window.__pwned") is False
    assert answer.locator("strong").inner_text() == "bold"
    assert answer.locator("pre code").inner_text() == "<script>window.__pwned=true</script>\n"
    assert "<img src=x" in answer.inner_text()  # shown as text, harmless
    shot(page, "hostile-output")
    context.close()


def test_desktop_layout_and_manifest(browser: Any, live: Live) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(live.qr_url())
    page.wait_for_selector("#chat-screen:not([hidden])")
    width = page.evaluate("document.querySelector('#chat-screen').getBoundingClientRect().width")
    assert width <= 800, "a readable column on a wide screen"
    manifest = page.evaluate("fetch('/manifest.webmanifest').then(r => r.json())")
    assert manifest["display"] == "standalone" and manifest["icons"]
    shot(page, "desktop")
    context.close()


def test_reasoning_is_shown_collapsed(browser: Any, live: Live) -> None:
    live.fake.behaviour.reasoning = "The user greets me; I should greet back."
    live.fake.behaviour.chunks = 3
    context, page = pair(browser, live)
    send(page, "Hello")
    page.wait_for_function("() => !document.querySelector('#stop:not([hidden])')")
    details = page.locator(".message.assistant details").last
    assert details.get_attribute("open") is None, "collapsed until tapped"
    assert details.locator("summary").inner_text() == "Thinking"
    details.locator("summary").click()
    assert "greet back" in details.inner_text()
    assert page.locator(".message.assistant p").last.inner_text().strip() == "tok0 tok1 tok2"
    context.close()


@pytest.mark.parametrize("provider", ["lan", "ngrok"])
def test_the_page_works_on_lan_and_through_the_tunnel(
    browser: Any, live: Live, provider: str, tmp_path: Path
) -> None:
    from tray_app.tunnel.lan import LanProvider
    from tray_app.tunnel.manager import TunnelManager
    from tray_app.tunnel.ngrok import NGROK_AUTHTOKEN, NgrokProvider

    if provider == "lan":
        chosen: Any = LanProvider(live.server, address="127.0.0.2")
    else:
        agent = str(FAKE_NGROK_AGENT)
        token = "2fakeAuthToken_" + "abc123XYZ" * 4
        chosen = NgrokProvider(
            MemorySecretStore({NGROK_AUTHTOKEN: token}), tmp_path / "ngrok", ngrok_path=agent
        )

    async def go() -> TunnelManager:
        manager = TunnelManager(chosen, live.server.port or 0)
        await manager.start()
        return manager

    manager = live.thread.submit(go()).result(30)
    try:
        public = manager.status.public_url or ""
        assert public != live.server.url
        code, _ = live.identity.pairing.create_code()
        context = browser.new_context(viewport=PHONE, is_mobile=True)
        page = context.new_page()
        page.goto(f"{public}/#{code}")
        page.wait_for_selector("#chat-screen:not([hidden])", timeout=10000)
        live.fake.behaviour.chunks = 3
        send(page, "Over the " + provider)
        page.wait_for_function("() => !document.querySelector('#stop:not([hidden])')")
        assert page.locator(".message.assistant").last.inner_text().strip() == "tok0 tok1 tok2"
        shot(page, f"via-{provider}")
        context.close()
    finally:
        live.thread.submit(manager.stop()).result(30)
