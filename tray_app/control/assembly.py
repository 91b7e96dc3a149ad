"""Putting the parts together: secret store, database, identity services and the gateway.

The CLI, the tray (later) and tests all build a gateway here, each passing in what differs
(the secret store, the clock, the data directory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tray_app.clock import Clock, SystemClock
from tray_app.config.settings import Config
from tray_app.errors import SecretStoreError
from tray_app.gateway.accounting import UsageRecorder
from tray_app.gateway.app import Gateway
from tray_app.gateway.budgets import BudgetLedger
from tray_app.gateway.metrics import GatewayMetrics
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
from tray_app.secret_store.base import SecretStore
from tray_app.secret_store.keyring_store import open_secret_store
from tray_app.storage.conversations import ConversationStore
from tray_app.storage.credentials import CredentialStore
from tray_app.storage.database import Database, default_data_dir
from tray_app.storage.usage_history import UsageHistory

log = logging.getLogger("lmgate.assembly")


def data_dir(config: Config) -> Path:
    return Path(config.storage_data_dir) if config.storage_data_dir else default_data_dir()


def secret_store_for(config: Config) -> SecretStore:
    """The store the config names; raises SecretStoreError with advice when it is unusable."""
    file_dir = (
        Path(config.secrets_file_dir) if config.secrets_file_dir else data_dir(config) / "secrets"
    )
    return open_secret_store(config.secrets_store, file_dir=file_dir)


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

    def close(self) -> None:
        self.db.close()


def open_identity(
    config: Config,
    signing_key: bytes,
    *,
    clock: Clock | None = None,
    db: Database | None = None,
    key_loader: Callable[[], bytes] | None = None,
) -> Identity:
    """The identity services on the configured data directory. A gateway passes
    ``key_loader`` (see :func:`signing_key_loader`) so that `lmgate keys rotate` reaches it
    while it runs; without one, a rotated key needs a restart."""
    clock = clock or SystemClock()
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
    return Identity(db, tokens, api_keys, pairing, authenticator, recorder, clock, access)


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


def build_gateway(
    config: Config,
    identity: Identity,
    store: SecretStore,
    *,
    clock: Clock | None = None,
) -> Gateway:
    clock = clock or SystemClock()
    return Gateway(
        config,
        identity.authenticator,
        secrets=store,
        clock=clock,
        pairing=identity.pairing,
        metrics=GatewayMetrics(),
        recorder=identity.recorder,
        conversations=ConversationStore(identity.db, clock),
        ledger=BudgetLedger(
            UsageHistory(identity.db), clock, pending=identity.recorder.pending_tokens
        ),
    )
