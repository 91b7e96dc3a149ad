"""The identity layer's authenticator: API keys, JWT access tokens, and (off by default) dev mode.

Changes other processes make (the CLI creating, revoking, rotating) are read at most twice a
second; a credential not in memory yet is looked up at once, so a new one works on its first
request. Which models each credential may use is the access policy's (identity.access).

A principal's budget comes from the budgets table, never from what a token claims: read with
the keys and tokens when another process changed the database, and looked up once for a
principal not read yet, so `lmgate budget set` reaches a running gateway's next request within
a second, and a credential made a moment ago has its budget on its first request.

When the database cannot be read (a team's PostgreSQL down, a local file locked or broken)
nothing is authenticated: a revocation made meanwhile could not be seen. Every request is
refused with the StorageError at once, without asking the database again, until the next
refresh (half a second on) finds it back, and then everything is read again, so a change made
during the outage is not missed.

Dev mode reproduces the seed's ``X-User-Id`` header for local experiments: it is accepted only
from a loopback peer, addressed to a loopback host name (a page on a DNS-rebinding domain
sends its own), with no proxy header (a proxy on this machine relays for someone else); no
tunnel may open while it is on.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping

from tray_app.addresses import is_loopback, is_loopback_host
from tray_app.clock import Clock
from tray_app.errors import AuthError, StorageError
from tray_app.identity.api_keys import ApiKeyService, looks_like_api_key
from tray_app.identity.principal import (
    ALL_SCOPES,
    MISSING_CREDENTIAL,
    Budget,
    CredentialKind,
    Principal,
    PrincipalId,
    extract_credential,
)
from tray_app.identity.tokens import TokenService
from tray_app.storage.budgets import BudgetStore
from tray_app.storage.database import Database

log = logging.getLogger("lmgate.identity")

_REFRESH_SECONDS = 0.5
_DEV_USER_MAX = 64
# Whole families of headers that proxies, CDNs and tunnels add (Cloudflare, Fly, Envoy,
# Tailscale, ...): a list of names can never be complete.
PROXY_HEADER_PREFIXES = (
    "x-forwarded-",
    "x-original-",
    "x-real-",
    "x-envoy-",
    "x-cluster-",
    "x-client-",
    "cf-",
    "cdn-",
    "fly-",
    "fastly-",
    "tailscale-",
    "true-client-",
    "x-proxyuser-",
)

# Headers by which a proxy says it relays for someone else; none may reach dev mode.
PROXY_HEADERS = (
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Real-IP",
    "CF-Connecting-IP",
    "True-Client-IP",
    "X-Client-IP",
    "Fastly-Client-IP",
    "X-Cluster-Client-IP",
    "X-Forwarded",
    "X-Forwarded-Server",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Original-Forwarded-For",
    "X-Original-Host",
    "X-ProxyUser-Ip",
    "Client-IP",
    "Via",
)


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
        # Set while the database cannot be read; and whether everything must be read again.
        self._state_error: StorageError | None = None
        self._reload_pending = False
        self._refreshing = threading.Lock()
        # When the refresh under way began; None between refreshes, and in the moment after
        # one took the lock, before it could say when (a request then trusts memory).
        self._refresh_started: float | None = None
        self._budget_store = BudgetStore(db)
        # Every principal read so far, None for one without a budget; all stored ones at start.
        self._budgets: dict[str, Budget | None]
        self.reload_budgets()

    def reload_budgets(self) -> None:
        """Read every budget again: after another process changed the database, or when
        this process changed a budget itself (other connections' changes are noticed alone)."""
        self._budgets = dict(self._budget_store.all())

    def refresh_if_changed(self) -> None:
        """Pick up keys, revocations and a rotated signing key another process (the CLI)
        wrote, at most twice a second."""
        now = self._clock.monotonic()
        if now < self._next_refresh:
            if self._state_error is not None:
                raise self._state_error
            return
        if not self._refreshing.acquire(blocking=False):
            # Another thread (a remote database's calls run on a few) is reading it now; this
            # request goes on with what is in memory, if that is known to be recent: not
            # after an outage (a revocation may be what is being read), nor while the
            # refresh itself hangs.
            if self._state_error is not None:
                raise self._state_error
            started = self._refresh_started
            hung = bool(started and now - started > 2 * _REFRESH_SECONDS)
            if self._reload_pending or hung:
                raise StorageError("LM Gate's database is slow to answer; try again shortly.")
            return
        try:
            self._refresh_started = now
            self._next_refresh = now + _REFRESH_SECONDS
            # The change is consumed by asking, so a reload cut short is remembered (below).
            if self._reload_pending or self._db.changed_by_others():
                self.tokens.sync_key()
                self.tokens.reload()
                self.api_keys.reload()
                self.reload_budgets()
                self._reload_pending = False
        except StorageError as exc:
            if self._state_error is None:
                log.warning("credentials cannot be checked, every request is refused: %s", exc)
            self._state_error = exc
            self._reload_pending = True
            raise
        finally:
            self._refresh_started = None
            self._refreshing.release()
        if self._state_error is not None:
            log.warning("credentials can be checked again")
            self._state_error = None

    def check_state(self) -> None:
        """Raise StorageError while credentials cannot be checked (asks the database at most
        twice a second)."""
        self.refresh_if_changed()

    def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        self.refresh_if_changed()
        if self.dev_mode and "X-User-Id" in headers:
            return self._dev_user(headers, peer)
        credential = extract_credential(headers)
        if credential is None:
            if "X-User-Id" in headers:
                return self._dev_user(headers, peer)  # says dev mode is off
            raise AuthError(MISSING_CREDENTIAL, code="missing_api_key")
        if looks_like_api_key(credential):
            return self._with_budget(self.api_keys.verify(credential)[1])
        return self._with_budget(self.tokens.verify(credential))

    def _with_budget(self, principal: Principal) -> Principal:
        name = principal.name
        budgets = self._budgets  # one read: a reload on another state thread swaps it whole
        if name in budgets:
            budget = budgets[name]
        else:  # made since the last read (by the CLI, or pairing in this process)
            budget = budgets[name] = self._budget_store.get(name)
        if budget is not None:  # most callers have none: no copy for them
            principal = dataclasses.replace(principal, budget=budget)
        return principal

    def still_valid(self, principal: Principal) -> bool:
        """Whether the credential behind ``principal`` may go on (a running stream asks)."""
        self.refresh_if_changed()
        credential = principal.credential
        if credential is None:
            return False
        if credential.kind is CredentialKind.TOKEN:
            return self.tokens.is_active(credential.id)
        if credential.kind is CredentialKind.KEY:
            return self.api_keys.is_active(credential.id)
        if credential.kind is CredentialKind.DEV:
            return self.dev_mode
        return False  # a device or snippet is never itself a credential: its tokens are

    def _dev_user(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        if not self.dev_mode:
            raise AuthError(
                "X-User-Id is only accepted in dev mode (auth.dev_mode), which is off.",
                code="dev_mode_off",
            )
        relayed = any(name in headers for name in PROXY_HEADERS) or any(
            name.lower().startswith(PROXY_HEADER_PREFIXES) for name in headers
        )
        if not is_loopback(peer) or relayed or not is_loopback_host(headers.get("Host")):
            raise AuthError(
                "Dev mode accepts X-User-Id only from this machine, addressed to localhost.",
                code="dev_mode_remote",
            )
        user = headers["X-User-Id"].strip()
        if not user or len(user) > _DEV_USER_MAX or not user.isprintable():
            raise AuthError("X-User-Id must be a short printable name.", code="dev_mode_bad_user")
        dev = PrincipalId(CredentialKind.DEV, user)
        return Principal(str(dev), ALL_SCOPES, credential=dev)
