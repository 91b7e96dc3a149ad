"""/api/chat's photo and system prompt rules, without sockets: the data URL check, which photos
are resent, and where the system prompt goes."""

from __future__ import annotations

import base64
from typing import ClassVar

import pytest

from tests.helpers import photo_data_url
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.chat_api import (
    MAX_SYSTEM_CHARS,
    OLDER_PHOTO_NOTE,
    parse_image,
    parse_system,
    wire_messages,
)
from tray_app.storage.conversations import Message, up_to_last_turn

PNG = base64.b64decode(photo_data_url().partition(",")[2])


def png_of_size(size: int) -> str:
    """A data URL holding exactly ``size`` bytes that start like a PNG."""
    data = PNG[:8] + b"\0" * (size - 8)
    return "data:image/png;base64," + base64.b64encode(data).decode()


def refused(value: object, max_bytes: int = 1000) -> tuple[str, str | None]:
    with pytest.raises(ApiError) as caught:
        parse_image(value, max_bytes)
    assert caught.value.status == 400
    return caught.value.code, caught.value.param


class TestParseImage:
    @pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP"])
    def test_real_images_of_each_allowed_type_pass_unchanged(self, kind: str) -> None:
        url = photo_data_url(kind=kind)
        assert parse_image(url) == url

    def test_no_photo_is_none(self) -> None:
        assert parse_image(None) is None

    @pytest.mark.parametrize(
        ("value", "code"),
        [
            (3, "invalid_body"),
            (True, "invalid_body"),
            ([photo_data_url()], "invalid_body"),
            ({"url": photo_data_url()}, "invalid_body"),
            ("", "invalid_image"),
            ("https://example.com/cat.png", "invalid_image"),
            ("blob:https://x/1", "invalid_image"),
            ("javascript:alert(1)", "invalid_image"),
            ("data:image/png", "invalid_image"),
            ("data:image/png," + photo_data_url().partition(",")[2], "invalid_image"),
            ("data:image/png;charset=utf-8;base64,AAAA", "invalid_image"),
            ("data:;base64,AAAA", "invalid_image"),
            (" data:image/png;base64,AAAA", "invalid_image"),
            (
                "data:image/svg+xml;base64," + base64.b64encode(b"<svg/>").decode(),
                "image_type_not_allowed",
            ),
            ("data:image/gif;base64,R0lGODlhAQABAAAAACw=", "image_type_not_allowed"),
            ("data:text/html;base64,PGgxPg==", "image_type_not_allowed"),
            ("data:IMAGE/PNG;base64,AAAA", "image_type_not_allowed"),
            ("data:image/png;base64,", "invalid_image"),
            ("data:image/png;base64,!!!!", "invalid_image"),
            ("data:image/png;base64,iVBORw0KGgo", "invalid_image"),  # padding missing
            ("data:image/png;base64,iVBO Rw0K", "invalid_image"),
            ("data:image/png;base64,iVBORw0KGgo=\n", "invalid_image"),
            ("data:image/png;base64,====", "invalid_image"),
            ("data:image/png;base64,iV=BORw0", "invalid_image"),
            ("data:image/png;base64,iVBORw0KGgo-_A=", "invalid_image"),  # the URL alphabet
            ("data:image/jpeg" + photo_data_url()[len("data:image/png") :], "invalid_image"),
            (
                "data:image/png;base64," + base64.b64encode(b"<svg onload=x>").decode(),
                "invalid_image",
            ),
        ],
    )
    def test_bad_values_are_refused_with_the_image_param(self, value: object, code: str) -> None:
        assert refused(value) == (code, "image")

    def test_at_the_limit_passes_and_one_byte_over_is_refused(self) -> None:
        for limit in (1000, 1001, 1002):  # every remainder of the base64 length
            assert parse_image(png_of_size(limit), limit) == png_of_size(limit)
            assert refused(png_of_size(limit + 1), limit) == ("image_too_large", "image")

    def test_a_huge_value_is_refused_before_it_is_decoded(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def never(*_: object, **__: object) -> bytes:
            raise AssertionError("decoded")

        monkeypatch.setattr(base64, "b64decode", never)
        assert refused("data:image/png;base64," + "A" * 4000, 1000) == ("image_too_large", "image")


class TestParseSystem:
    def test_absent_leaves_it_and_empty_clears_it(self) -> None:
        assert parse_system(None) is None
        assert parse_system("") == ""
        assert parse_system("  \n ") == ""
        assert parse_system("  Be brief.  ") == "Be brief."

    @pytest.mark.parametrize("value", [3, 1.5, True, [], ["Be brief."], {"text": "x"}])
    def test_not_a_string_is_refused(self, value: object) -> None:
        with pytest.raises(ApiError) as caught:
            parse_system(value)
        assert (caught.value.code, caught.value.param) == ("invalid_body", "system")

    def test_at_the_limit_passes_and_one_over_is_refused(self) -> None:
        assert parse_system("s" * MAX_SYSTEM_CHARS) == "s" * MAX_SYSTEM_CHARS
        with pytest.raises(ApiError) as caught:
            parse_system("s" * (MAX_SYSTEM_CHARS + 1))
        assert (caught.value.code, caught.value.param) == ("invalid_body", "system")


def photo(n: int) -> str:
    return f"data:image/png;base64,{n}"


class TestWireMessages:
    def test_the_system_prompt_goes_first_and_none_sends_no_system_message(self) -> None:
        turns = [Message("user", "hi", None, 0)]
        assert wire_messages("Be brief.", turns) == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ]
        assert wire_messages("", turns) == [{"role": "user", "content": "hi"}]

    def test_a_photo_is_an_image_part_after_the_text(self) -> None:
        assert wire_messages("", [Message("user", "What is it?", None, 0, photo(1))]) == [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": photo(1)}},
                ],
            }
        ]

    def test_only_the_newest_photos_are_resent_and_older_ones_become_a_note(self) -> None:
        turns = []
        for n in range(5):
            turns += [
                Message("user", f"q{n}", None, 0, photo(n)),
                Message("assistant", "a", None, 0),
            ]
        sent = wire_messages("", turns, max_images=3)
        images = [
            part["image_url"]["url"]
            for m in sent
            if isinstance(m["content"], list)
            for part in m["content"]
            if part["type"] == "image_url"
        ]
        assert images == [photo(2), photo(3), photo(4)]
        assert sent[0]["content"] == f"q0\n\n{OLDER_PHOTO_NOTE}"
        assert sent[2]["content"] == f"q1\n\n{OLDER_PHOTO_NOTE}"
        assert all(m["content"] == "a" for m in sent[1::2])


class TestTurnsKeepTheirPhoto:
    history: ClassVar[list[Message]] = [
        Message("user", "What is this?", None, 1, photo(1)),
        Message("assistant", "A cat.", None, 2),
    ]

    def test_a_retry_keeps_the_stored_photo(self) -> None:
        again = up_to_last_turn(self.history, "What is this?")
        assert again is not None and again[-1].image == photo(1)

    def test_an_edit_keeps_the_photo_unless_it_brings_a_new_one(self) -> None:
        edited = up_to_last_turn(self.history, "What breed?", replace=True)
        assert edited is not None and (edited[-1].content, edited[-1].image) == (
            "What breed?",
            photo(1),
        )
        new = up_to_last_turn(self.history, "And this?", replace=True, image=photo(2))
        assert new is not None and new[-1].image == photo(2)
