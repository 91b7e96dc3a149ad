"""What a team gateway's replicas share, and how each one opens it (state.backend = postgres).

Records live in PostgreSQL, limits in Redis; both URLs carry a password, so they are secrets
(``state-database-url``, ``state-redis-url``) read from the secret store — the keyring on a
desktop, ``LMGATE_SECRET_*`` variables in a container — never from config, argv or a log line.
Nothing here ever shows a URL: an error names the secret, not its value.

Every replica must sign and check tokens with the same key, and `lmgate keys rotate` on one must
reach all of them. A key kept in each machine's own store cannot do that, so with shared state
the stored ``jwt-signing-key`` is a master that never signs anything itself: the signing key is
derived from it and the key generation kept in the database (HMAC-SHA256 of the generation).
Rotating bumps the generation with the revocations, in one transaction, and every replica
derives the new key from the same master when it notices — nobody has to copy a new secret to
each machine. A replica whose master differs from the others' would sign tokens nobody else
accepts; the database keeps a fingerprint of the first master (an HMAC, which reveals nothing
of it) and a replica with another refuses to start. A leaked master is the one thing rotation
cannot fix: set a new one on every replica (README "Team gateway").
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from tray_app.config.parsers import StateBackend
from tray_app.config.settings import Config
from tray_app.errors import SecretStoreError
from tray_app.identity.signing_key import SIGNING_KEY, check_signing_key, load_signing_key
from tray_app.secret_store.base import STATE_DATABASE_URL, STATE_REDIS_URL, SecretStore
from tray_app.storage.database import SIGNING_KEY_GENERATION, Database

# meta key of the master's fingerprint; the first replica (or `lmgate state migrate`) sets it.
MASTER_FINGERPRINT = "signing_master_fingerprint"

_SCHEMES = {
    STATE_DATABASE_URL: ("postgresql", "postgres"),
    STATE_REDIS_URL: ("redis", "rediss", "unix"),
}


def check_shared_secret(name: str, value: str) -> None:
    """Refuse a value that cannot be what ``name`` holds, before it is stored (a typo found
    now, not when every replica fails to start). The message never repeats the value."""
    if name == SIGNING_KEY:
        check_signing_key(value)
        return
    schemes = _SCHEMES.get(name)
    if schemes is None:
        return
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is not None and "@" in value and "@" not in parts.netloc:
        parts = None  # a password with a "/" or "?" in it, not percent-encoded
    if parts is None or parts.scheme not in schemes or not (parts.hostname or parts.path):
        example = (
            "postgresql://lmgate:PASSWORD@db.internal:5432/lmgate"
            if name == STATE_DATABASE_URL
            else "redis://:PASSWORD@cache.internal:6379/0"
        )
        raise SecretStoreError(f"{name} must be a URL like {example}; it was not changed")


def shared_secret(store: SecretStore | None, name: str) -> str:
    """A secret the shared state cannot work without; SecretStoreError saying how to set it."""
    value = store.get(name) if store is not None else None
    if not value:
        raise SecretStoreError(
            f"state.backend = postgres needs the secret {name}: "
            f"`lmgate secret set {name}` (or LMGATE_SECRET_{name.upper().replace('-', '_')} "
            "with secrets.store = env)"
        )
    check_shared_secret(name, value)
    return value


def derived_signing_key(master: bytes, generation: str | None) -> bytes:
    """The key tokens are signed with at ``generation`` (None: never rotated)."""
    label = b"lmgate token signing key, generation " + (generation or "0").encode()
    return hmac.new(master, label, hashlib.sha256).digest()


def master_fingerprint(master: bytes) -> str:
    return hmac.new(master, b"lmgate signing master fingerprint", hashlib.sha256).hexdigest()


def claim_or_check_master(db: Database, master: bytes) -> None:
    """The first replica records its master's fingerprint; every later one must match it."""
    mine = master_fingerprint(master)
    stored = db.claim_meta(MASTER_FINGERPRINT, mine)
    if not hmac.compare_digest(stored.encode(), mine.encode()):
        raise SecretStoreError(
            f"this replica's {SIGNING_KEY} differs from the one the other replicas use: its "
            "tokens would be refused everywhere else. Set the same value on every replica "
            f"(`lmgate secret set {SIGNING_KEY}`)."
        )


class SharedSigningKey:
    """The signing key of a replica: derived from the master at the database's generation."""

    def __init__(self, db: Database, master: bytes) -> None:
        self._db = db
        self._master = master

    def current(self) -> bytes:
        return derived_signing_key(self._master, self._db.meta(SIGNING_KEY_GENERATION))


def load_shared_signing_key(store: SecretStore, db: Database) -> SharedSigningKey:
    """The master from the store, checked against the other replicas'. No key for this run
    only, as a single machine may fall back to: tokens signed with it would work on this
    replica alone."""
    try:
        master = load_signing_key(store)
    except SecretStoreError as exc:
        raise SecretStoreError(
            f"state.backend = postgres needs {SIGNING_KEY}, the same on every replica ({exc}): "
            f"`lmgate secret set {SIGNING_KEY}` with a value such as the output of "
            "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        ) from None
    claim_or_check_master(db, master)
    return SharedSigningKey(db, master)


def uses_shared_state(config: Config) -> bool:
    return config.state_backend is StateBackend.POSTGRES
