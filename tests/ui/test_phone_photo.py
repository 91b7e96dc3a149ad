"""The phone page's photo attach and per-conversation system prompt, in Debian's Chromium at
phone viewports (390x844 and 320 wide) against a live gateway and the fake LM Studio.

A real 3000x2000 PNG made by Pillow goes through the page's file input; what LM Studio received
is decoded to prove the page resized it. Every page watches for console errors, CSP violations
and requests to other origins. Screenshots: docs/screenshots/phone-photo.png and
phone-system-prompt.png (LMGATE_UPDATE_DOCS=1).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from tests.ui import test_phone_page
from tests.ui.test_phone_actions import bubbles, token_fetch
from tests.ui.test_phone_markdown import open_page, send, shot, wait_done
from tests.ui.test_phone_page import Live
from tests.ui.test_phone_page import shot as artifact

browser = test_phone_page.browser
live = test_phone_page.live


def big_png(folder: Path, width: int = 3000, height: int = 2000) -> Path:
    """A photo-sized PNG with something to see: sky, a sun, a hill, a house."""
    image = Image.new("RGB", (width, height), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.7, height * 0.1, width * 0.85, height * 0.32), fill=(250, 204, 21))
    draw.ellipse((-width * 0.2, height * 0.55, width * 1.2, height * 1.6), fill=(34, 139, 34))
    draw.rectangle((width * 0.3, height * 0.45, width * 0.5, height * 0.7), fill=(180, 83, 9))
    draw.polygon(
        [(width * 0.27, height * 0.46), (width * 0.4, height * 0.3), (width * 0.53, height * 0.46)],
        fill=(153, 27, 27),
    )
    path = folder / "photo.png"
    image.save(path)
    return path


def image_parts(live: Live) -> list[str]:
    """The photos in the last request LM Studio received, in order."""
    return [
        part["image_url"]["url"]
        for message in live.fake.received[-1].json()["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]


def decoded(url: str) -> Image.Image:
    head, _, data = url.partition(",")
    assert head == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def attach(page: Any, path: Path) -> None:
    page.set_input_files("#photo-input", str(path))
    page.wait_for_selector("#photo-preview:not([hidden])", timeout=10000)


def test_a_photo_is_resized_sent_shown_and_kept_after_a_reload(
    browser: Any, live: Live, tmp_path: Path
) -> None:
    live.fake.behaviour.chunks = 3
    live.fake.behaviour.reply = "A small house with a red roof on a green hill, under a sunny sky."
    context, page, watch = open_page(browser, live)
    assert page.get_attribute("#photo-input", "accept") == "image/*"
    assert page.is_visible("#attach")
    attach(page, big_png(tmp_path))
    thumb = page.get_attribute("#photo-thumb", "src")
    assert thumb is not None and thumb.startswith("data:image/jpeg;base64,")
    send(page, "What is in this photo?")
    wait_done(page)

    [sent] = image_parts(live)
    with decoded(sent) as received:
        assert received.format == "JPEG"
        assert received.size == (1280, 853), "resized on the phone, the longest side 1280 px"
    assert len(base64.b64decode(sent.partition(",")[2])) < 400_000
    assert page.is_hidden("#photo-preview"), "the attachment went with the message"
    # The next one, attached and not yet sent: its thumbnail and remove button by the composer.
    attach(page, big_png(tmp_path, 2400, 2400))
    page.fill("#input", "And this one?")
    shot(page, "phone-photo")
    page.click("#photo-remove")
    page.fill("#input", "")

    page.reload()
    page.wait_for_selector(".message.user img.photo")
    page.wait_for_function("() => document.querySelector('img.photo').naturalWidth === 1280")
    assert bubbles(page)[0] == ("message user", "What is in this photo?")
    # An answer that names a remote image next to the photo: only the photo is an <img>.
    live.fake.behaviour.reply = "Blue, yellow and green. ![x](https://example.com/a.png)"
    send(page, "And the colours?")
    wait_done(page)
    assert image_parts(live) == [sent], "a follow-up question still sends the photo"
    shown = page.eval_on_selector_all(
        "#messages img", "els => els.map(e => [e.className, e.src.slice(0, 23), e.naturalWidth])"
    )
    assert shown == [["photo", "data:image/jpeg;base64,", 1280]], "no remote image is loaded"
    (conversation,) = page.evaluate(token_fetch("/api/conversations"))["data"]
    full = page.evaluate(token_fetch(f"/api/conversations/{conversation['id']}"))
    assert [m["image"] for m in full["messages"]] == [sent, None, None, None]
    watch.check(page)
    context.close()


def test_at_320_wide_a_photo_can_be_removed_and_regenerate_keeps_it(
    browser: Any, live: Live, tmp_path: Path
) -> None:
    live.fake.behaviour.chunks = 2
    context, page, watch = open_page(browser, live, width=320, height=640)
    photo = big_png(tmp_path, 2000, 3000)  # portrait: the height is the longest side
    attach(page, photo)
    assert page.evaluate("document.documentElement.scrollWidth") <= 320
    page.click("#photo-remove")
    assert page.is_hidden("#photo-preview")
    send(page, "No photo here")
    wait_done(page)
    assert image_parts(live) == []

    attach(page, photo)
    send(page, "This one")
    wait_done(page)
    [sent] = image_parts(live)
    with decoded(sent) as received:
        assert received.size == (853, 1280)
    assert page.evaluate("document.documentElement.scrollWidth") <= 320, "nothing overflows"
    assert (
        page.evaluate(
            "(() => { const m = document.getElementById('messages');"
            " return m.scrollHeight - m.scrollTop - m.clientHeight; })()"
        )
        < 24
    ), "the thread still follows the answer after the photo took its height"
    artifact(page, "photo-320")  # test-artifacts/ only
    page.click(".tools .regenerate")
    wait_done(page)
    assert image_parts(live) == [sent], "the regenerated turn keeps its photo"
    page.click(".tools .edit")
    page.fill("#input", "This one, again")
    page.click("#send")
    wait_done(page)
    assert image_parts(live) == [sent], "an edited question keeps its photo"
    assert page.locator(".message.user img.photo").count() == 1
    watch.check(page)
    context.close()


def test_a_model_that_cannot_see_is_said_in_phone_words(
    browser: Any, live: Live, tmp_path: Path
) -> None:
    context, page, watch = open_page(browser, live)
    live.fake.behaviour.status = 400
    live.fake.behaviour.error_body = (
        b'{"error":"Model does not support images. Please use a model that does."}'
    )
    attach(page, big_png(tmp_path, 600, 400))
    send(page, "What is this?")
    page.wait_for_selector(".message.error")
    text = page.inner_text(".message.error")
    assert text.startswith("This model can't see photos."), text
    assert page.is_visible("#retry")
    live.fake.behaviour.status = None
    page.click("#retry")
    wait_done(page)
    assert len(image_parts(live)) == 1, "Retry sends the photo again"
    assert page.locator(".message.user img.photo").count() == 1
    assert all("400" in e for e in watch.errors), watch.errors  # the browser's own line
    watch.errors.clear()
    watch.check(page)
    context.close()


def system_of(live: Live) -> Any:
    first = live.fake.received[-1].json()["messages"][0]
    return first["content"] if first["role"] == "system" else None


def test_a_system_prompt_is_set_sent_first_and_survives_a_reload(browser: Any, live: Live) -> None:
    live.fake.behaviour.chunks = 3
    live.fake.behaviour.reply = "Bonjour ! Je réponds en français."
    context, page, watch = open_page(browser, live)
    posted: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: posted.append(json.loads(r.post_data)) if r.url.endswith("/api/chat") else None,
    )
    assert page.get_attribute("#system-button", "class") in (None, "")
    page.click("#system-button")
    assert page.input_value("#system-input") == "", "none by default"
    page.fill("#system-input", "Answer in French, in one sentence.")
    page.click("#system-done")
    assert page.is_hidden("#system-panel")
    assert "set" in (page.get_attribute("#system-button", "class") or "")
    send(page, "Hello")
    wait_done(page)
    assert system_of(live) == "Answer in French, in one sentence."

    page.reload()
    page.wait_for_selector(".message.assistant")
    assert "set" in (page.get_attribute("#system-button", "class") or "")
    page.click("#system-button")
    assert page.input_value("#system-input") == "Answer in French, in one sentence."
    assert page.get_by_role("button", name="System prompt (set)").is_visible()
    shot(page, "phone-system-prompt")
    live.fake.behaviour.reply = "Hallo! Ich antworte auf Deutsch."
    page.fill("#system-input", "Answer in German.")
    page.click("#system-done")
    send(page, "Again")
    wait_done(page)
    assert system_of(live) == "Answer in German.", "an edit applies to the next turn"
    assert [m["role"] for m in live.fake.received[-1].json()["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    send(page, "Once more")
    wait_done(page)
    assert "system" not in posted[-1], "unchanged, it is not sent: another tab's edit stays"
    assert posted[-2]["system"] == "Answer in German."
    assert system_of(live) == "Answer in German.", "the server keeps sending it"

    page.click("#new-chat")
    assert "set" not in (page.get_attribute("#system-button", "class") or "")
    send(page, "Fresh")
    wait_done(page)
    assert system_of(live) is None, "a new chat starts without one"
    watch.check(page)
    context.close()


def test_at_320_wide_the_header_leaves_the_model_name_readable(browser: Any, live: Live) -> None:
    context, page, watch = open_page(browser, live, width=320, height=640)
    assert page.evaluate("document.documentElement.scrollWidth") <= 320
    for name in ("Conversations", "New chat", "System prompt"):
        button = page.get_by_role("button", name=name, exact=True)
        box = button.bounding_box()
        assert box is not None and box["height"] >= 44 and box["x"] + box["width"] <= 320, name
    assert page.is_hidden("#new-chat .label") and page.is_visible("#new-chat .icon")
    model = page.locator("#model")
    assert model.input_value() == "qwen2.5-7b-instruct"
    # The name's own width, in the menu's font, fits the menu beside its arrow.
    fits = page.evaluate(
        "(s => { const c = document.createElement('canvas').getContext('2d');"
        " c.font = getComputedStyle(s).font; return [c.measureText(s.value).width,"
        " s.getBoundingClientRect().width]; })(document.querySelector('#model'))"
    )
    assert fits[0] + 28 <= fits[1], fits
    artifact(page, "header-320")  # test-artifacts/ only
    page.set_viewport_size({"width": 800, "height": 844})  # room enough for the words
    assert page.is_visible("#new-chat .label") and page.is_hidden("#new-chat .icon")
    watch.check(page)
    context.close()


def test_at_320_wide_the_system_prompt_panel_fits(browser: Any, live: Live) -> None:
    context, page, watch = open_page(browser, live, width=320, height=640)
    page.click("#system-button")
    page.fill("#system-input", "Be brief.")
    assert page.evaluate("document.documentElement.scrollWidth") <= 320
    artifact(page, "system-prompt-320")
    box = page.locator("#system-button").bounding_box()
    assert box is not None and box["x"] + box["width"] <= 320 and box["height"] >= 44
    page.click("#system-clear")
    page.click("#system-done")
    assert "set" not in (page.get_attribute("#system-button", "class") or "")
    watch.check(page)
    context.close()
