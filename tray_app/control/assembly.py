"""Putting the parts together: secret store, database, identity services and the gateway.

The CLI, the tray (later) and tests all build a gateway here, each passing in what differs
(the secret store, the clock, the data directory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tray_app.clock import Clock, SystemClock
from tray_app.config.settings import Config
from tray_app.control.shared_state import (
    SharedSigningKey,
    load_shared_signing_key,
    shared_secret,
    uses_shared_state,
)
from tray_app.errors import SecretStoreError, StorageError
from tray_app.gateway.accounting import UsageRecorder
from tray_app.gateway.app import Gateway
from tray_app.gateway.budgets import BudgetLedger
from tray_app.gateway.metrics import GatewayMetrics
from tray_app.gateway.state_calls import StateCalls
from tray_app.identity.access import AccessPolicy, budget_from_settings
from tray_app.identity.api_keys import ApiKeyService
from tray_app.identity.authenticator import IdentityAuthenticator
from tray_app.identity.pairing import PairingService
from tray_app.identity.signing_key import (
    load_or_create_signing_key,
    load_signing_key,
    rotate_signing_key,
)
from tray_app.identity.tokens import TokenService
from tray_app.secret_store.base import STATE_DATABASE_URL, STATE_REDIS_URL, SecretStore
from tray_app.secret_store.keyring_store import open_secret_store
from tray_app.storage.conversations import ConversationStore
from tray_app.storage.credentials import CredentialStore
from tray_app.storage.database import Database, default_data_dir
from tray_app.storage.usage_history import UsageHistory

if TYPE_CHECKING:
    from tray_app.gateway.shared_limits import SharedLimits

log = logging.getLogger("lmgate.assembly")


def data_dir(config: Config) -> Path:
    return Path(config.storage_data_dir) if config.storage_data_dir else default_data_dir()


def secret_store_for(config: Config) -> SecretStore:
    """The store the config names; raises SecretStoreError with advice when it is unusable."""
    file_dir = (
        Path(config.secrets_file_dir) if config.secrets_file_dir else data_dir(config) / "secrets"
    )
    return open_secret_store(config.secrets_store, file_dir=file_dir)


def open_database(config: Config, store: SecretStore | None) -> Database:
    """The configured database: this machine's SQLite file, or with state.backend = postgres
    the replicas' shared PostgreSQL (its URL a secret: SecretStoreError when it is not set)."""
    if not uses_shared_state(config):
        return Database.in_directory(data_dir(config))
    from tray_app.storage.postgres import PostgresDatabase  # psycopg only in this mode

    url = shared_secret(store, STATE_DATABASE_URL)  # a missing URL is said first
    return PostgresDatabase.connect(url, pool_size=config.state_database_pool_size)


@dataclass(frozen=True, slots=True)
class SharedIdentityParts:
    """What a replica opens before its identity services: the shared database and the
    signing key every replica derives alike (control.shared_state)."""

    db: Database
    signing: SharedSigningKey


def open_shared(config: Config, store: SecretStore) -> SharedIdentityParts:
    db = open_database(config, store)
    try:
        return SharedIdentityParts(db, load_shared_signing_key(store, db))
    except BaseException:
        db.close()
        raise


@dataclass
class Identity:
    db: Database
    tokens: TokenService
    api_keys: ApiKeyService
    pairing: PairingService
    authenticator: IdentityAuthenticator
    recorder: UsageRecorder
    clock: Clock
    access: AccessPolicy
    # With shared state: where the signing key comes from (a rotation keeps the master).
    shared_signing: SharedSigningKey | None = None

    def close(self) -> None:
        # The gateway's last flush came first: a journal with nothing left to save goes.
        self.recorder.close()
        self.db.close()


def open_identity(
    config: Config,
    signing_key: bytes,
    *,
    clock: Clock | None = None,
    db: Database | None = None,
    key_loader: Callable[[], bytes] | None = None,
    shared: SharedIdentityParts | None = None,
) -> Identity:
    """The identity services on the configured data directory. A gateway passes
    ``key_loader`` (see :func:`signing_key_loader`) so that `lmgate keys rotate` reaches it
    while it runs; without one, a rotated key needs a restart. A replica passes ``shared``
    (:func:`open_shared`): its database, and its key derived at every generation."""
    clock = clock or SystemClock()
    if shared is not None:
        db, key_loader = shared.db, shared.signing.current
    db = db or Database.in_directory(data_dir(config))
    access = AccessPolicy.with_allowlist(config.auth_allowed_models).with_budgets(
        device=budget_from_settings(
            config.budget_device_tokens_per_day, config.budget_device_tokens_per_month
        ),
        copied_key=budget_from_settings(
            config.budget_copied_key_tokens_per_day, config.budget_copied_key_tokens_per_month
        ),
    )
    tokens = TokenService(db, signing_key, clock, key_loader=key_loader, access=access)
    api_keys = ApiKeyService(db, clock)
    pairing = PairingService(
        db,
        tokens,
        clock,
        code_ttl=config.auth_pairing_code_ttl,
        device_token_ttl=config.auth_device_token_ttl,
        access=access,
    )
    authenticator = IdentityAuthenticator(
        db, tokens, api_keys, clock, dev_mode=config.auth_dev_mode
    )
    recorder = UsageRecorder(db, clock)
    return Identity(
        db,
        tokens,
        api_keys,
        pairing,
        authenticator,
        recorder,
        clock,
        access,
        shared.signing if shared is not None else None,
    )


def signing_key_loader(store: SecretStore) -> Callable[[], bytes]:
    """Reads the signing key from ``store`` again: what a gateway needs after a rotation."""
    return lambda: load_signing_key(store)


@dataclass(frozen=True, slots=True)
class Rotation:
    tokens_revoked: int
    devices_revoked: int


def rotate_signing_key_everywhere(identity: Identity, store: SecretStore) -> Rotation:
    """`lmgate keys rotate`: a new key in ``store``; every token and paired device revoked
    and the key's generation bumped in one transaction, so a running gateway sees all of it
    at once and re-reads the key from its own store. API keys are not signed: they stay."""
    if identity.shared_signing is not None:
        # The master stays: the new key is the next generation's, which every replica
        # derives from the same master once it sees the bump.
        revoked = CredentialStore(identity.db).revoke_for_key_rotation(identity.clock.time())
        identity.tokens.replace_key(identity.shared_signing.current())
        identity.tokens.reload()
        return Rotation(revoked.tokens, revoked.devices)
    key = rotate_signing_key(store)
    revoked = CredentialStore(identity.db).revoke_for_key_rotation(identity.clock.time())
    identity.tokens.replace_key(key)
    identity.tokens.reload()
    return Rotation(revoked.tokens, revoked.devices)


def signing_key_or_ephemeral(store: SecretStore | None) -> tuple[bytes, str | None]:
    """The stored signing key, or (when no store can keep one) a key for this run only and a
    warning saying so. Tokens signed with it die with the process: safe, never plaintext."""
    import secrets as stdlib_secrets

    if store is not None:
        try:
            return load_or_create_signing_key(store), None
        except SecretStoreError as exc:
            reason = str(exc)
    else:
        reason = "no secret store is available"
    warning = (
        f"Token signing key kept in memory for this run only ({reason}) Device tokens "
        "and `lmgate token` tokens stop working when LM Gate stops; API keys keep working."
    )
    return stdlib_secrets.token_bytes(32), warning


def shared_limits_for(config: Config, store: SecretStore) -> SharedLimits | None:
    """A replica's limits on the Redis its URL secret names; None on one machine, where they
    are counted in this process. SecretStoreError when the URL is not set."""
    if not uses_shared_state(config):
        return None
    url = shared_secret(store, STATE_REDIS_URL)
    try:
        # Here, not at the top: redis-py is the `team` extra's, and one machine runs without it.
        from tray_app.gateway.shared_limits import SharedLimits
    except ImportError:
        raise StorageError(
            "state.backend = postgres needs the team extra: pip install 'lmgate[team]'"
        ) from None
    return SharedLimits(config, url)


def build_gateway(
    config: Config,
    identity: Identity,
    store: SecretStore,
    *,
    clock: Clock | None = None,
) -> Gateway:
    clock = clock or SystemClock()
    # What a process killed on this data directory had counted and not saved is saved now,
    # and this one journals its own.
    identity.recorder.keep_journal(data_dir(config) / "usage-journal")
    return Gateway(
        config,
        identity.authenticator,
        shared_limits=shared_limits_for(config, store),
        secrets=store,
        clock=clock,
        pairing=identity.pairing,
        metrics=GatewayMetrics(),
        recorder=identity.recorder,
        conversations=ConversationStore(identity.db, clock),
        ledger=BudgetLedger(
            UsageHistory(identity.db), clock, pending=identity.recorder.pending_tokens
        ),
        # Two connections fewer than the pool: the usage flush and the outage probe take
        # theirs without waiting, so a busy gateway is never taken for a database gone.
        state_calls=StateCalls(
            offload=identity.db.remote, workers=max(1, config.state_database_pool_size - 2)
        ),
    )
