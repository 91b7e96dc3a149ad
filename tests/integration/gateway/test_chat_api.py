"""/api/chat and the conversation endpoints over real HTTP, with OpenAI-shaped errors."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import IdentityFactory, IdentityRig
from tests.fake_lmstudio import MODELS, FakeLMStudio
from tests.helpers import sse_events
from tray_app.config.upstreams import LOCAL, UpstreamEntry
from tray_app.storage.conversations import Message, trim_history


async def call(
    rig: IdentityRig, key: str, path: str, *, method: str = "GET", body: Any = None
) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method, rig.url + path, json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r,
    ):
        raw = await r.read()
        try:
            return r.status, json.loads(raw) if raw else None, r.headers
        except ValueError:
            return r.status, raw, r.headers


@pytest.fixture
async def rig(start_identity_gateway: IdentityFactory) -> IdentityRig:
    return await start_identity_gateway()


def key_for(
    rig: IdentityRig, name: str = "phone", scopes: frozenset[str] = frozenset({"chat", "models"})
) -> str:
    return rig.identity.api_keys.create(name, scopes=scopes)[0]


async def test_chat_keeps_the_history_server_side(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    key = key_for(rig)
    status, first, headers = await call(
        rig, key, "/api/chat", method="POST", body={"message": "Hi there", "model": MODELS[0]}
    )
    assert status == 200, first
    assert first["response"] == "tok0 tok1 tok2 tok3 tok4"
    conversation = first["conversation_id"]
    assert headers["X-Conversation-ID"] == conversation
    status, second, _ = await call(
        rig,
        key,
        "/api/chat",
        method="POST",
        body={"message": "And again", "conversation_id": conversation},
    )
    assert status == 200 and second["conversation_id"] == conversation
    assert second["model"] == MODELS[0], "the conversation remembers its model"
    sent = fake_lmstudio.received[-1].json()
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][0]["content"] == "Hi there"
    status, listed, _ = await call(rig, key, "/api/conversations")
    assert [c["id"] for c in listed["data"]] == [conversation]
    assert listed["data"][0]["title"] == "Hi there"
    status, full, _ = await call(rig, key, f"/api/conversations/{conversation}")
    assert [m["role"] for m in full["messages"]] == ["user", "assistant", "user", "assistant"]


async def test_streamed_chat_relays_chunks_and_records_the_answer(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    key = key_for(rig)
    fake_lmstudio.behaviour.chunks = 4
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            rig.url + "/api/chat",
            headers={"Authorization": f"Bearer {key}"},
            json={"message": "Stream please", "model": MODELS[0], "stream": True},
        ) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        conversation = r.headers["X-Conversation-ID"]
        events = sse_events(await r.read())
    assert events[-1] == "[DONE]"
    _, full, _ = await call(rig, key, f"/api/conversations/{conversation}")
    assert full["messages"][-1] == {
        "role": "assistant",
        "content": "tok0 tok1 tok2 tok3 ",
        "reasoning": None,
        "image": None,
        "created": full["messages"][-1]["created"],
    }


async def test_one_principal_cannot_touch_anothers_conversation(rig: IdentityRig) -> None:
    alice, bob = key_for(rig, "alice"), key_for(rig, "bob")
    _, mine, _ = await call(
        rig, alice, "/api/chat", method="POST", body={"message": "secret plans", "model": MODELS[0]}
    )
    conversation = mine["conversation_id"]
    for method, path, body in (
        ("GET", f"/api/conversations/{conversation}", None),
        ("DELETE", f"/api/conversations/{conversation}", None),
        (
            "POST",
            "/api/chat",
            {"message": "hi", "model": MODELS[0], "conversation_id": conversation},
        ),
    ):
        status, error, _ = await call(rig, bob, path, method=method, body=body)
        assert (status, error["error"]["code"]) == (404, "conversation_not_found"), method
    status, listed, _ = await call(rig, bob, "/api/conversations")
    assert listed["data"] == []
    status, still, _ = await call(rig, alice, f"/api/conversations/{conversation}")
    assert status == 200 and len(still["messages"]) == 2, "bob changed nothing"
    assert (await call(rig, alice, f"/api/conversations/{conversation}", method="DELETE"))[0] == 204
    assert (await call(rig, alice, f"/api/conversations/{conversation}"))[0] == 404


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({}, "invalid_body", "message"),
        ({"message": "   "}, "invalid_body", "message"),
        ({"message": 3}, "invalid_body", "message"),
        ({"message": "hi", "stream": "yes"}, "invalid_body", "stream"),
        ({"message": "hi", "retry": "yes"}, "invalid_body", "retry"),
        ({"message": "hi", "edit": 1}, "invalid_body", "edit"),
        ({"message": "hi", "model": ""}, "invalid_body", "model"),
        ({"message": "hi", "conversation_id": 7}, "invalid_body", "conversation_id"),
    ],
)
async def test_bad_chat_requests_get_openai_errors(
    rig: IdentityRig, body: dict[str, object], code: str, param: str
) -> None:
    status, error, _ = await call(rig, key_for(rig), "/api/chat", method="POST", body=body)
    assert status == 400
    assert (error["error"]["code"], error["error"]["param"]) == (code, param)
    assert error["error"]["type"] == "invalid_request_error"


async def test_chat_needs_auth_scope_and_allowed_model(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(rig.url + "/api/chat", json={"message": "hi"}) as r,
    ):
        assert r.status == 401
    models_only = key_for(rig, "m", frozenset({"models"}))
    status, error, _ = await call(
        rig, models_only, "/api/chat", method="POST", body={"message": "hi"}
    )
    assert (status, error["error"]["code"]) == (403, "insufficient_scope")
    limited = rig.identity.api_keys.create(
        "l", scopes=frozenset({"chat"}), models=frozenset({MODELS[1]})
    )[0]
    status, error, _ = await call(
        rig, limited, "/api/chat", method="POST", body={"message": "hi", "model": MODELS[0]}
    )
    assert (status, error["error"]["code"]) == (403, "model_not_allowed")
    status, answer, _ = await call(rig, limited, "/api/chat", method="POST", body={"message": "hi"})
    assert status == 200 and answer["model"] == MODELS[1], "the default is the first allowed"
    assert all(r.path != "/api/chat" for r in fake_lmstudio.received), (
        "the gateway's /api/chat never reaches LM Studio's /api"
    )


async def test_wrong_methods_are_405(rig: IdentityRig) -> None:
    key = key_for(rig)
    status, _error, headers = await call(rig, key, "/api/chat")
    assert (status, headers["Allow"]) == (405, "POST")
    status, _error, headers = await call(rig, key, "/api/conversations", method="POST", body={})
    assert (status, headers["Allow"]) == (405, "GET")


def test_history_is_trimmed_to_the_budget() -> None:
    history = [
        Message("user", "a" * 100, None, 0),
        Message("assistant", "b" * 100, None, 0),
        Message("user", "c" * 50, None, 0),
    ]
    assert [m.content[0] for m in trim_history(history, 160)] == ["b", "c"]
    assert [m.content[0] for m in trim_history(history, 10)] == ["c"], "the newest always goes"
    assert len(trim_history(history, 1000)) == 3


async def test_context_budget_is_configurable(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
) -> None:
    rig = await start_identity_gateway(chat_context_chars=500)
    key = key_for(rig)
    _, first, _ = await call(
        rig, key, "/api/chat", method="POST", body={"message": "x" * 400, "model": MODELS[0]}
    )
    await call(
        rig,
        key,
        "/api/chat",
        method="POST",
        body={"message": "y" * 300, "conversation_id": first["conversation_id"]},
    )
    sent = fake_lmstudio.received[-1].json()["messages"]
    assert sent[0]["content"].startswith("tok"), "the 400-character message no longer fits"
    assert sent[-1]["content"] == "y" * 300


async def test_the_page_is_served_with_a_strict_csp(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    async with aiohttp.ClientSession() as s:
        for path, kind in (
            ("/", "text/html"),
            ("/app.js", "text/javascript"),
            ("/app.css", "text/css"),
            ("/manifest.webmanifest", "application/manifest+json"),
            ("/icon.svg", "image/svg+xml"),
        ):
            async with s.get(rig.url + path) as r:
                assert r.status == 200, path
                assert r.headers["Content-Type"].startswith(kind)
                csp = r.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "unsafe-inline" not in csp
                assert r.headers["X-Content-Type-Options"] == "nosniff"
        async with s.get(rig.url + "/") as r:
            html = await r.text()
    assert "<script>" not in html and "onclick" not in html and "http" not in html.lower()
    assert fake_lmstudio.received == []


async def chat_checking_error(rig: IdentityRig, key: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(rig.url + "/api/chat", headers={"Authorization": f"Bearer {key}"}, json=body) as r,
    ):
        raw = await r.read()
        if r.status >= 400:  # LM Studio's own error, passed through
            assert json.loads(raw)["error"]["message"] == f"fake error {r.status}"
        return r.status, r.headers.get("X-Conversation-ID")


async def stored(rig: IdentityRig, key: str, conversation: str) -> list[tuple[str, str]]:
    _, full, _ = await call(rig, key, f"/api/conversations/{conversation}")
    return [(m["role"], m["content"]) for m in full["messages"]]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_retried_failed_turn_is_stored_and_sent_once(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio, stream: bool
) -> None:
    key = key_for(rig)
    fake_lmstudio.behaviour.status = 503
    body = {"message": "Hi there", "model": MODELS[0], "stream": stream}
    status, conversation = await chat_checking_error(rig, key, body)
    assert status == 503
    assert conversation, "the failed answer names the conversation its turn is kept in"
    fake_lmstudio.behaviour.status = None
    status, again = await chat_checking_error(
        rig, key, {**body, "conversation_id": conversation, "retry": True}
    )
    assert (status, again) == (200, conversation)
    sent = fake_lmstudio.received[-1].json()["messages"]
    assert sent == [{"role": "user", "content": "Hi there"}], "one user turn, not two"
    assert (await stored(rig, key, conversation)) == [
        ("user", "Hi there"),
        ("assistant", "tok0 tok1 tok2 tok3 tok4" + (" " if stream else "")),
    ]


async def test_a_retry_after_a_broken_stream_replaces_the_partial_answer(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    key = key_for(rig)
    _, first, _ = await call(
        rig, key, "/api/chat", method="POST", body={"message": "Hello", "model": MODELS[0]}
    )
    conversation = first["conversation_id"]
    fake_lmstudio.behaviour.fail_after = 2
    body = {"message": "Tell me more", "conversation_id": conversation, "stream": True}
    assert (await chat_checking_error(rig, key, body))[0] == 200
    assert (await stored(rig, key, conversation))[-2:] == [
        ("user", "Tell me more"),
        ("assistant", "tok0 tok1 "),
    ], "the partial answer is kept"
    fake_lmstudio.behaviour.fail_after = None
    assert (await chat_checking_error(rig, key, {**body, "retry": True}))[0] == 200
    sent = fake_lmstudio.received[-1].json()["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("user", "Hello"),
        ("assistant", "tok0 tok1 tok2 tok3 tok4"),
        ("user", "Tell me more"),
    ], "LM Studio sees neither the partial answer nor the question twice"
    assert (await stored(rig, key, conversation)) == [
        ("user", "Hello"),
        ("assistant", "tok0 tok1 tok2 tok3 tok4"),
        ("user", "Tell me more"),
        ("assistant", "tok0 tok1 tok2 tok3 tok4 "),
    ]


async def test_regenerate_replaces_the_last_answer_and_a_new_text_is_a_new_turn(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    key = key_for(rig)
    _, first, _ = await call(
        rig, key, "/api/chat", method="POST", body={"message": "Hello", "model": MODELS[0]}
    )
    conversation = first["conversation_id"]
    fake_lmstudio.behaviour.chunks = 2
    again = {"message": "Hello", "conversation_id": conversation, "retry": True}
    status, answer, _ = await call(rig, key, "/api/chat", method="POST", body=again)
    assert (status, answer["response"]) == (200, "tok0 tok1")
    assert fake_lmstudio.received[-1].json()["messages"] == [{"role": "user", "content": "Hello"}]
    assert (await stored(rig, key, conversation)) == [("user", "Hello"), ("assistant", "tok0 tok1")]
    # A retry whose text is not the last turn's (that request never arrived) is a new turn.
    other = {**again, "message": "Something else"}
    assert (await call(rig, key, "/api/chat", method="POST", body=other))[0] == 200
    assert [r for r, _ in (await stored(rig, key, conversation))] == ["user", "assistant"] * 2


async def test_an_edit_replaces_the_last_question_and_its_answer(
    rig: IdentityRig, fake_lmstudio: FakeLMStudio
) -> None:
    key = key_for(rig)
    _, first, _ = await call(
        rig, key, "/api/chat", method="POST", body={"message": "Hello", "model": MODELS[0]}
    )
    conversation = first["conversation_id"]
    ask = {"message": "Whats 2+2", "conversation_id": conversation}
    assert (await call(rig, key, "/api/chat", method="POST", body=ask))[0] == 200
    fake_lmstudio.behaviour.chunks = 1
    edited = {**ask, "message": "What's 2+2?", "edit": True}
    status, answer, _ = await call(rig, key, "/api/chat", method="POST", body=edited)
    assert (status, answer["response"]) == (200, "tok0")
    sent = fake_lmstudio.received[-1].json()["messages"]
    assert [m["content"] for m in sent] == ["Hello", "tok0 tok1 tok2 tok3 tok4", "What's 2+2?"]
    assert (await stored(rig, key, conversation)) == [
        ("user", "Hello"),
        ("assistant", "tok0 tok1 tok2 tok3 tok4"),
        ("user", "What's 2+2?"),
        ("assistant", "tok0"),
    ], "the question is replaced, not added"


async def test_a_switched_off_only_upstream_is_not_asked_for_the_default_model(
    start_identity_gateway: IdentityFactory, fake_lmstudio: FakeLMStudio
) -> None:
    # The enabled upstreams are the only ones anything is sent to, the phone's probe included.
    rig = await start_identity_gateway(
        upstreams=(UpstreamEntry(LOCAL, fake_lmstudio.url, enabled=False),)
    )
    status, body, _ = await call(
        rig, key_for(rig), "/api/chat", method="POST", body={"message": "Hi"}
    )
    assert (status, body["error"]["code"]) == (503, "upstream_disabled")
    assert fake_lmstudio.received == [] and fake_lmstudio.native == []
