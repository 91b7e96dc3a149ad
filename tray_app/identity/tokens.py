"""JWT access tokens: HS256 only, every claim required, every token recorded by its ``jti``.

A token is valid only while its ``jti`` is in the database and not revoked, so revocation is
immediate and a stolen signing key alone cannot mint a token the gateway accepts. The database
record, not the JWT, says who the caller is and what it may do: a token whose claims differ
from its record (re-signed by someone holding the key) is refused. Each token is its own
principal (``token:<jti>``, ``snippet:<jti>``, ``device:<id>``); names are labels.

Verified tokens are cached by their full text until expiry (re-verifying HMAC and claims on
every request costs more than the rest of the gateway's work), and the cache is dropped
whenever the database changes.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import jwt

from tray_app.clock import Clock
from tray_app.errors import AuthError, LMGateError
from tray_app.identity.access import AccessPolicy
from tray_app.identity.principal import ALL_SCOPES, Budget, CredentialKind, Principal, PrincipalId
from tray_app.storage.audit import AuditSource
from tray_app.storage.budgets import NO_BUDGET
from tray_app.storage.credentials import CredentialStore, TokenRow
from tray_app.storage.database import SIGNING_KEY_GENERATION, Database

log = logging.getLogger("lmgate.tokens")

ALGORITHM = "HS256"
REQUIRED_CLAIMS = ["sub", "scope", "iat", "nbf", "exp", "jti"]
_KNOWN_CLAIMS = frozenset({*REQUIRED_CLAIMS, "models", "max_tokens"})
KINDS = frozenset({CredentialKind.TOKEN, CredentialKind.DEVICE, CredentialKind.SNIPPET})
LEEWAY_SECONDS = 5.0
# Where each kind of token is made: `lmgate token create`, the tray's curl snippet, /pair.
ISSUED_FROM = {
    CredentialKind.TOKEN: AuditSource.CLI,
    CredentialKind.SNIPPET: AuditSource.TRAY,
    CredentialKind.DEVICE: AuditSource.PAIRING,
}
_CACHE_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class TokenRecord:
    jti: str
    sub: str
    name: str
    kind: CredentialKind  # TOKEN (CLI), DEVICE (pairing), SNIPPET (copied curl)
    scopes: frozenset[str]
    models: frozenset[str] | None
    max_tokens: int | None
    created: float
    expires: float
    revoked: float | None
    device_id: str | None
    issued_sub: str | None = None  # the `sub` its JWT carries, where an upgrade renamed it

    @property
    def credential(self) -> PrincipalId:
        """The token itself (a device's token speaks for the device, but is its own)."""
        return PrincipalId(CredentialKind.TOKEN, self.jti)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str  # shown once, never stored
    record: TokenRecord


def check_scopes(scopes: frozenset[str]) -> frozenset[str]:
    unknown = scopes - ALL_SCOPES
    if unknown or not scopes:
        raise ValueError(
            f"scopes must be some of {', '.join(sorted(ALL_SCOPES))}; "
            f"got {', '.join(sorted(scopes)) or 'none'}"
        )
    return scopes


def _record(row: TokenRow) -> TokenRecord:
    return TokenRecord(
        jti=row.jti,
        sub=row.sub,
        name=row.name,
        kind=CredentialKind(row.kind),
        scopes=row.scopes,
        models=row.models,
        max_tokens=row.max_tokens,
        created=row.created,
        expires=row.expires,
        revoked=row.revoked,
        device_id=row.device_id,
        issued_sub=row.issued_sub,
    )


def _row(record: TokenRecord) -> TokenRow:
    return TokenRow(
        jti=record.jti,
        sub=record.sub,
        name=record.name,
        kind=record.kind.value,
        scopes=record.scopes,
        models=record.models,
        max_tokens=record.max_tokens,
        created=record.created,
        expires=record.expires,
        revoked=record.revoked,
        device_id=record.device_id,
        issued_sub=record.issued_sub,
    )


def _claims_match(claims: dict[str, object], record: TokenRecord) -> bool:
    """Whether the JWT says exactly what was issued: nothing added, changed or left out."""
    if not set(claims) <= _KNOWN_CLAIMS:
        return False
    max_tokens = claims.get("max_tokens")
    return (
        claims["sub"] == (record.issued_sub or record.sub)
        and claims["scope"] == " ".join(sorted(record.scopes))
        and claims["exp"] == int(record.expires)
        and claims["iat"] == claims["nbf"] == int(record.created)
        and ("models" in claims) == (record.models is not None)
        and (record.models is None or claims["models"] == sorted(record.models))
        and ("max_tokens" in claims) == (record.max_tokens is not None)
        # type(): True == 1 in Python, and a bool is no cap.
        and (
            record.max_tokens is None
            or (type(max_tokens) is int and max_tokens == record.max_tokens)
        )
    )


def principal_for(kind: CredentialKind, jti: str, device_id: str | None) -> PrincipalId:
    """The principal a token speaks for: its own (``token:<jti>``), or its device's."""
    if kind not in KINDS:
        raise ValueError(f"unknown token kind {kind!r}")
    if kind is CredentialKind.DEVICE:
        if not device_id:
            raise ValueError("a device token needs its device's ID")
        return PrincipalId(kind, device_id)
    return PrincipalId(kind, jti)


def _invalid(message: str, code: str) -> AuthError:
    return AuthError(message, code=code)


class TokenService:
    def __init__(
        self,
        db: Database,
        signing_key: bytes,
        clock: Clock,
        *,
        key_loader: Callable[[], bytes] | None = None,
        access: AccessPolicy,
    ) -> None:
        """``key_loader`` reads the signing key from this process's secret store again, for
        when another process (`lmgate keys rotate`) has replaced it; ``access`` says which
        models each kind of token may use now. It is required: a default would have to pick
        between "every model" and "what it was issued with", and either is wrong somewhere."""
        self._db = db
        self._store = CredentialStore(db)
        self._access = access
        self._key = signing_key
        self._clock = clock
        self._key_loader = key_loader
        self._key_generation = db.meta(SIGNING_KEY_GENERATION)
        # Tokens neither revoked nor expired, nor belonging to a revoked device.
        self._active: dict[str, TokenRecord] = {}
        self._cache: dict[str, tuple[Principal, float, str]] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read which tokens are live (after a revocation, possibly by another process)."""
        live = self._store.live_tokens(expiring_after=self._clock.time() - LEEWAY_SECONDS)
        self._active = {row.jti: _record(row) for row in live}
        self._cache.clear()

    def is_active(self, jti: str) -> bool:
        """Whether the token is live now, as far as this process has read the database."""
        record = self._active.get(jti)
        return record is not None and self._clock.time() < record.expires + LEEWAY_SECONDS

    def _lookup(self, jti: str) -> tuple[TokenRecord, bool] | None:
        """The record of ``jti`` and whether it is live: from memory, or (a token another
        process issued since the last refresh) by one primary-key lookup, so that a token is
        accepted on its first use."""
        record = self._active.get(jti)
        if record is not None:
            return record, True
        found = self._store.token(jti)
        if found is None:
            return None
        row, live = found
        record = _record(row)
        if live:
            self._active[jti] = record
        return record, live

    def replace_key(self, signing_key: bytes) -> None:
        self._key = signing_key
        self._cache.clear()

    def sync_key(self) -> bool:
        """Pick up a signing key another process rotated; True if the key changed. One small
        read: called on every database change, before issuing, and when a signature fails."""
        generation = self._db.meta(SIGNING_KEY_GENERATION)
        if generation == self._key_generation or self._key_loader is None:
            return False
        try:
            key = self._key_loader()
        except LMGateError as exc:  # a locked keyring: keep the old key, retry on the next change
            log.error("the signing key was rotated but cannot be read: %s", exc)
            return False
        self.replace_key(key)
        self._key_generation = generation
        log.info("the signing key was rotated; tokens are now checked against the new one")
        return True

    # ---- issuing ----------------------------------------------------------------------------

    def issue(
        self,
        *,
        name: str,
        scopes: frozenset[str],
        ttl: float,
        kind: CredentialKind = CredentialKind.TOKEN,
        models: frozenset[str] | None = None,
        max_tokens: int | None = None,
        device_id: str | None = None,
        budget: Budget = NO_BUDGET,
        source: AuditSource | None = None,
    ) -> IssuedToken:
        """Issue a token and record it with its budget and where it was made (by default
        where its kind is made: see ``ISSUED_FROM``). A device's token (``kind`` DEVICE) has
        neither: its device was given both when it paired. No budget is ever in the claims."""
        check_scopes(scopes)
        self.sync_key()  # never sign with a key another process has just rotated away
        if ttl <= 0:
            raise ValueError("the lifetime must be positive")
        now = self._clock.time()
        jti = secrets.token_hex(12)
        sub = principal_for(kind, jti, device_id)
        claims: dict[str, object] = {
            "sub": str(sub),
            "scope": " ".join(sorted(scopes)),
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + ttl),
            "jti": jti,
        }
        if models is not None:
            claims["models"] = sorted(models)
        if max_tokens is not None:
            claims["max_tokens"] = max_tokens
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM)
        record = TokenRecord(
            jti,
            str(sub),
            name,
            kind,
            scopes,
            models,
            max_tokens,
            now,
            float(int(now + ttl)),
            None,
            device_id,
        )
        own = kind is not CredentialKind.DEVICE
        self._store.add_token(
            _row(record),
            budget=budget if own else None,
            source=(source or ISSUED_FROM[kind]) if own else None,
        )
        self._active[jti] = record
        return IssuedToken(token, record)

    # ---- verifying --------------------------------------------------------------------------

    def verify(self, token: str) -> Principal:
        now = self._clock.time()
        cached = self._cache.get(token)
        if cached is not None:
            principal, expires, jti = cached
            if now < expires + LEEWAY_SECONDS and jti in self._active:
                return principal
            self._cache.pop(token, None)
        try:
            principal, expires, jti = self._decode(token, now)
        except AuthError as exc:
            # Signed with a key rotated a moment ago, by a process we have not heard from yet?
            if exc.code != "invalid_token" or not self.sync_key():
                raise
            principal, expires, jti = self._decode(token, now)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (principal, expires, jti)
        return principal

    def _decode(self, token: str, now: float) -> tuple[Principal, float, str]:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                # Times are checked below against the injected clock, not PyJWT's time.time().
                options={
                    "require": REQUIRED_CLAIMS,
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise _invalid(
                "The access token's signature is invalid (was the signing key rotated?).",
                "invalid_token",
            ) from None
        except jwt.InvalidAlgorithmError:
            raise _invalid(
                "The access token uses a signing algorithm LM Gate does not accept.",
                "invalid_token",
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(
                f"The access token lacks the {exc.claim!r} claim.", "invalid_token"
            ) from None
        except jwt.InvalidTokenError:
            raise _invalid(
                "The credential is neither a valid access token nor an API key.", "invalid_token"
            ) from None
        if not all(
            isinstance(claims[c], int | float) and not isinstance(claims[c], bool)
            for c in ("exp", "nbf", "iat")
        ):
            raise _invalid("The access token's time claims are malformed.", "invalid_token")
        if claims["exp"] + LEEWAY_SECONDS <= now:
            raise _invalid("The access token has expired; get a new one.", "token_expired")
        if claims["nbf"] - LEEWAY_SECONDS > now:
            raise _invalid("The access token is not valid yet.", "token_not_yet_valid")
        jti, sub, scope = claims["jti"], claims["sub"], claims["scope"]
        if not (isinstance(jti, str) and isinstance(sub, str) and isinstance(scope, str)):
            raise _invalid("The access token's claims are malformed.", "invalid_token")
        found = self._lookup(jti)
        if found is None:
            raise _invalid("The access token has been revoked.", "token_revoked")
        record, live = found
        if not _claims_match(claims, record):
            # Only someone holding the signing key can make this: refuse it outright.
            raise _invalid(
                "The access token does not match the token LM Gate issued.", "invalid_token"
            )
        if not live:
            raise _invalid("The access token has been revoked.", "token_revoked")
        principal = Principal(
            name=record.sub,
            scopes=record.scopes & ALL_SCOPES,
            models=self._access.models_now(record.kind, record.models),
            max_tokens=record.max_tokens,
            credential=record.credential,
        )
        return principal, record.expires, jti

    # ---- listing and revoking -----------------------------------------------------------

    def list(self, *, include_expired: bool = False) -> list[TokenRecord]:
        expiring_after = None if include_expired else self._clock.time()
        return [_record(row) for row in self._store.tokens(expiring_after=expiring_after)]

    def revoke(self, jti_prefix: str, *, source: AuditSource = AuditSource.CLI) -> TokenRecord:
        """Revoke one token by its jti (a unique prefix of at least 6 characters will do)."""
        if len(jti_prefix) < 6:
            raise ValueError("give at least 6 characters of the token ID")
        rows = self._store.tokens_with_prefix(jti_prefix)
        if not rows:
            raise LookupError(f"no token with ID {jti_prefix!r}")
        if len(rows) > 1:
            raise LookupError(f"{jti_prefix!r} matches {len(rows)} tokens; give more of the ID")
        record = _record(rows[0])
        self._store.revoke_token(record.jti, self._clock.time(), source=source)
        self._active.pop(record.jti, None)
        self._cache.clear()
        return record
