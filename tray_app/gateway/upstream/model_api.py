"""LM Studio's native model API, for the gateway's own use: which models are in memory, and
loading one. Callers never reach ``/api/*`` (the endpoint table refuses it); only the model
guard and ``lmgate warm-up`` ask here, with LM Studio's token, never a caller's.

Every answer is read within a bound and every failure leaves as an error from the catalogue,
so a broken or hostile LM Studio can neither stall the guard nor crash it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from tray_app.gateway import api_errors as errors
from tray_app.gateway.upstream.answers import TooLargeToParse, parse_bounded
from tray_app.gateway.upstream.client import decode_body
from tray_app.gateway.upstream.failures import describe_failure
from tray_app.gateway.upstream.probe import MODEL_LIST_MAX_BYTES

# /api/v0/models is the only list that says "loaded" per model on every LM Studio since 0.3.6.
MODEL_STATES_PATH = "/api/v0/models"
LOAD_PATH = "/api/v1/models/load"
# A hung LM Studio must not hold a request that only wanted to know what is loaded.
MODEL_STATES_TIMEOUT = 5.0
# A load's answer is a few hundred bytes; an error's message is cut to 200 characters anyway.
LOAD_ANSWER_MAX_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ModelStates:
    """What LM Studio has on disk (``downloaded``, every model it could serve) and which of
    those are in memory now (``loaded``, a subset)."""

    downloaded: frozenset[str]
    loaded: frozenset[str]


class ModelApi(Protocol):
    async def loaded(self) -> ModelStates | None:
        """The models' states, or None when this server has no such API (llama.cpp, vLLM:
        then nothing can be guarded). Raises ApiError when LM Studio cannot be asked."""
        ...

    async def load(self, model: str, timeout: float) -> None:  # noqa: ASYNC109 - named in its error
        """Load ``model`` and return once it is loaded, within ``timeout`` seconds. Raises
        ApiError (model_load_failed, model_load_timeout, upstream_auth_failed)."""
        ...


class LMStudioModelApi:
    def __init__(
        self,
        base_url: str,
        token_getter: Callable[[], str | None],
        session: aiohttp.ClientSession,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._token_getter = token_getter
        self._session = session

    def _headers(self) -> dict[str, str]:
        # The gateway's session does not decompress: asking for none keeps decode_body a no-op.
        headers = {"Accept-Encoding": "identity"}
        # Read at each call: `lmgate secret set` may have changed the token since the start.
        token = self._token_getter()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def loaded(self) -> ModelStates | None:
        try:
            async with self._session.get(
                self._base_url + MODEL_STATES_PATH,
                headers=self._headers(),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=MODEL_STATES_TIMEOUT),
            ) as response:
                status = response.status
                if status in {401, 403}:
                    raise errors.upstream_auth_failed(status)
                if status >= 500:
                    raise errors.upstream_status(status, "")
                if status != 200:
                    return None  # 404 and the like: a server without LM Studio's native API
                body = await _bounded_body(response, MODEL_LIST_MAX_BYTES)
                if body is None:
                    raise errors.model_list_too_large(MODEL_LIST_MAX_BYTES)
                body = decode_body(
                    body, response.headers.get("Content-Encoding"), MODEL_LIST_MAX_BYTES
                )
        except aiohttp.ClientConnectorError:
            raise errors.upstream_unreachable_at(self._base_url) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise errors.upstream_failed(describe_failure(exc)) from None
        return model_states(body)

    async def load(self, model: str, timeout: float) -> None:  # noqa: ASYNC109 - named in its error
        try:
            async with self._session.post(
                self._base_url + LOAD_PATH,
                json={"model": model},
                headers=self._headers(),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                status = response.status
                body = await _bounded_body(response, LOAD_ANSWER_MAX_BYTES) or b""
        except TimeoutError:
            raise errors.model_load_timeout(model, timeout) from None
        except aiohttp.ClientError as exc:
            raise errors.model_load_failed(model, describe_failure(exc)) from None
        if status in {401, 403}:
            raise errors.upstream_auth_failed(status)
        if status != 200:
            said = _error_message(body)
            raise errors.model_load_failed(model, said or f"it answered {status}")
        if not _is_load_result(body):
            # LM Studio before 0.4 answers any unknown path with 200: that is no load.
            raise errors.model_load_failed(
                model, "it did not answer like a model load (loading needs LM Studio 0.4 or newer)"
            )


@asynccontextmanager
async def own_model_api(base_url: str, token: str | None) -> AsyncIterator[LMStudioModelApi]:
    """A model API with a session of its own, for a command that runs without the gateway."""
    async with aiohttp.ClientSession(trust_env=False, auto_decompress=False) as session:
        yield LMStudioModelApi(base_url, lambda: token, session)


def model_states(body: bytes) -> ModelStates | None:
    """``/api/v0/models``' answer as states; None when it is not that list (a server that
    answers every path with 200, like LM Studio before 0.3.6, is no model API)."""
    try:
        payload = parse_bounded(body)
    except (ValueError, TooLargeToParse):
        return None
    entries = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(entries, list):
        return None
    downloaded: set[str] = set()
    loaded: set[str] = set()
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        model, state = entry.get("id"), entry.get("state")
        if not isinstance(model, str) or not isinstance(state, str):
            continue
        downloaded.add(model)
        if state == "loaded":
            loaded.add(model)
    if entries and not downloaded:
        return None  # a list, but not of model states
    return ModelStates(frozenset(downloaded), frozenset(loaded))


async def _bounded_body(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _error_message(body: bytes) -> str:
    try:
        payload = parse_bounded(body)
    except (ValueError, TooLargeToParse):
        return body.decode("utf-8", "replace").strip()
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return error.strip() if isinstance(error, str) else ""


def _is_load_result(body: bytes) -> bool:
    try:
        payload = parse_bounded(body)
    except (ValueError, TooLargeToParse):
        return False
    return isinstance(payload, dict) and isinstance(payload.get("model_instance_id"), str)
