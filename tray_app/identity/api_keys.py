"""API keys for scripts: ``lmg_`` + 32 random bytes, shown once, stored only as a SHA-256 hash.

A hash without salt is right here: the key has 256 bits of entropy, so no dictionary exists,
and an unsalted hash lets a key be found by one indexed lookup. That lookup is made whenever a
key is not in memory yet, so a key the CLI created a moment ago works on its first request.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from tray_app.clock import Clock
from tray_app.errors import AuthError
from tray_app.identity.principal import Budget, CredentialKind, Principal, PrincipalId
from tray_app.identity.tokens import check_scopes
from tray_app.storage.audit import AuditSource
from tray_app.storage.budgets import NO_BUDGET
from tray_app.storage.credentials import ApiKeyRow, CredentialStore
from tray_app.storage.database import Database

PREFIX = "lmg_"
KEY_BYTES = 32


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def looks_like_api_key(credential: str) -> bool:
    return credential.startswith(PREFIX)


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: str
    name: str
    scopes: frozenset[str]
    models: frozenset[str] | None
    created: float
    expires: float | None
    last_used: float | None
    revoked: float | None

    @property
    def principal(self) -> PrincipalId:
        return PrincipalId(CredentialKind.KEY, self.id)

    @property
    def principal_name(self) -> str:
        return str(self.principal)


def _record(row: ApiKeyRow) -> ApiKeyRecord:
    return ApiKeyRecord(
        row.id,
        row.name,
        row.scopes,
        row.models,
        row.created,
        row.expires,
        row.last_used,
        row.revoked,
    )


class ApiKeyService:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._store = CredentialStore(db)
        self._clock = clock
        self._by_hash: dict[str, tuple[ApiKeyRecord, Principal]] = {}
        self._by_id: dict[str, ApiKeyRecord] = {}
        self.reload()

    def reload(self) -> None:
        # Made aside and swapped in whole: another state thread checking a key meanwhile sees
        # the old set or the new one, never an empty one half filled.
        by_hash: dict[str, tuple[ApiKeyRecord, Principal]] = {}
        by_id: dict[str, ApiKeyRecord] = {}
        for row in self._store.api_keys():
            record = _record(row)
            by_hash[row.key_hash] = (record, _principal(record))
            by_id[record.id] = record
        self._by_hash, self._by_id = by_hash, by_id

    def _remember(self, hashed: str, record: ApiKeyRecord) -> tuple[ApiKeyRecord, Principal]:
        found = (record, _principal(record))
        self._by_hash[hashed] = found
        self._by_id[record.id] = record
        return found

    def is_active(self, key_id: str) -> bool:
        """Whether the key is neither revoked nor expired, as far as this process has read."""
        record = self._by_id.get(key_id)
        return record is not None and self._usable(record)

    def _usable(self, record: ApiKeyRecord) -> bool:
        return record.revoked is None and (
            record.expires is None or record.expires > self._clock.time()
        )

    def create(
        self,
        name: str,
        *,
        scopes: frozenset[str],
        models: frozenset[str] | None = None,
        ttl: float | None = None,
        budget: Budget = NO_BUDGET,
        source: AuditSource = AuditSource.CLI,
    ) -> tuple[str, ApiKeyRecord]:
        """Make a key with its budget, recording where it was made; returns (the key, shown
        once; its record)."""
        check_scopes(scopes)
        if not name.strip():
            raise ValueError("an API key needs a name")
        key = PREFIX + secrets.token_urlsafe(KEY_BYTES)
        hashed = key_hash(key)
        now = self._clock.time()
        record = ApiKeyRecord(
            secrets.token_hex(6),
            name.strip(),
            scopes,
            models,
            now,
            None if ttl is None else now + ttl,
            None,
            None,
        )
        self._store.add_api_key(
            ApiKeyRow(
                record.id,
                record.name,
                hashed,
                scopes,
                models,
                now,
                record.expires,
                None,
                None,
            ),
            budget=budget,
            source=source,
        )
        self._remember(hashed, record)
        return key, record

    def verify(self, key: str) -> tuple[ApiKeyRecord, Principal]:
        hashed = key_hash(key)
        found = self._by_hash.get(hashed)
        if found is None:
            # Made by another process since the last refresh? One indexed lookup says.
            row = self._store.api_key_by_hash(hashed)
            if row is None:
                raise AuthError("Invalid API key.", code="invalid_api_key")
            found = self._remember(hashed, _record(row))
        record, principal = found
        if record.revoked is not None:
            raise AuthError("This API key has been revoked.", code="api_key_revoked")
        if record.expires is not None and record.expires <= self._clock.time():
            raise AuthError("This API key has expired; create a new one.", code="api_key_expired")
        return record, principal

    def list(self) -> list[ApiKeyRecord]:
        return [_record(row) for row in self._store.api_keys()]

    def revoke(self, key_id: str, *, source: AuditSource = AuditSource.CLI) -> ApiKeyRecord:
        revoked = self._store.revoke_api_key(key_id, self._clock.time(), source=source)
        if revoked is None:
            raise LookupError(f"no API key with ID {key_id!r}")
        self.reload()
        return _record(revoked)


def _principal(record: ApiKeyRecord) -> Principal:
    # An API key keeps the models it was made with: the allowlist of later does not reach it
    # (see identity.access).
    return Principal(
        record.principal_name, record.scopes, record.models, credential=record.principal
    )
