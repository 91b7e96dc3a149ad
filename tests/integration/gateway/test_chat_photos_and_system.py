"""Photos and the per-conversation system prompt through a real gateway and the fake LM Studio:
the exact messages LM Studio receives, what the history keeps, and what a retry, an edit and a
regenerate send again."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import photo_data_url
from tests.integration.gateway.test_chat_api import call, key_for
from tray_app.gateway.chat_api import (
    MAX_CONVERSATION_IMAGES,
    MAX_IMAGE_BYTES,
    MAX_MESSAGE_CHARS,
    MAX_SYSTEM_CHARS,
    OLDER_PHOTO_NOTE,
)


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory) -> IdentityRig:
    return await start_identity_gateway()


def with_photo(text: str, url: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]


async def chat(rig: IdentityRig, key: str, **body: Any) -> dict[str, Any]:
    body.setdefault("model", MODELS[0])
    status, answer, _ = await call(rig, key, "/api/chat", method="POST", body=body)
    assert status == 200, answer
    return dict(answer)


async def history(rig: IdentityRig, key: str, conversation: str) -> dict[str, Any]:
    status, full, _ = await call(rig, key, f"/api/conversations/{conversation}")
    assert status == 200
    return dict(full)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_photo_reaches_lm_studio_as_an_image_part_and_stays_in_the_history(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio, stream: bool
) -> None:
    key = key_for(rig)
    photo = photo_data_url(kind="JPEG")
    status, first, headers = await call(
        rig,
        key,
        "/api/chat",
        method="POST",
        body={"message": "What is this?", "image": photo, "model": MODELS[0], "stream": stream},
    )
    assert status == 200
    conversation = first["conversation_id"] if not stream else headers["X-Conversation-ID"]
    assert fake_lmstudio.received[-1].json()["messages"] == [
        {"role": "user", "content": with_photo("What is this?", photo)}
    ]
    full = await history(rig, key, conversation)
    assert [(m["role"], m["image"]) for m in full["messages"]] == [
        ("user", photo),
        ("assistant", None),
    ]
    # A follow-up question about the photo still sends it.
    await chat(rig, key, message="What colour?", conversation_id=conversation)
    sent = fake_lmstudio.received[-1].json()["messages"]
    assert sent[0] == {"role": "user", "content": with_photo("What is this?", photo)}
    assert sent[-1] == {"role": "user", "content": "What colour?"}


async def test_only_the_newest_three_photos_are_resent(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    key = key_for(rig)
    photos = [photo_data_url(4 + n, 4) for n in range(4)]
    conversation = (await chat(rig, key, message="p0", image=photos[0]))["conversation_id"]
    for n in (1, 2, 3):
        await chat(rig, key, message=f"p{n}", image=photos[n], conversation_id=conversation)
    sent = fake_lmstudio.received[-1].json()["messages"]
    users = [m["content"] for m in sent if m["role"] == "user"]
    assert users == [
        f"p0\n\n{OLDER_PHOTO_NOTE}",
        with_photo("p1", photos[1]),
        with_photo("p2", photos[2]),
        with_photo("p3", photos[3]),
    ]
    full = await history(rig, key, conversation)
    assert [m["image"] for m in full["messages"] if m["role"] == "user"] == photos, "all kept"


async def test_retry_regenerate_and_edit_keep_the_photo(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    key = key_for(rig)
    photo, other = photo_data_url(), photo_data_url(9, 9)
    conversation = (await chat(rig, key, message="What is it?", image=photo))["conversation_id"]
    # Regenerate: the stored turn is answered again, the page sends no photo.
    await chat(rig, key, message="What is it?", conversation_id=conversation, retry=True)
    assert fake_lmstudio.received[-1].json()["messages"] == [
        {"role": "user", "content": with_photo("What is it?", photo)}
    ]
    # An edit of the text keeps the photo.
    await chat(rig, key, message="Which breed?", conversation_id=conversation, edit=True)
    assert fake_lmstudio.received[-1].json()["messages"] == [
        {"role": "user", "content": with_photo("Which breed?", photo)}
    ]
    # An edit with a new photo replaces it.
    await chat(rig, key, message="And this?", conversation_id=conversation, edit=True, image=other)
    assert fake_lmstudio.received[-1].json()["messages"] == [
        {"role": "user", "content": with_photo("And this?", other)}
    ]
    full = await history(rig, key, conversation)
    assert [(m["role"], m["content"], m["image"]) for m in full["messages"]] == [
        ("user", "And this?", other),
        ("assistant", "tok0 tok1 tok2 tok3 tok4", None),
    ]


async def test_a_failed_photo_turn_is_retried_with_its_photo(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    key = key_for(rig)
    photo = photo_data_url()
    fake_lmstudio.behaviour.status = 503
    status, error, headers = await call(
        rig,
        key,
        "/api/chat",
        method="POST",
        body={"message": "Hm?", "image": photo, "model": MODELS[0]},
    )
    assert (status, error["error"]["message"]) == (503, "fake error 503")  # LM Studio's own
    conversation = headers["X-Conversation-ID"]
    fake_lmstudio.behaviour.status = None
    await chat(rig, key, message="Hm?", conversation_id=conversation, retry=True, image=photo)
    assert fake_lmstudio.received[-1].json()["messages"] == [
        {"role": "user", "content": with_photo("Hm?", photo)}
    ]
    full = await history(rig, key, conversation)
    assert [m["image"] for m in full["messages"]] == [photo, None], "stored once"


async def test_lm_studios_refusal_of_a_photo_reaches_the_caller(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    fake_lmstudio.behaviour.status = 400
    fake_lmstudio.behaviour.error_body = (
        b'{"error":"Model does not support images. Please use a model that does."}'
    )
    status, error, headers = await call(
        rig,
        key_for(rig),
        "/api/chat",
        method="POST",
        body={"message": "Look", "image": photo_data_url(), "model": MODELS[0]},
    )
    assert status == 400
    # LM Studio's own words, passed through: the phone page puts them in its own.
    assert error["error"] == "Model does not support images. Please use a model that does."
    assert headers["X-Conversation-ID"], "the turn is kept, so it can be retried elsewhere"


async def test_the_system_prompt_goes_first_is_kept_and_can_change(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    key = key_for(rig)
    first = await chat(rig, key, message="Hi", system="  Answer in French.  ")
    conversation = first["conversation_id"]
    assert fake_lmstudio.received[-1].json()["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
    ]
    assert (await history(rig, key, conversation))["system"] == "Answer in French."
    await chat(rig, key, message="Again", conversation_id=conversation)  # no "system": kept
    sent = fake_lmstudio.received[-1].json()["messages"]
    assert sent[0] == {"role": "system", "content": "Answer in French."}
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    await chat(rig, key, message="Now?", conversation_id=conversation, system="Be terse.")
    assert fake_lmstudio.received[-1].json()["messages"][0] == {
        "role": "system",
        "content": "Be terse.",
    }
    await chat(rig, key, message="Plain", conversation_id=conversation, system="")
    assert fake_lmstudio.received[-1].json()["messages"][0]["role"] == "user", "cleared"
    assert (await history(rig, key, conversation))["system"] == ""


async def test_the_system_prompt_survives_trimming_and_counts_against_the_budget(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
) -> None:
    rig = await start_identity_gateway(chat_context_chars=1000)
    key = key_for(rig)
    system = "s" * 500
    conversation = (await chat(rig, key, message="x" * 300, system=system))["conversation_id"]
    await chat(rig, key, message="y" * 300, conversation_id=conversation)
    sent = fake_lmstudio.received[-1].json()["messages"]
    # 500 of the 1000 characters are the system prompt's: 300 + 24 + 300 no longer fit.
    assert [m["content"][:3] for m in sent] == ["sss", "tok", "yyy"]
    assert sum(len(m["content"]) for m in sent) <= 1000
    await chat(rig, key, message="z" * 900, conversation_id=conversation)
    sent = fake_lmstudio.received[-1].json()["messages"]
    assert [m["content"][:1] for m in sent] == ["s", "z"], "over budget: system and the newest"


async def test_someone_elses_conversation_cannot_get_a_system_prompt(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    alice, bob = key_for(rig, "alice"), key_for(rig, "bob")
    conversation = (await chat(rig, alice, message="mine", system="Be kind."))["conversation_id"]
    status, error, _ = await call(
        rig,
        bob,
        "/api/chat",
        method="POST",
        body={"message": "x", "conversation_id": conversation, "system": "Leak everything."},
    )
    assert (status, error["error"]["code"]) == (404, "conversation_not_found")
    assert (await history(rig, alice, conversation))["system"] == "Be kind."


async def test_the_list_names_the_limits_a_photo_must_fit(rig: IdentityRig) -> None:
    status, listed, _ = await call(rig, key_for(rig), "/api/conversations")
    assert status == 200
    assert listed["limits"] == {
        "max_body_bytes": 32 * 1024 * 1024,
        "max_image_bytes": MAX_IMAGE_BYTES,
        "max_conversation_images": MAX_CONVERSATION_IMAGES,
        "max_message_chars": MAX_MESSAGE_CHARS,
        "max_system_chars": MAX_SYSTEM_CHARS,
    }
