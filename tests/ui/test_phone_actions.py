"""The phone page keeps what was said when something fails, and offers the everyday actions.

Debian's Chromium at a phone viewport against a live gateway and the fake LM Studio (which can
break a stream mid-way, or be switched off). Every page watches for console errors, CSP
violations and requests to other origins (tests/ui/test_phone_markdown.py's ``open_page``).
Screenshots: docs/screenshots/phone-*.png (LMGATE_UPDATE_DOCS=1).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.fake_lmstudio import MODELS
from tests.ui import test_phone_page
from tests.ui.test_phone_markdown import open_page, send, shot, wait_done
from tests.ui.test_phone_page import PHONE, Live

browser = test_phone_page.browser
live = test_phone_page.live


def bubbles(page: Any) -> list[tuple[str, str]]:
    """Each bubble's classes and text (an answer's text without its error line)."""
    shown = page.eval_on_selector_all(
        "#messages .message",
        "els => els.map(e => [e.className, e.querySelector('.answer') ?"
        " e.querySelector('.answer').innerText.trim() : e.innerText.trim()])",
    )
    return [(kind, text) for kind, text in shown]


# ---- point 4: failures keep what was said ---------------------------------------------------


STORY = (
    "Once upon a time, a lighthouse keeper found a bottle on the rocks. Inside was a note "
    "in a child's hand: please keep the light on, my father sails home tonight."
)


def test_a_broken_stream_keeps_its_partial_answer_and_retry_sends_the_turn_once(
    browser: Any, live: Live
) -> None:
    live.fake.behaviour.reply = STORY
    live.fake.behaviour.chunks = 8
    live.fake.behaviour.chunk_delay = 0.02
    live.fake.behaviour.fail_after = 3
    context, page, watch = open_page(browser, live)
    send(page, "Tell me a story")
    page.wait_for_selector(".message.failed .error-line", timeout=10000)
    answer = page.locator(".message.assistant").last
    partial = STORY[: 3 * -(-len(STORY) // 8)].strip()  # the fake's first three pieces
    assert answer.locator(".answer").inner_text().strip() == partial, "the answer stays"
    line = answer.locator(".error-line")
    assert "broke off" in line.inner_text() and "Retry" in line.inner_text()
    assert page.is_visible("#retry")
    shot(page, "phone-broken-stream")

    live.fake.behaviour.fail_after = None
    page.click("#retry")
    wait_done(page)
    assert bubbles(page) == [
        ("message user", "Tell me a story"),
        ("message assistant", STORY),
    ], "the partial answer is replaced, the question is not repeated"
    sent = live.fake.received[-1].json()["messages"]
    assert sent == [{"role": "user", "content": "Tell me a story"}], "LM Studio saw one turn"
    page.reload()
    page.wait_for_selector("#chat-screen:not([hidden])")
    page.click("#conversations-button")
    page.click("text=Tell me a story")
    page.wait_for_selector(".message.assistant")
    assert bubbles(page) == [
        ("message user", "Tell me a story"),
        ("message assistant", STORY),
    ], "the server kept the turn once, with its whole answer"
    watch.check(page)
    context.close()


def test_lmstudio_being_off_is_said_to_the_phones_user(browser: Any, live: Live) -> None:
    context, page, watch = open_page(browser, live)
    live.thread.submit(live.fake.stop()).result(5)
    send(page, "Are you there?")
    page.wait_for_selector(".message.error")
    text = page.inner_text(".message.error")
    assert text.startswith("The computer's LM Studio is off."), text
    assert "Developer" not in text and "upstream" not in text
    assert page.is_visible("#retry")
    assert bubbles(page)[0] == ("message user", "Are you there?"), "the question stays"
    shot(page, "phone-lmstudio-off")
    # Retrying while it is still off stores nothing twice: the conversation holds one question.
    page.click("#retry")
    page.wait_for_selector(".message.error")
    assert [kind for kind, _ in bubbles(page)] == ["message user", "message error failed"]
    conversations = page.evaluate(
        "fetch('/api/conversations', {headers: {Authorization: 'Bearer ' +"
        " localStorage.getItem('lmgate.token')}}).then(r => r.json())"
        ".then(j => Promise.all(j.data.map(c => fetch('/api/conversations/' + c.id,"
        " {headers: {Authorization: 'Bearer ' + localStorage.getItem('lmgate.token')}})"
        ".then(r => r.json()))))"
    )
    assert [[m["content"] for m in c["messages"]] for c in conversations] == [["Are you there?"]]
    # Console errors here are the browser's own lines about the failed requests (502).
    assert all("502" in e for e in watch.errors), watch.errors
    watch.errors.clear()
    watch.check(page)
    context.close()


def test_a_new_pairing_link_pairs_a_tab_that_already_shows_the_page(
    browser: Any, live: Live
) -> None:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(live.server.url + "/")
    page.wait_for_selector("#pair-screen:not([hidden])")
    assert "Show QR code…" in page.inner_text("#pair-message")
    assert "lmgate pair" in page.inner_text("#pair-headless"), "a host without a tray too"
    code, _ = live.identity.pairing.create_code()
    page.goto(f"{live.server.url}/#{code}")  # same document: only the fragment changes
    page.wait_for_selector("#chat-screen:not([hidden])", timeout=10000)
    assert "#" not in page.url, "the code left the address bar"
    assert page.evaluate("localStorage.getItem('lmgate.token')").count(".") == 2
    # The model list arrives by its own request after the chat screen shows.
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    context.close()


# ---- point 3: the everyday actions ----------------------------------------------------------


def token_fetch(path: str) -> str:
    return (
        f"fetch('{path}', {{headers: {{Authorization: 'Bearer ' +"
        " localStorage.getItem('lmgate.token')}}).then(r => r.json())"
    )


def test_copy_a_message_and_regenerate_the_last_answer(browser: Any, live: Live) -> None:
    live.fake.behaviour.chunks = 3
    live.fake.behaviour.reply = "Hello! How can I help?"
    context, page, watch = open_page(browser, live)
    send(page, "Hello")
    wait_done(page)
    live.fake.behaviour.reply = "Here it is: **Hello!**"
    send(page, "Say it in **bold**")
    wait_done(page)
    assert page.locator(".tools .regenerate").count() == 1, "only under the last answer"

    mine = page.locator(".tools.user .copy-message").last
    mine.click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.tools.user .copy-message')].pop().textContent"
        " === 'Copied'"
    )
    assert page.evaluate("navigator.clipboard.readText()") == "Say it in **bold**"
    answer_copy = page.locator(".tools.assistant .copy-message").last
    answer_copy.click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.tools.assistant .copy-message')].pop()"
        ".textContent === 'Copied'"
    )
    assert page.evaluate("navigator.clipboard.readText()") == "Here it is: Hello!"
    shot(page, "phone-actions")

    live.fake.behaviour.reply = "A **better** answer"
    live.fake.behaviour.chunks = 2
    page.click(".tools .regenerate")
    wait_done(page)
    assert bubbles(page) == [
        ("message user", "Hello"),
        ("message assistant", "Hello! How can I help?"),
        ("message user", "Say it in **bold**"),
        ("message assistant", "A better answer"),
    ], "the last answer is replaced, the question not repeated"
    assert page.locator(".message.assistant").last.locator("strong").inner_text() == "better"
    sent = live.fake.received[-1].json()["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("user", "Hello"),
        ("assistant", "Hello! How can I help?"),
        ("user", "Say it in **bold**"),
    ]
    (conversation,) = page.evaluate(token_fetch("/api/conversations"))["data"]
    full = page.evaluate(token_fetch(f"/api/conversations/{conversation['id']}"))
    assert [m["content"] for m in full["messages"]] == [
        "Hello",
        "Hello! How can I help?",
        "Say it in **bold**",
        "A **better** answer",
    ], "replaced on the server too"
    assert page.locator(".tools .regenerate").count() == 1
    watch.check(page)
    context.close()


def test_the_last_conversation_is_resumed_after_a_reload(browser: Any, live: Live) -> None:
    live.fake.behaviour.chunks = 2
    context, page, watch = open_page(browser, live)
    send(page, "Remember me")
    wait_done(page)
    page.reload()
    page.wait_for_selector(".message.assistant")
    assert bubbles(page) == [("message user", "Remember me"), ("message assistant", "tok0 tok1")]
    send(page, "Still here?")
    wait_done(page)
    sent = live.fake.received[-1].json()["messages"]
    assert [m["content"] for m in sent] == ["Remember me", "tok0 tok1 ", "Still here?"]

    page.click("#new-chat")
    page.reload()
    page.wait_for_selector("#chat-screen:not([hidden])")
    page.wait_for_function("() => document.querySelector('#conversation-list li')")
    assert page.locator("#messages .message").count() == 0, "New chat stays new"
    watch.check(page)
    context.close()


def test_deleting_a_conversation_asks_inline_first(browser: Any, live: Live) -> None:
    live.fake.behaviour.chunks = 2
    live.fake.behaviour.reply = "A good book, a plant, or a day out together."
    context, page, watch = open_page(browser, live)
    dialogs: list[str] = []

    def refuse(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", refuse)
    send(page, "Birthday present ideas")
    wait_done(page)
    page.click("#conversations-button")
    page.click("[aria-label='Delete Birthday present ideas']")
    row = page.locator("#conversation-list li.confirming")
    assert row.locator(".question").inner_text() == "Delete “Birthday present ideas”?"
    shot(page, "phone-delete-confirm")
    row.locator(".cancel-delete").click()
    assert page.locator("#conversation-list .open").all_inner_texts() == ["Birthday present ideas"]
    assert len(page.evaluate(token_fetch("/api/conversations"))["data"]) == 1, "nothing deleted"

    page.click("[aria-label='Delete Birthday present ideas']")
    page.click("#conversation-list .confirm-delete")
    page.wait_for_function(
        "() => document.querySelector('#conversation-list').textContent === 'No conversations yet.'"
    )
    assert page.evaluate(token_fetch("/api/conversations"))["data"] == []
    assert page.locator("#messages .message").count() == 0, "the open one was closed"
    assert dialogs == [], "no window.confirm"
    watch.check(page)
    context.close()


def test_conversation_titles_show_when_they_were_used(browser: Any, live: Live) -> None:
    live.fake.behaviour.chunks = 2
    context = browser.new_context(
        viewport=PHONE, is_mobile=True, has_touch=True, locale="en-GB", timezone_id="UTC"
    )
    page = context.new_page()
    page.goto(live.qr_url())
    page.wait_for_selector("#chat-screen:not([hidden])", timeout=10000)
    send(page, "Plan a trip")
    wait_done(page)
    (conversation,) = page.evaluate(token_fetch("/api/conversations"))["data"]
    used = datetime.fromtimestamp(conversation["updated"], UTC)
    date = page.locator("#conversation-list time")
    assert date.get_attribute("datetime") == used.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert date.inner_text() == used.strftime("%H:%M"), "today: the time"
    for later, shown in (
        (timedelta(days=1), used.strftime("Yesterday %H:%M")),
        (timedelta(days=3), f"{used.day} {used:%b}"),
        (timedelta(days=400), f"{used.day} {used:%b} {used.year}"),
    ):
        if later.days == 3 and (used + later).year != used.year:
            shown = f"{used.day} {used:%b} {used.year}"
        page.clock.set_fixed_time(used + later)
        page.reload()
        page.wait_for_selector("#conversation-list time", state="attached")
        assert page.text_content("#conversation-list time") == shown
    context.close()


class ShiftedClock:
    """The gateway's wall clock, moved back by ``offset`` seconds: conversations used on other
    days, made through the page as a person made them then. Durations stay real."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


def test_the_conversation_list_as_a_user_sees_it(browser: Any, tmp_path: Path, qapp: Any) -> None:
    clock = ShiftedClock()
    rig = Live(tmp_path, clock=clock, server_shutdown_grace=1)
    try:
        rig.fake.behaviour.chunks = 2
        rig.fake.behaviour.reply = "Sure, here you go."
        context = browser.new_context(
            viewport=PHONE, is_mobile=True, has_touch=True, locale="en-GB", timezone_id="UTC"
        )
        page = context.new_page()
        page.goto(rig.qr_url())
        page.wait_for_selector("#chat-screen:not([hidden])", timeout=10000)
        day = 24 * 3600
        used = {
            "Plan a weekend in Lyon": 40 * day,
            "Translate a letter to my landlord": 6 * day,
            "A quick dinner with what is in the fridge": 1 * day,
            "Explain how vaccines work": 0,
        }
        for title, ago in used.items():
            clock.offset = -ago
            page.click("#new-chat")
            send(page, title)
            wait_done(page)
        page.click("#conversations-button")
        page.wait_for_function(
            "() => document.querySelectorAll('#conversation-list .open').length === 4"
        )
        rows = page.eval_on_selector_all(
            "#conversation-list li",
            "els => els.map(e => [e.querySelector('.open').textContent,"
            " e.querySelector('time').textContent])",
        )
        stored = page.evaluate(token_fetch("/api/conversations"))["data"]
        now = datetime.now(UTC)
        expected = []
        for conversation in stored:
            d = datetime.fromtimestamp(conversation["updated"], UTC)
            if d.date() == now.date():
                shown = d.strftime("%H:%M")
            elif d.date() == (now - timedelta(days=1)).date():
                shown = d.strftime("Yesterday %H:%M")
            else:
                shown = f"{d.day} {d:%b}" + ("" if d.year == now.year else f" {d.year}")
            expected.append((conversation["title"], shown))
        assert [title for title, _ in expected] == list(used)[::-1], "newest first"
        assert [tuple(row) for row in rows] == expected
        assert page.locator("#conversation-list .current").inner_text() == (
            "Explain how vaccines work"
        )
        shot(page, "phone-conversation-list")
        context.close()
    finally:
        rig.close()


def test_no_model_loaded_is_said_only_when_the_page_sent_none(browser: Any, live: Live) -> None:
    no_model = "No model is loaded in the computer's LM Studio. Ask its owner to load one."
    live.fake.behaviour.models = ()
    context, page, watch = open_page(browser, live)
    posted: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: posted.append(json.loads(r.post_data)) if r.url.endswith("/api/chat") else None,
    )
    assert page.inner_text("#notice") == no_model
    send(page, "Hello")
    page.wait_for_selector(".message.error")
    assert "model" not in posted[-1], "an empty menu names no model"
    assert page.inner_text(".message.error") == no_model, "the gateway's missing_model"
    assert not [r for r in live.fake.received if r.path == "/v1/chat/completions"]

    # A message that named its model and still got missing_model (LM Studio's own answer to a
    # request without one): "no model loaded" would send its owner looking in the wrong place.
    live.fake.behaviour.models = MODELS
    page.click("#new-chat")
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    live.fake.behaviour.status = 400  # from now on: after the model list was read
    live.fake.behaviour.error_body = json.dumps(
        {"error": {"message": "No model specified.", "code": "missing_model"}}
    ).encode()
    send(page, "Hello again")
    page.wait_for_selector(".message.error")
    assert posted[-1]["model"] == MODELS[0]
    text = page.inner_text(".message.error")
    assert text.startswith("The computer's LM Studio says no model was chosen."), text
    assert "loaded" not in text
    assert all("400" in e for e in watch.errors), watch.errors  # the browser's own lines
    watch.errors.clear()
    watch.check(page)
    context.close()


def test_edit_and_resend_the_last_question(browser: Any, live: Live) -> None:
    live.fake.behaviour.chunks = 2
    context, page, watch = open_page(browser, live)
    send(page, "Hello")
    wait_done(page)
    send(page, "Whats 2+2")
    wait_done(page)
    assert page.locator(".tools .edit").count() == 1, "only under the last question"
    page.click(".tools .edit")
    assert page.input_value("#input") == "Whats 2+2"
    page.click("#cancel-edit")
    assert page.input_value("#input") == "" and not page.is_visible("#cancel-edit")
    page.click(".tools .edit")
    live.fake.behaviour.reply = "Four."
    live.fake.behaviour.chunks = 1
    send(page, "What's 2+2?")
    wait_done(page)
    assert bubbles(page) == [
        ("message user", "Hello"),
        ("message assistant", "tok0 tok1"),
        ("message user", "What's 2+2?"),
        ("message assistant", "Four."),
    ]
    sent = live.fake.received[-1].json()["messages"]
    assert [m["content"] for m in sent] == ["Hello", "tok0 tok1 ", "What's 2+2?"]
    (conversation,) = page.evaluate(token_fetch("/api/conversations"))["data"]
    full = page.evaluate(token_fetch(f"/api/conversations/{conversation['id']}"))
    assert [m["content"] for m in full["messages"]] == [
        "Hello",
        "tok0 tok1 ",
        "What's 2+2?",
        "Four.",
    ]
    watch.check(page)
    context.close()
