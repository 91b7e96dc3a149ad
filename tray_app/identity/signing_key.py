"""The key that signs access tokens: 256 random bits, made on first use, kept in the secret
store. Rotating it invalidates every token ever issued."""

from __future__ import annotations

import base64
import secrets

from tray_app.errors import SecretStoreError
from tray_app.secret_store.base import SecretStore

SIGNING_KEY = "jwt-signing-key"
KEY_BYTES = 32


def _decode(text: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.encode() + b"=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise SecretStoreError(
            "The stored token signing key is damaged; rotate it with "
            "`lmgate keys rotate` (every token must then be re-issued)."
        ) from None
    if len(key) < KEY_BYTES:
        raise SecretStoreError(
            "The stored token signing key is too short; rotate it with `lmgate keys rotate`."
        )
    return key


def check_signing_key(text: str) -> None:
    """Refuse a value for the key that could not sign (`lmgate secret set jwt-signing-key`
    for a team gateway's replicas, which must all hold the same one)."""
    try:
        _decode(text)
    except SecretStoreError:
        raise SecretStoreError(
            f"{SIGNING_KEY} must be at least {KEY_BYTES} random bytes in URL-safe base64 (for "
            "example the output of `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            "; it was not changed"
        ) from None


def load_signing_key(store: SecretStore) -> bytes:
    """The stored key, for a running gateway re-reading it after `lmgate keys rotate`."""
    existing = store.get(SIGNING_KEY)
    if existing is None:
        raise SecretStoreError(f"the secret store holds no {SIGNING_KEY}")
    return _decode(existing)


def load_or_create_signing_key(store: SecretStore) -> bytes:
    existing = store.get(SIGNING_KEY)
    if existing is not None:
        return _decode(existing)
    return rotate_signing_key(store)


def rotate_signing_key(store: SecretStore) -> bytes:
    key = secrets.token_bytes(KEY_BYTES)
    store.set(SIGNING_KEY, base64.urlsafe_b64encode(key).decode().rstrip("="))
    return key
