"""The one question everyone asks LM Studio: does it answer, does it want a token, which models
does it offer? /readyz, the tray's *Test connection*, /api/chat's default model and
`lmgate doctor` all ask it here, so they cannot disagree about what "reachable" means.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from tray_app.gateway.upstream.answers import TooLargeToParse, parse_bounded
from tray_app.gateway.upstream.failures import describe_failure

PROBE_TIMEOUT = 5.0
# A model list is a few KB; a body past this is not one, and nobody waits for it to arrive.
MODEL_LIST_MAX_BYTES = 1_000_000
# LM Studio's own model lists, newest first, with the version that added each.
_NATIVE_MODEL_LISTS = (("/api/v1/models", "0.4"), ("/api/v0/models", "0.3.6"))


@dataclass(frozen=True, slots=True)
class LMStudioProbe:
    """What one ``GET /v1/models`` found. ``status`` is None when nothing answered; then
    ``failure`` names why (an exception's class name, or ``"InvalidURL"``)."""

    url: str
    status: int | None = None
    models: tuple[str, ...] | None = None  # None: no readable model list came back
    failure: str | None = None
    reason: str | None = None  # ``failure`` in words for people (see upstream.failures)
    date: str | None = None  # the answer's Date header: a second clock for `doctor`
    version: str | None = None  # oldest version with the newest native API LM Studio answers

    @property
    def answered(self) -> bool:
        return self.status is not None

    @property
    def ready(self) -> bool:
        """LM Studio answers LM Gate's requests (with LM Gate's token, if it has one)."""
        return self.status == 200

    @property
    def needs_token(self) -> bool:
        """LM Studio refused the request for want of a (right) API token."""
        return self.status in {401, 403}


async def probe_lmstudio(
    url: str,
    token: str | None,
    *,
    session: aiohttp.ClientSession | None = None,
    within: float | None = PROBE_TIMEOUT,
    identify: bool = False,
    list_models: bool = True,
) -> LMStudioProbe:
    """Ask LM Studio at ``url`` for its models. Never raises for anything LM Studio (or the
    network) does. ``session`` is the gateway's pooled one when it has it, else a session
    lives for this probe only; ``within`` (seconds) None leaves the session's timeouts in force.
    ``identify`` also asks LM Studio's native model lists, to tell its version.
    ``list_models`` False: only the status counts (/readyz, the start), so the body is not
    read — an answer that dribbles its body cannot make a ready LM Studio look down."""
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limit = aiohttp.ClientTimeout(total=within) if within is not None else None
    try:
        if session is not None:
            return await _probe(session, url, headers, limit, identify, list_models)
        async with aiohttp.ClientSession(timeout=limit or aiohttp.ClientTimeout()) as own:
            return await _probe(own, url, headers, limit, identify, list_models)
    except aiohttp.InvalidURL as exc:
        return LMStudioProbe(url, failure="InvalidURL", reason=describe_failure(exc))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return LMStudioProbe(url, failure=type(exc).__name__, reason=describe_failure(exc))
    except ValueError as exc:
        return LMStudioProbe(url, failure=type(exc).__name__, reason="the address is unusable")


async def _probe(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    limit: aiohttp.ClientTimeout | None,
    identify: bool,
    list_models: bool,
) -> LMStudioProbe:
    timeout = limit or session.timeout
    async with session.get(
        url + "/v1/models", headers=headers, allow_redirects=False, timeout=timeout
    ) as response:
        status, date = response.status, response.headers.get("Date")
        wanted = list_models and status == 200
        models = _model_ids(await _bounded_body(response)) if wanted else None
    version = None
    if identify and status == 200:
        for path, since in _NATIVE_MODEL_LISTS:
            async with session.get(
                url + path, headers=headers, allow_redirects=False, timeout=timeout
            ) as response:
                if response.status == 200:
                    version = since
                    break
    return LMStudioProbe(url, status, models, date=date, version=version)


async def _bounded_body(response: aiohttp.ClientResponse) -> bytes | None:
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MODEL_LIST_MAX_BYTES:
            return None
    return bytes(body)


def _model_ids(body: bytes | None) -> tuple[str, ...] | None:
    if body is None:
        return None
    try:
        payload = parse_bounded(body)
    except (ValueError, TooLargeToParse):  # not JSON, nested too deep, too many containers
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("data", []), list):
        return None
    return tuple(
        entry["id"]
        for entry in payload.get("data", [])
        if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    )
