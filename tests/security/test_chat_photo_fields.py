"""/api/chat's new fields, ``image`` and ``system``, attacked through a real gateway: every bad
value of every field is a 400 with the field's ``param`` and a catalogue code, reaches LM
Studio never, and stores nothing — neither a new conversation nor a turn in an existing one.
The photo is bounded at its limit exactly, the request carrying it by the body limit, and the
photos one conversation keeps (all returned inline when it is read) by a count."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import photo_data_url
from tests.integration.gateway.test_chat_api import call, key_for
from tray_app.gateway.chat_api import MAX_CONVERSATION_IMAGES, MAX_IMAGE_BYTES, MAX_SYSTEM_CHARS

PNG_HEAD = b"\x89PNG\r\n\x1a\n"
GOOD_B64 = photo_data_url().partition(",")[2]


def png_of_size(size: int) -> str:
    data = PNG_HEAD + b"\0" * (size - len(PNG_HEAD))
    return "data:image/png;base64," + base64.b64encode(data).decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# (value, code) for every way an "image" can be wrong.
BAD_IMAGES: dict[str, tuple[object, str]] = {
    "number": (3, "invalid_body"),
    "boolean": (True, "invalid_body"),
    "list": ([photo_data_url()], "invalid_body"),
    "object": ({"url": photo_data_url()}, "invalid_body"),
    "empty": ("", "invalid_image"),
    "https scheme": ("https://example.com/cat.png", "invalid_image"),
    "http scheme": ("http://127.0.0.1:1/cat.png", "invalid_image"),
    "file scheme": ("file:///etc/passwd", "invalid_image"),
    "blob scheme": ("blob:https://example.com/1", "invalid_image"),
    "no comma": ("data:image/png;base64", "invalid_image"),
    "no base64 marker": ("data:image/png," + GOOD_B64, "invalid_image"),
    "a parameter before base64": ("data:image/png;name=a.png;base64," + GOOD_B64, "invalid_image"),
    "no media type": ("data:;base64," + GOOD_B64, "invalid_image"),
    "svg+xml": ("data:image/svg+xml;base64," + b64(b"<svg onload='x'/>"), "image_type_not_allowed"),
    "gif": ("data:image/gif;base64,R0lGODlhAQABAAAAACw=", "image_type_not_allowed"),
    "html": ("data:text/html;base64," + b64(b"<script>x</script>"), "image_type_not_allowed"),
    "upper-case type": ("data:IMAGE/PNG;base64," + GOOD_B64, "image_type_not_allowed"),
    "empty data": ("data:image/png;base64,", "invalid_image"),
    "not base64": ("data:image/png;base64,!!!!" + GOOD_B64, "invalid_image"),
    "padding missing": ("data:image/png;base64,iVBORw0KGgo", "invalid_image"),
    "a space inside": ("data:image/png;base64,iVBO Rw0K", "invalid_image"),
    "a newline at the end": ("data:image/png;base64," + GOOD_B64 + "\n", "invalid_image"),
    "padding only": ("data:image/png;base64,====", "invalid_image"),
    "padding in the middle": ("data:image/png;base64,iV==BORw", "invalid_image"),
    "url-safe alphabet": ("data:image/png;base64,iVBORw0K-_8A", "invalid_image"),
    "a png called a jpeg": ("data:image/jpeg;base64," + GOOD_B64, "invalid_image"),
    "svg called a png": ("data:image/png;base64," + b64(b"<svg onload='x'/>"), "invalid_image"),
    "one byte over the limit": (png_of_size(MAX_IMAGE_BYTES + 1), "image_too_large"),
}
BAD_SYSTEMS: dict[str, object] = {
    "number": 3,
    "float": 1.5,
    "boolean": False,
    "list": ["Be brief."],
    "object": {"content": "Be brief."},
    "one character too long": "s" * (MAX_SYSTEM_CHARS + 1),
}


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory) -> IdentityRig:
    return await start_identity_gateway()


async def post(rig: IdentityRig, key: str, body: dict[str, Any]) -> tuple[int, Any]:
    """A chat request sent as a stream of bytes: a photo at the limit is an 11 MB body."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            rig.url + "/api/chat",
            data=io.BytesIO(json.dumps(body).encode()),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        ) as r,
    ):
        return r.status, json.loads(await r.read())


async def refused(
    rig: IdentityRig, key: str, fake: FakeLMStudio, body: dict[str, Any]
) -> dict[str, Any]:
    before = len(fake.received)
    status, error = await post(rig, key, {"message": "Look", "model": MODELS[0], **body})
    assert status == 400, error
    assert len(fake.received) == before, "nothing reached LM Studio"
    return dict(error["error"])


class TestImageField:
    @pytest.mark.parametrize("case", list(BAD_IMAGES))
    async def test_every_bad_image_is_refused_and_nothing_is_stored(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, case: str
    ) -> None:
        value, code = BAD_IMAGES[case]
        key = key_for(rig)
        error = await refused(rig, key, fake_lmstudio, {"image": value})
        assert (error["code"], error["param"], error["type"]) == (
            code,
            "image",
            "invalid_request_error",
        )
        assert str(value)[:40] not in error["message"] or value == "", "the value is not echoed"
        status, listed, _ = await call(rig, key, "/api/conversations")
        assert status == 200 and listed["data"] == [], "no conversation was made"

    @pytest.mark.parametrize("case", ["svg+xml", "not base64", "one byte over the limit"])
    async def test_a_bad_image_adds_no_turn_to_an_existing_conversation(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, case: str
    ) -> None:
        key = key_for(rig)
        _, first, _ = await call(
            rig, key, "/api/chat", method="POST", body={"message": "Hi", "model": MODELS[0]}
        )
        conversation = first["conversation_id"]
        for flags in ({}, {"retry": True}, {"edit": True}):
            error = await refused(
                rig,
                key,
                fake_lmstudio,
                {"image": BAD_IMAGES[case][0], "conversation_id": conversation, **flags},
            )
            assert error["code"] == BAD_IMAGES[case][1]
        _, full, _ = await call(rig, key, f"/api/conversations/{conversation}")
        assert [(m["content"], m["image"]) for m in full["messages"]] == [
            ("Hi", None),
            ("tok0 tok1 tok2 tok3 tok4", None),
        ]

    async def test_a_photo_of_exactly_the_limit_is_sent(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio
    ) -> None:
        at_limit = png_of_size(MAX_IMAGE_BYTES)
        status, answer = await post(
            rig, key_for(rig), {"message": "Look", "model": MODELS[0], "image": at_limit}
        )
        assert status == 200, answer
        [_, part] = fake_lmstudio.received[-1].json()["messages"][0]["content"]
        assert part == {"type": "image_url", "image_url": {"url": at_limit}}

    async def test_the_request_carrying_a_photo_is_bounded_by_the_body_limit(
        self, start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
    ) -> None:
        rig = await start_identity_gateway(limits_max_body_bytes=64 * 1024)
        status, error, _ = await call(
            rig,
            key_for(rig),
            "/api/chat",
            method="POST",
            body={"message": "Look", "model": MODELS[0], "image": png_of_size(60 * 1024)},
        )
        assert (status, error["error"]["code"]) == (413, "body_too_large")
        assert fake_lmstudio.received == []


class TestPhotosPerConversation:
    """Reading a conversation returns every photo it keeps: so it keeps a bounded number."""

    async def fill(self, rig: IdentityRig, key: str) -> str:
        conversation = None
        for index in range(MAX_CONVERSATION_IMAGES):
            status, answer = await post(
                rig,
                key,
                {
                    "message": f"Photo {index}",
                    "model": MODELS[0],
                    "image": photo_data_url(),
                    **({"conversation_id": conversation} if conversation else {}),
                },
            )
            assert status == 200, (index, answer)  # up to the limit, every photo is taken
            conversation = answer["conversation_id"]
        assert conversation is not None
        return str(conversation)

    async def test_the_photo_after_the_limit_is_refused_and_nothing_is_stored(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio
    ) -> None:
        key = key_for(rig)
        conversation = await self.fill(rig, key)
        for flags in ({}, {"retry": True}):
            error = await refused(
                rig,
                key,
                fake_lmstudio,
                {"image": photo_data_url(), "conversation_id": conversation, **flags},
            )
            assert (error["code"], error["param"], error["type"]) == (
                "too_many_images",
                "image",
                "invalid_request_error",
            )
            assert str(MAX_CONVERSATION_IMAGES) in error["message"]
        _, full, _ = await call(rig, key, f"/api/conversations/{conversation}")
        photos = [m["image"] for m in full["messages"] if m["image"]]
        assert len(photos) == MAX_CONVERSATION_IMAGES
        assert full["messages"][-1]["content"] == "tok0 tok1 tok2 tok3 tok4", "no turn added"

    async def test_a_full_conversation_goes_on_in_words_and_an_edit_may_swap_its_photo(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio
    ) -> None:
        key = key_for(rig)
        conversation = await self.fill(rig, key)
        status, _ = await post(
            rig, key, {"message": "And now?", "model": MODELS[0], "conversation_id": conversation}
        )
        assert status == 200
        status, _ = await post(
            rig,
            key,
            {"message": "Photo 9", "model": MODELS[0], "conversation_id": conversation},
        )
        assert status == 200
        # The last question holds no photo: an edit that adds one would be one too many...
        error = await refused(
            rig,
            key,
            fake_lmstudio,
            {"image": photo_data_url(), "conversation_id": conversation, "edit": True},
        )
        assert error["code"] == "too_many_images"
        # ...but in a fresh conversation the same photo is welcome.
        status, answer = await post(
            rig, key, {"message": "New", "model": MODELS[0], "image": photo_data_url()}
        )
        assert status == 200 and answer["conversation_id"] != conversation

    async def test_an_edit_replacing_the_last_photo_keeps_the_count(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio
    ) -> None:
        key = key_for(rig)
        conversation = await self.fill(rig, key)
        replacement = png_of_size(64)
        status, answer = await post(
            rig,
            key,
            {
                "message": "Photo 9, better",
                "model": MODELS[0],
                "conversation_id": conversation,
                "image": replacement,
                "edit": True,
            },
        )
        assert status == 200, answer
        _, full, _ = await call(rig, key, f"/api/conversations/{conversation}")
        photos = [m["image"] for m in full["messages"] if m["image"]]
        assert len(photos) == MAX_CONVERSATION_IMAGES and photos[-1] == replacement


class TestSystemField:
    @pytest.mark.parametrize("case", list(BAD_SYSTEMS))
    async def test_every_bad_system_prompt_is_refused_and_nothing_is_stored(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio, case: str
    ) -> None:
        key = key_for(rig)
        _, first, _ = await call(
            rig,
            key,
            "/api/chat",
            method="POST",
            body={"message": "Hi", "model": MODELS[0], "system": "Be kind."},
        )
        conversation = first["conversation_id"]
        for body in ({}, {"conversation_id": conversation}):
            error = await refused(rig, key, fake_lmstudio, {"system": BAD_SYSTEMS[case], **body})
            assert (error["code"], error["param"]) == ("invalid_body", "system")
        _, listed, _ = await call(rig, key, "/api/conversations")
        assert [c["id"] for c in listed["data"]] == [conversation]
        _, full, _ = await call(rig, key, f"/api/conversations/{conversation}")
        assert full["system"] == "Be kind." and len(full["messages"]) == 2

    async def test_empty_clears_and_exactly_the_limit_is_sent(
        self, rig: IdentityRig, fake_lmstudio: FakeLMStudio
    ) -> None:
        key = key_for(rig)
        for system, first in (("", "user"), ("s" * MAX_SYSTEM_CHARS, "system")):
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    rig.url + "/api/chat",
                    headers={"Authorization": f"Bearer {key}"},
                    json={"message": "Hi", "model": MODELS[0], "system": system},
                ) as r,
            ):
                assert r.status == 200
            assert fake_lmstudio.received[-1].json()["messages"][0]["role"] == first
