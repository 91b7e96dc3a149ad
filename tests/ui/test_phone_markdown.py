"""The phone page renders answers as Markdown (marked + DOMPurify + highlight.js, served by LM
Gate itself) and keeps what the reader holds while an answer streams in.

A fake LM Studio streams the Markdown; Debian's Chromium shows it at a phone viewport. Every
page watches for console errors, CSP violations and requests to other origins: a test fails on
any of them. Screenshots: docs/screenshots/phone-markdown*.png (LMGATE_UPDATE_DOCS=1).
"""

from __future__ import annotations

import io
import re
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from tests.helpers import publish_screenshot
from tests.ui import test_phone_page
from tests.ui.test_phone_page import ARTIFACTS, Live
from tray_app.gateway.webpage import FILES, SECURITY_HEADERS

# The phone page's own fixtures: one Chromium per module, a live gateway per test.
browser = test_phone_page.browser
live = test_phone_page.live

CODE = 'def greet(name):\n    return f"Hello, {name}!"  # a friendly hello\n'
MARKDOWN = f"""# Trip plan

## Day one

Some *emphasis*, some **strong words**, ~~a struck idea~~ and `inline code`.

- Pack
  - passport
  - charger
- Leave early

1. Train
2. Bus

| City | Day | Hotel | Price per night | Breakfast | Distance to the station |
|------|:---:|-------|----------------:|-----------|-------------------------|
| Lyon | 1 | Hôtel du Parc, rue de la République | 120 € | included | 400 m on foot |
| Nice | 2 | Le Petit Port, promenade des Anglais | 150 € | extra | 1.2 km by tram |

See [the docs](https://example.com/docs) before you go. Tickets:
https://tickets.example.com/booking/confirmation/ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789

> Travel light.

---

```python
{CODE}```
"""

HOSTILE = """<script>window.__pwned = 1</script>

<img src=x onerror="window.__pwned = 2">

<img src="http://127.0.0.2:9/tracker.png"> and <svg onload="window.__pwned = 3"></svg>

<iframe src="http://127.0.0.2:9/"></iframe><style>body { display: none }</style>

[click me](javascript:window.__pwned=4) and [shout](JaVaScRiPt:window.__pwned=5)
and [data](data:text/html,<script>window.__pwned=6</script>) and
<a href="javascript:window.__pwned=7">raw link</a> and
<a href="https://example.com/ok" onclick="window.__pwned=8">raw but fine</a>

![a picture](http://127.0.0.2:9/picture.png)

<details open ontoggle="window.__pwned = 9"><summary>x</summary></details>

```html
<script>window.__pwned = 10</script>
<img src=x onerror="window.__pwned = 11">
```
"""


@dataclass
class Watch:
    """What a page did that it must not: console errors, CSP violations, foreign requests."""

    origin: str
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def check(self, page: Any) -> None:
        violations = page.evaluate("window.__csp")
        assert violations == [], f"CSP violations: {violations}"
        assert self.errors == [], f"console errors: {self.errors}"
        assert self.foreign == [], f"requests to other origins: {self.foreign}"


def open_page(
    browser: Any, live: Live, width: int = 390, height: int = 844
) -> tuple[Any, Any, Watch]:
    context = browser.new_context(
        viewport={"width": width, "height": height}, is_mobile=True, has_touch=True
    )
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.server.url)
    # Set before any page script runs: what the hostile payloads would flip, and a CSP log.
    context.add_init_script(
        "window.__pwned = false; window.__csp = [];"
        "document.addEventListener('securitypolicyviolation',"
        " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    page = context.new_page()
    watch = Watch(live.server.url)
    page.on("console", lambda m: watch.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: watch.errors.append(str(e)))
    page.on(
        "request",
        lambda r: None if r.url.startswith(watch.origin) else watch.foreign.append(r.url),
    )
    page.goto(live.qr_url())
    page.wait_for_selector("#chat-screen:not([hidden])", timeout=10000)
    if live.fake.behaviour.models:
        # The chat screen shows before the model menu is filled: a test that then makes LM
        # Studio fail would fail the page's own model lookup instead of the message it sends.
        page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    return context, page, watch


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")


def wait_done(page: Any) -> None:
    page.wait_for_function("() => !document.querySelector('#stop:not([hidden])')", timeout=20000)


def shot(page: Any, name: str, *, publish: bool = True) -> None:
    """A screenshot in test-artifacts/; ``publish``: also the README's (LMGATE_UPDATE_DOCS=1)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    if publish:
        publish_screenshot(path, f"{name}.png")


def answer_js(expression: str) -> str:
    """A JS function evaluating ``expression`` with ``a`` = the last answer bubble."""
    return (
        f"() => {{ const a = [...document.querySelectorAll('.message.assistant')].pop();"
        f" return {expression}; }}"
    )


# ---- point 1: real Markdown ---------------------------------------------------------------


def test_every_markdown_element_renders(browser: Any, live: Live) -> None:
    live.fake.behaviour.reply = MARKDOWN
    live.fake.behaviour.chunks = 8
    context, page, watch = open_page(browser, live)
    send(page, "Plan my trip")
    wait_done(page)
    a = page.locator(".message.assistant").last
    assert a.locator("h1").inner_text() == "Trip plan"
    assert a.locator("h2").inner_text() == "Day one"
    assert a.locator("em").inner_text() == "emphasis"
    assert a.locator("strong").inner_text() == "strong words"
    assert a.locator("del").inner_text() == "a struck idea"
    assert a.locator("p > code").inner_text() == "inline code"
    assert a.locator("ul > li > ul > li").all_inner_texts() == ["passport", "charger"]
    assert a.locator("ol > li").all_inner_texts() == ["Train", "Bus"]
    assert a.locator("blockquote").inner_text().strip() == "Travel light."
    assert a.locator("hr").count() == 1

    table = a.locator(".table-wrap > table")
    assert table.locator("th").count() == 6 and table.locator("tbody tr").count() == 2
    assert table.locator("th").nth(1).get_attribute("align") == "center"
    wrap = page.evaluate(
        answer_js(
            "(w => [getComputedStyle(w).overflowX, w.scrollWidth > w.clientWidth])"
            "(a.querySelector('.table-wrap'))"
        )
    )
    assert wrap == ["auto", True], "a wide table scrolls sideways inside its wrapper"

    link = a.locator("a", has_text="the docs")
    assert link.get_attribute("href") == "https://example.com/docs"
    assert link.get_attribute("target") == "_blank"
    assert link.get_attribute("rel") == "noopener noreferrer"

    block = a.locator(".code-block")
    assert block.locator(".code-lang").inner_text() == "python"
    assert block.locator("pre code").inner_text() == CODE
    assert "hljs" in (block.locator("pre code").get_attribute("class") or "")
    assert block.locator(".hljs-keyword").first.inner_text() == "def"
    assert block.locator(".hljs-string").count() >= 1
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390

    copy = block.locator("button.copy")
    assert copy.inner_text() == "Copy"
    copy.click()
    page.wait_for_function(answer_js("a.querySelector('button.copy').textContent === 'Copied'"))
    assert page.evaluate("navigator.clipboard.readText()") == CODE
    page.wait_for_function(
        answer_js("a.querySelector('button.copy').textContent === 'Copy'"), timeout=5000
    )
    page.evaluate("document.querySelector('#messages').scrollTop = 0")
    shot(page, "phone-markdown")

    page.set_viewport_size({"width": 320, "height": 640})
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 320, "no sideways page"
    assert page.evaluate(
        answer_js(
            "(w => w.scrollWidth > w.clientWidth && w.getBoundingClientRect().right <= 320)"
            "(a.querySelector('.table-wrap'))"
        )
    ), "at 320 px the table scrolls inside its wrapper, which fits the screen"
    page.evaluate("document.querySelector('.code-block').scrollIntoView({block: 'end'})")
    shot(page, "phone-markdown-320")
    watch.check(page)
    context.close()


def test_hostile_output_never_runs_or_links_out(browser: Any, live: Live) -> None:
    live.fake.behaviour.reply = HOSTILE
    live.fake.behaviour.chunks = 6
    context, page, watch = open_page(browser, live)
    send(page, "Say something nasty")
    wait_done(page)
    a = page.locator(".message.assistant").last
    dangerous = page.evaluate(
        "document.querySelectorAll('#messages :is(script, img, svg, iframe, style, object,"
        " embed, form, details:not(.thinking), video, audio, link, meta)').length"
    )
    assert dangerous == 0
    attributes = page.evaluate(
        "[...document.querySelectorAll('#messages *')].flatMap(e => [...e.attributes]"
        ".map(x => x.name)).filter(n => n.startsWith('on') || n === 'style' || n === 'src')"
    )
    assert attributes == []
    hrefs = page.eval_on_selector_all("#messages a", "els => els.map(e => e.getAttribute('href'))")
    # Raw <a> tags are shown as text; an image becomes a link to tap, never a request.
    assert [h for h in hrefs if h is not None] == ["http://127.0.0.2:9/picture.png"]
    assert '<a href="https://example.com/ok" onclick=' in a.inner_text()
    for link in a.locator("a[href]").all():
        assert link.get_attribute("target") == "_blank"
        assert link.get_attribute("rel") == "noopener noreferrer"
    assert a.locator("a", has_text="click me").count() == 0, "a dead link is plain text"
    a.get_by_text("click me").click()  # nothing to follow, nothing to run
    assert a.locator("a", has_text="shout").count() == 0
    text = a.inner_text()
    assert "<script>window.__pwned = 1</script>" in text, "raw HTML is shown as text"
    assert '<img src=x onerror="window.__pwned = 2">' in text
    code = a.locator(".code-block pre code").inner_text()
    assert code.startswith("<script>window.__pwned = 10</script>\n<img src=x")
    time.sleep(0.3)  # give an onerror/onload/ontoggle the chance it must not take
    assert page.evaluate("window.__pwned") is False
    assert len(context.pages) == 1
    shot(page, "phone-markdown-hostile")
    watch.check(page)
    context.close()


def test_history_renders_and_copy_works_without_the_clipboard_api(browser: Any, live: Live) -> None:
    """A conversation reopened from the list is Markdown too; and on plain http over a LAN
    (not a secure context: no navigator.clipboard) Copy falls back to execCommand."""
    live.fake.behaviour.reply = MARKDOWN
    context, page, watch = open_page(browser, live)
    send(page, "Plan my trip")
    wait_done(page)
    page.click("#new-chat")
    page.click("#conversations-button")
    page.click("text=Plan my trip")
    page.wait_for_selector(".message.assistant h1")
    a = page.locator(".message.assistant").last
    assert a.locator(".code-block .code-lang").inner_text() == "python"
    assert a.locator(".table-wrap > table").count() == 1
    reader = context.new_page()  # a second tab that keeps its clipboard API, to look
    reader.goto(live.server.url + "/manifest.webmanifest")
    reader.evaluate("navigator.clipboard.writeText('something else')")
    page.bring_to_front()
    page.evaluate("() => { Object.defineProperty(navigator, 'clipboard', {value: undefined}); }")
    a.locator("button.copy").click()
    page.wait_for_function(answer_js("a.querySelector('button.copy').textContent === 'Copied'"))
    assert page.locator("textarea.offscreen").count() == 0, "the helper is gone again"
    assert reader.evaluate("navigator.clipboard.readText()") == CODE
    watch.check(page)
    context.close()


# ---- point 2: incremental rendering ---------------------------------------------------------


def test_an_opened_thinking_section_stays_open(browser: Any, live: Live) -> None:
    live.fake.behaviour.reasoning = "Let me think about trains and buses."
    live.fake.behaviour.reply = " ".join(f"word{i}" for i in range(60))
    live.fake.behaviour.chunks = 30
    live.fake.behaviour.chunk_delay = 0.1
    context, page, watch = open_page(browser, live)
    send(page, "Think first")
    page.wait_for_function(
        answer_js("a.querySelector('details') && a.textContent.includes('word2')")
    )
    page.locator(".message.assistant details summary").last.click()
    page.evaluate(answer_js("a.querySelector('details').__mark = 'mine'"))
    seen = page.evaluate(answer_js("a.querySelector('.answer').textContent.length"))
    page.wait_for_function(
        answer_js(f"a.querySelector('.answer').textContent.length > {seen} + 20"), timeout=10000
    )
    assert page.evaluate(
        answer_js("[a.querySelector('details').open, a.querySelector('details').__mark]")
    ) == [True, "mine"]
    wait_done(page)
    assert page.evaluate(answer_js("a.querySelector('details').open")) is True
    assert "word59" in page.locator(".message.assistant .answer").last.inner_text()
    watch.check(page)
    context.close()


def test_a_selection_survives_the_next_chunks(browser: Any, live: Live) -> None:
    first = "The first paragraph stays put."
    live.fake.behaviour.reply = first + "\n\n" + " ".join(f"more{i}" for i in range(80))
    live.fake.behaviour.chunks = 40
    live.fake.behaviour.chunk_delay = 0.1
    context, page, watch = open_page(browser, live)
    send(page, "Write two paragraphs")
    page.wait_for_function(
        answer_js(
            f"a.querySelector('p') && a.querySelector('p').textContent === '{first}'"
            " && a.querySelectorAll('p').length > 1"
        )
    )
    page.evaluate(
        answer_js(
            "(p => { p.__mark = 'mine'; const r = document.createRange();"
            " r.selectNodeContents(p); const s = getSelection(); s.removeAllRanges();"
            " s.addRange(r); })(a.querySelector('p'))"
        )
    )
    seen = page.evaluate(answer_js("a.textContent.length"))
    page.wait_for_function(answer_js(f"a.textContent.length > {seen} + 40"), timeout=10000)
    state = page.evaluate(
        answer_js(
            "[getSelection().toString(), a.querySelector('p').__mark,"
            " getSelection().anchorNode.isConnected]"
        )
    )
    assert state == [first, "mine", True], "the reader's selection was not rebuilt away"
    wait_done(page)
    assert page.evaluate("getSelection().toString()") == first
    watch.check(page)
    context.close()


LONG = "\n\n".join(f"Line {i} of a long answer." for i in range(120))

AT_BOTTOM = (
    "() => (m => m.scrollHeight - m.scrollTop - m.clientHeight < 24)"
    "(document.querySelector('#messages'))"
)
IN_VIEW = (
    "(sel => { const m = document.querySelector('#messages').getBoundingClientRect();"
    " const e = [...document.querySelectorAll(sel)].pop().getBoundingClientRect();"
    " return e.top >= m.top - 1 && e.bottom <= m.bottom + 1; })"
)


def scroll_up(page: Any) -> None:
    box = page.locator("#messages").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -100000)
    page.wait_for_function("() => document.querySelector('#messages').scrollTop === 0")


def test_the_view_follows_unless_the_reader_scrolled_up(browser: Any, live: Live) -> None:
    live.fake.behaviour.reply = LONG
    live.fake.behaviour.chunks = 120
    live.fake.behaviour.chunk_delay = 0.04
    context, page, watch = open_page(browser, live)
    send(page, "Write a lot")
    page.wait_for_function(answer_js("a.textContent.includes('Line 30 ')"), timeout=10000)
    assert page.evaluate(AT_BOTTOM), "follows the answer"
    scroll_up(page)
    seen = page.evaluate(answer_js("a.textContent.length"))
    page.wait_for_function(answer_js(f"a.textContent.length > {seen} + 200"), timeout=10000)
    assert page.evaluate("document.querySelector('#messages').scrollTop") == 0, "stays put"
    page.mouse.wheel(0, 100000)  # back to the bottom: following again
    page.wait_for_function(AT_BOTTOM)
    seen = page.evaluate(answer_js("a.textContent.length"))
    page.wait_for_function(answer_js(f"a.textContent.length > {seen} + 200"), timeout=10000)
    assert page.evaluate(AT_BOTTOM)
    wait_done(page)
    assert page.evaluate(AT_BOTTOM), "the final line is in view"
    assert page.evaluate("() => " + IN_VIEW + "('.message.assistant .md-block')")
    watch.check(page)
    context.close()


def test_stopped_and_error_lines_are_scrolled_into_view(browser: Any, live: Live) -> None:
    live.fake.behaviour.reply = LONG
    live.fake.behaviour.chunks = 120
    live.fake.behaviour.chunk_delay = 0.05
    context, page, watch = open_page(browser, live)
    send(page, "Write a lot")
    page.wait_for_function(answer_js("a.textContent.includes('Line 30 ')"), timeout=10000)
    scroll_up(page)
    page.click("#stop")
    page.wait_for_selector(".message .stopped")
    page.wait_for_function("() => " + IN_VIEW + "('.message .stopped')")

    live.fake.behaviour.fail_after = 60
    send(page, "Again, please")
    page.wait_for_function(answer_js("a.textContent.includes('Line 30 ')"), timeout=10000)
    scroll_up(page)
    # The partial answer stays, with the error line under it (issue 15, point 4).
    page.wait_for_selector(".message.failed .error-line", timeout=10000)
    page.wait_for_function("() => " + IN_VIEW + "('.message.failed .error-line')")
    watch.check(page)
    context.close()


# ---- point 5: iOS icon, 320 px --------------------------------------------------------------


def test_ios_icon_and_vendor_files_are_served_with_the_strict_csp(live: Live) -> None:
    from PIL import Image

    for path, (_, kind) in FILES.items():
        with urllib.request.urlopen(live.server.url + path) as response:
            assert response.status == 200, path
            assert response.headers["Content-Type"] == kind
            csp = response.headers["Content-Security-Policy"]
            assert csp == SECURITY_HEADERS["Content-Security-Policy"]
            # Only the version-named libraries may be kept; the page itself is always checked.
            cache = "max-age=31536000, immutable" if path.startswith("/vendor/") else "no-cache"
            assert response.headers["Cache-Control"] == cache, path
            body = response.read()
        if path == "/apple-touch-icon.png":
            with Image.open(io.BytesIO(body)) as icon:
                assert icon.size == (180, 180) and icon.mode == "RGB", "opaque, as iOS wants"
    with urllib.request.urlopen(live.server.url + "/") as response:
        html = response.read().decode()
    scripts = re.findall(r'<script src="([^"]+)" defer></script>', html)
    assert scripts == [
        "/vendor/marked-4.2.3.min.js",
        "/vendor/purify-2.4.1.min.js",
        "/vendor/highlight-9.18.5-common.js",
        "/markdown.js",
        "/app.js",
    ]
    assert all(script in FILES for script in scripts)
    assert '<link rel="apple-touch-icon" href="/apple-touch-icon.png">' in html
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "style-src 'self';" in csp and "unsafe" not in csp
