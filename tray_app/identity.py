"""The identity layer's authenticator: API keys, JWT access tokens, and (off by default) dev mode.

Dev mode reproduces the seed's ``X-User-Id`` header for local experiments: it is accepted only
from a loopback peer that is not relaying for someone else, and no tunnel may open while it is on.
"""

from __future__ import annotations

from collections.abc import Mapping

from tray_app.apikeys import ApiKeyService, looks_like_api_key
from tray_app.auth import ALL_SCOPES, MISSING_CREDENTIAL, Principal, extract_credential
from tray_app.clock import Clock
from tray_app.errors import AuthError
from tray_app.limits import is_loopback
from tray_app.storage import Database
from tray_app.tokens import TokenService

_REFRESH_SECONDS = 0.5
_DEV_USER_MAX = 64


class IdentityAuthenticator:
    def __init__(
        self,
        db: Database,
        tokens: TokenService,
        api_keys: ApiKeyService,
        clock: Clock,
        *,
        dev_mode: bool = False,
    ) -> None:
        self._db = db
        self.tokens = tokens
        self.api_keys = api_keys
        self._clock = clock
        self.dev_mode = dev_mode
        self._next_refresh = 0.0

    def refresh_if_changed(self) -> None:
        """Pick up keys and revocations another process (the CLI) wrote, at most twice a second."""
        now = self._clock.monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = now + _REFRESH_SECONDS
        if self._db.changed_by_others():
            self.tokens.reload()
            self.api_keys.reload()

    def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        self.refresh_if_changed()
        if "X-User-Id" in headers:
            return self._dev_user(headers, peer)
        credential = extract_credential(headers)
        if credential is None:
            raise AuthError(MISSING_CREDENTIAL, code="missing_api_key")
        if looks_like_api_key(credential):
            return self.api_keys.verify(credential)[1]
        return self.tokens.verify(credential)

    def _dev_user(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        if not self.dev_mode:
            raise AuthError(
                "X-User-Id is only accepted in dev mode (auth.dev_mode), which is off.",
                code="dev_mode_off",
            )
        relayed = "X-Forwarded-For" in headers or "Forwarded" in headers
        if not is_loopback(peer) or relayed:
            raise AuthError(
                "Dev mode accepts X-User-Id only from this machine.", code="dev_mode_remote"
            )
        user = headers["X-User-Id"].strip()
        if not user or len(user) > _DEV_USER_MAX or not user.isprintable():
            raise AuthError("X-User-Id must be a short printable name.", code="dev_mode_bad_user")
        return Principal(f"dev:{user}", ALL_SCOPES)
