"""The seed's conversation API, for the phone page and simple clients.

``POST /api/chat`` takes ``{"message", "conversation_id"?, "model"?, "stream"?}``, sends the
conversation's recent history (trimmed to ``chat.context_chars``) to LM Studio, and answers
``{"response", "conversation_id", "model", ...}`` — or, with ``stream: true``, relays LM
Studio's SSE chunks (the conversation ID in the ``X-Conversation-ID`` header) while keeping the
answer for the history. ``GET /api/conversations``, ``GET`` and ``DELETE
/api/conversations/{id}`` list, read and delete the caller's own conversations (the list also
names the limits the phone page fits a photo into).

Photos: ``"image"`` is one ``data:image/(jpeg|png|webp);base64,...`` URL, checked strictly (the
media type allowlisted, the base64 well-formed, the data starting like the type it names, at
most ``MAX_IMAGE_BYTES`` decoded) and sent to LM Studio as OpenAI content parts on that user
turn. It is stored with the message, so the history shows it and follow-up questions still
send it — but only the newest ``MAX_RESENT_IMAGES`` photos of the history sent are resent;
older ones become a short text note, so a long photo conversation does not resend every photo
on every turn. Photos do not count against ``chat.context_chars`` (their cost in tokens is the
model's); ``limits.max_body_bytes`` bounds each request.

``GET /api/conversations/{id}`` returns every stored photo inline, so its size is bounded by
bounding the photos: at most ``MAX_IMAGE_BYTES`` (2 MiB) each — the phone page sends JPEGs of
at most 1280 px, well under 1 MB — and at most ``MAX_CONVERSATION_IMAGES`` per conversation; a
further photo is refused (400 ``too_many_images``, ``param: image``) before anything is stored
or sent, and the page says to start a new chat. So one conversation's answer holds at most
~27 MB of photos (base64), plus its text.

System prompt: ``"system"`` (at most ``MAX_SYSTEM_CHARS``, "" to clear it) sets the
conversation's system prompt, kept with it and sent as the first message of this and every
later turn. It is always sent, whatever the trimming, and its length is taken from the history's
``chat.context_chars`` budget.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tray_app.errors import StorageError
from tray_app.gateway import api_errors as errors
from tray_app.gateway.api_errors import REQUEST_ID_HEADER
from tray_app.gateway.body_rules import (
    PreparedBody,
    apply_principal_rules,
    check_models,
    parse_json_object,
    prepare_body,
)
from tray_app.gateway.exchange import Exchange
from tray_app.gateway.routes import FORWARDED_ROUTES
from tray_app.gateway.sharing import Generation, Sharing
from tray_app.gateway.state_calls import StateCalls
from tray_app.gateway.upstream.answers import TooLargeToParse, parse_bounded
from tray_app.gateway.upstream.client import UPSTREAM_SESSION, decode_body
from tray_app.gateway.upstream.forwarding import Forwarder
from tray_app.gateway.upstream.probe import probe_lmstudio
from tray_app.identity.principal import Principal
from tray_app.storage.conversations import (
    Conversation,
    ConversationStore,
    Message,
    trim_history,
    up_to_last_turn,
)

log = logging.getLogger("lmgate.gateway")

CHAT_ROUTE = next(r for r in FORWARDED_ROUTES if r.path == "/v1/chat/completions")
MAX_MESSAGE_CHARS = 100_000
MAX_SYSTEM_CHARS = 10_000
# Decoded; a phone photo resized to 1280 px is ~150-400 KB (the page sends at most ~1 MB).
MAX_IMAGE_BYTES = 2 * 1024 * 1024
# Photos one conversation keeps: reading it back returns them all, so this bounds that answer.
MAX_CONVERSATION_IMAGES = 10
# Photos resent with a turn (the newest ones of the history sent): vision models spend hundreds
# of tokens on each, and the question is almost always about the latest.
MAX_RESENT_IMAGES = 3
OLDER_PHOTO_NOTE = "[A photo was attached here; it is no longer shown.]"
CONVERSATION_HEADER = "X-Conversation-ID"

# What each allowed type's data starts with: a data URL that names one type and holds another
# (an SVG, an HTML page) is refused rather than handed to a model runtime's image decoder.
IMAGE_SIGNATURES = {
    "image/jpeg": re.compile(rb"\xff\xd8\xff"),
    "image/png": re.compile(rb"\x89PNG\r\n\x1a\n"),
    "image/webp": re.compile(rb"RIFF....WEBP", re.DOTALL),
}
_DATA_URL_HEAD = re.compile(r"data:((?i:[a-z0-9.+-]+/[a-z0-9.+-]+));base64", re.ASCII)
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}", re.ASCII)


def parse_image(value: object, max_bytes: int = MAX_IMAGE_BYTES) -> str | None:
    """The ``image`` field checked: None (no photo) or the data URL as it came."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.chat_image_not_a_string()
    head, comma, data = value.partition(",")
    if not comma or not head.startswith("data:"):
        raise errors.chat_image_not_a_data_url()
    matched = _DATA_URL_HEAD.fullmatch(head)
    if matched is None:
        raise errors.chat_image_not_a_data_url()
    media_type = matched[1]
    if media_type not in IMAGE_SIGNATURES:  # lower case only, as browsers write it
        raise errors.chat_image_type_not_allowed()
    # Bounded before decoding: the base64 text of max_bytes is at most 4/3 of it.
    if len(data) > (max_bytes + 2) // 3 * 4:
        raise errors.chat_image_too_large(max_bytes)
    if len(data) % 4 or not _BASE64.fullmatch(data):
        raise errors.chat_image_base64_invalid()
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise errors.chat_image_base64_invalid() from None
    if len(decoded) > max_bytes:
        raise errors.chat_image_too_large(max_bytes)
    if not IMAGE_SIGNATURES[media_type].match(decoded):
        raise errors.chat_image_not_its_type()
    return value


def parse_system(value: object) -> str | None:
    """The ``system`` field checked: None (leave it as it is) or the new prompt ("" for none)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.chat_system_not_a_string()
    if len(value) > MAX_SYSTEM_CHARS:
        raise errors.chat_system_too_long(MAX_SYSTEM_CHARS)
    return value.strip()


def wire_messages(
    system: str, sent: list[Message], max_images: int = MAX_RESENT_IMAGES
) -> list[dict[str, Any]]:
    """The messages LM Studio gets: the system prompt first, then the turns, the newest
    ``max_images`` photos as image parts and older ones as a note."""
    with_photo = [i for i, m in enumerate(sent) if m.image]
    resent = set(with_photo[-max_images:]) if max_images > 0 else set()
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for index, m in enumerate(sent):
        if m.image and index in resent:
            content: Any = [
                {"type": "text", "text": m.content},
                {"type": "image_url", "image_url": {"url": m.image}},
            ]
        elif m.image:
            content = f"{m.content}\n\n{OLDER_PHOTO_NOTE}"
        else:
            content = m.content
        out.append({"role": m.role, "content": content})
    return out


class SseCapture:
    """Collects the answer's text from SSE chunks as they pass (only for /api/chat).

    Both buffers are bounded: an unfinished line longer than ``max_line`` is dropped (the relay
    ends such a stream itself), and the kept answer stops growing at ``max_chars``."""

    def __init__(self, *, max_line: int, max_chars: int) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self._pending = b""
        self._max_line = max_line
        self._room = max_chars

    def __call__(self, chunk: bytes) -> None:
        data = self._pending + chunk
        *lines, self._pending = data.replace(b"\r", b"\n").split(b"\n")
        if len(self._pending) > self._max_line:
            self._pending = b""
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            try:
                event = json.loads(payload)
                delta = event["choices"][0]["delta"]
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            if isinstance(delta.get("content"), str):
                self._keep(self.content, delta["content"])
            for key in ("reasoning", "reasoning_content"):
                if isinstance(delta.get(key), str):
                    self._keep(self.reasoning, delta[key])

    def _keep(self, into: list[str], text: str) -> None:
        if self._room > 0:
            into.append(text[: self._room])
            self._room -= len(text)


BodyReader = Callable[[web.Request, Exchange], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class _Turn:
    """What a chat request asks, once checked: the question and where it goes."""

    message: str
    model: str
    image: str | None
    conversation: Conversation | None
    new_system: str | None
    system: str
    retried: bool  # answers the stored last turn again (a retry, a regenerate or an edit)
    edit: bool


class ChatApi:
    def __init__(
        self,
        store: ConversationStore,
        forwarder: Forwarder,
        *,
        context_chars: int,
        read_body: BodyReader,
        max_event_bytes: int,
        max_answer_chars: int,
        count_usage: bool,
        max_body_bytes: int,
        sharing: Sharing,
        state: StateCalls,
    ) -> None:
        self._store = store
        self._state = state  # each store call through it: a remote database's on a thread
        self._forward = forwarder
        self._context_chars = context_chars
        self._read_body = read_body  # the gateway's: its size and time limits, its errors
        self._max_event_bytes = max_event_bytes
        self._max_answer_chars = max_answer_chars
        self._count_usage = count_usage
        self._max_body_bytes = max_body_bytes
        self._sharing = sharing

    async def handle(
        self, request: web.Request, exchange: Exchange, path: str, principal: Principal
    ) -> web.StreamResponse:
        """``path`` and the method are the gateway's endpoint table's: one of the methods it
        lists for the path (so a wrong method never gets here)."""
        method = request.method
        request_id = exchange.request_id
        if path == "/api/chat":
            return await self._chat(request, exchange, principal)
        if path == "/api/conversations":
            return self._json(
                request_id,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": c.id,
                            "title": c.title,
                            "model": c.model,
                            "created": int(c.created),
                            "updated": int(c.updated),
                        }
                        for c in await self._state.call(self._store.for_principal, principal.name)
                    ],
                    # What the phone page fits a photo (and the request carrying it) into.
                    "limits": {
                        "max_body_bytes": self._max_body_bytes,
                        "max_image_bytes": MAX_IMAGE_BYTES,
                        "max_conversation_images": MAX_CONVERSATION_IMAGES,
                        "max_message_chars": MAX_MESSAGE_CHARS,
                        "max_system_chars": MAX_SYSTEM_CHARS,
                    },
                },
            )
        conversation_id = path.removeprefix("/api/conversations/")
        conversation = await self._state.call(self._store.get, principal.name, conversation_id)
        if conversation is None:
            raise errors.conversation_not_found()
        if method == "GET":
            return self._json(
                request_id,
                {
                    "id": conversation.id,
                    "title": conversation.title,
                    "model": conversation.model,
                    "system": conversation.system,
                    "messages": [
                        {
                            "role": m.role,
                            "content": m.content,
                            "reasoning": m.reasoning,
                            "image": m.image,
                            "created": int(m.created),
                        }
                        for m in await self._state.call(self._store.messages, conversation.id)
                    ],
                },
            )
        await self._state.call(self._store.delete, principal.name, conversation.id)
        return web.Response(status=204, headers={REQUEST_ID_HEADER: request_id})

    def _store_question(self, principal: Principal, asked: _Turn) -> Conversation:
        """The asked turn stored, in a conversation made for it if it is the first; one call,
        so a remote database is asked on one thread hop."""
        conversation, message, model, image = (
            asked.conversation,
            asked.message,
            asked.model,
            asked.image,
        )
        if conversation is None:
            conversation = self._store.create(principal.name, message, model, system=asked.system)
        elif asked.new_system is not None and asked.new_system != conversation.system:
            self._store.set_system(conversation.id, asked.new_system)
        if not asked.retried or not self._store.reopen_last_turn(
            conversation.id,
            message,
            model=model,
            replace=asked.edit,
            image=image if asked.edit else None,
        ):
            self._store.append(conversation.id, "user", message, model=model, image=image)
        return conversation

    async def _store_answer(self, conversation_id: str, text: str, reasoning: str | None) -> None:
        await self._state.call(
            self._store.append, conversation_id, "assistant", text, reasoning=reasoning
        )

    @staticmethod
    def _json(request_id: str, payload: Any) -> web.Response:
        return web.json_response(payload, headers={REQUEST_ID_HEADER: request_id})

    async def _default_model(self, request: web.Request, principal: Principal) -> str:
        if self._forward.several:
            models: Sequence[str] = self._forward.models_known()
        else:
            probe = await probe_lmstudio(
                self._forward.upstream_url,
                self._forward.lmstudio_token,
                session=request.app[UPSTREAM_SESSION],
                within=None,  # the upstream session's own connect and idle timeouts
            )
            models = probe.models or ()
        for model in models:
            if principal.may_use_model(model):
                return model
        raise errors.no_default_model()

    async def _chat(
        self, request: web.Request, exchange: Exchange, principal: Principal
    ) -> web.StreamResponse:
        raw = await self._read_body(request, exchange)
        payload = parse_json_object(raw)
        message = payload.get("message")
        if not isinstance(message, str) or not message.strip():
            raise errors.chat_message_missing()
        if len(message) > MAX_MESSAGE_CHARS:
            raise errors.chat_message_too_long(MAX_MESSAGE_CHARS)
        stream = payload.get("stream", False)
        if not isinstance(stream, bool):
            raise errors.chat_stream_not_a_boolean()
        retry = payload.get("retry", False)
        if not isinstance(retry, bool):
            raise errors.chat_retry_not_a_boolean()
        edit = payload.get("edit", False)
        if not isinstance(edit, bool):
            raise errors.chat_edit_not_a_boolean()
        new_system = parse_system(payload.get("system"))
        image = parse_image(payload.get("image"))
        conversation_id = payload.get("conversation_id")
        conversation = None
        if conversation_id is not None:
            if not isinstance(conversation_id, str):
                raise errors.chat_conversation_id_not_a_string()
            conversation = await self._state.call(self._store.get, principal.name, conversation_id)
            if conversation is None:
                raise errors.conversation_not_found()
        model = payload.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise errors.chat_model_invalid()
        if model is None:
            model = (
                conversation.model
                if conversation and conversation.model
                else await self._default_model(request, principal)
            )
        exchange.model, exchange.stream = model, stream
        history = (
            await self._state.call(self._store.messages, conversation.id)
            if conversation is not None
            else []
        )
        # A retry (or a regenerate) answers the stored turn again instead of storing it twice;
        # an edit replaces the last question and answers that.
        # A retried or regenerated turn keeps its stored photo; an edit keeps it unless it
        # brings a new one.
        retried = (
            up_to_last_turn(history, message, replace=edit, image=image) if retry or edit else None
        )
        if retried is None:
            history.append(Message("user", message, None, 0.0, image))
        # Counted as it will be stored (an edit's new photo replaces its old one); only a new
        # photo is refused, so a conversation over the limit can still go on in words.
        if image is not None and sum(1 for m in retried or history if m.image) > (
            MAX_CONVERSATION_IMAGES
        ):
            raise errors.chat_too_many_images(MAX_CONVERSATION_IMAGES)
        system = (
            new_system
            if new_system is not None
            else (conversation.system if conversation is not None else "")
        )
        sent = trim_history(retried or history, self._context_chars - len(system))
        # The body LM Studio gets passes the same rules as any /v1/chat/completions request:
        # the model allowlist, the output cap, and usage asked for so the turn is counted.
        prepared = prepare_body(
            CHAT_ROUTE,
            json.dumps(
                {
                    "model": model,
                    "stream": stream,
                    "messages": wire_messages(system, sent),
                }
            ).encode(),
        )
        check_models(prepared, principal)
        # Before anything is stored: a turn over budget leaves no question without an answer.
        generation = exchange.generation = await self._sharing.admit(
            principal, exchange.client or "unknown", CHAT_ROUTE, prepared
        )
        try:
            asked = _Turn(
                message, model, image, conversation, new_system, system, retried is not None, edit
            )
            return await self._answer(request, exchange, principal, generation, prepared, asked)
        finally:
            generation.release()

    async def _answer(
        self,
        request: web.Request,
        exchange: Exchange,
        principal: Principal,
        generation: Generation,
        prepared: PreparedBody,
        asked: _Turn,
    ) -> web.StreamResponse:
        request_id, outcome, extra_headers = exchange.request_id, exchange.outcome, exchange.cors
        stream, model = prepared.stream, asked.model
        adjusted = apply_principal_rules(
            prepared, CHAT_ROUTE, max_tokens=generation.max_tokens, want_usage=self._count_usage
        )
        body = adjusted.body.raw
        conversation = await self._state.call(self._store_question, principal, asked)
        headers = {CONVERSATION_HEADER: conversation.id, **(extra_headers or {})}
        if stream:
            capture = SseCapture(max_line=self._max_event_bytes, max_chars=self._max_answer_chars)
            try:
                relayed = await self._forward.post(
                    request,
                    request_id,
                    CHAT_ROUTE,
                    body,
                    stream=True,
                    outcome=outcome,
                    extra_headers=headers,
                    hide_usage=adjusted.hide_usage,
                    observer=capture,
                    wait_turn=generation.wait_turn,
                    caller=principal.name,
                    model=model,
                )
                if not relayed.prepared:  # LM Studio's error, answered whole
                    relayed.headers[CONVERSATION_HEADER] = conversation.id
                return relayed
            except errors.ApiError as err:
                # The stored turn is in this conversation: a Retry must name it.
                err.headers[CONVERSATION_HEADER] = conversation.id
                raise
            finally:
                # Also after a Stop: what was generated so far belongs to the history.
                text = "".join(capture.content)
                if text or capture.reasoning:
                    try:
                        await self._store_answer(
                            conversation.id, text, "".join(capture.reasoning) or None
                        )
                    except StorageError as exc:
                        # The answer was streamed, so the phone has it: only keeping it
                        # failed, and a 503 now would be written into the stream's body.
                        log.warning(
                            "request %s: the answer was sent but not kept: %s", request_id, exc
                        )
        try:
            upstream = await self._forward.post(
                request,
                request_id,
                CHAT_ROUTE,
                body,
                stream=False,
                outcome=outcome,
                extra_headers=None,
                hide_usage=False,
                wait_turn=generation.wait_turn,
                caller=principal.name,
                model=model,
            )
        except errors.ApiError as err:
            err.headers[CONVERSATION_HEADER] = conversation.id
            raise
        assert isinstance(upstream, web.Response) and isinstance(upstream.body, bytes)
        if upstream.status >= 400:
            upstream.headers[CONVERSATION_HEADER] = conversation.id
            return upstream  # LM Studio's own error, already in the OpenAI shape
        try:
            answer = parse_bounded(
                decode_body(
                    upstream.body, upstream.headers.get("Content-Encoding"), self._max_answer_chars
                )
            )
            reply = answer["choices"][0]["message"]
            content = reply.get("content") or ""
            reasoning = reply.get("reasoning") or reply.get("reasoning_content")
        except TooLargeToParse:
            raise errors.chat_answer_too_large() from None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise errors.chat_answer_malformed() from None
        try:
            await self._store_answer(conversation.id, content, reasoning)
        except StorageError as exc:
            # Generated and charged: the answer is given all the same (a 503 would say
            # nothing was forwarded, and a retry would generate and charge it again).
            log.warning("request %s: the answer was sent but not kept: %s", request_id, exc)
        response = self._json(
            request_id,
            {
                "response": content,
                "reasoning": reasoning,
                "conversation_id": conversation.id,
                "model": model,
                "usage": answer.get("usage"),
            },
        )
        response.headers[CONVERSATION_HEADER] = conversation.id
        return response
