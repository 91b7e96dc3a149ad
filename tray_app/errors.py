"""LM Gate's exception tree.

Every error the core raises on purpose is one of these, so the CLI and the UI can turn any of
them into one sentence for the user without catching unrelated bugs::

    LMGateError
    ├── ConfigError        a setting is missing, malformed or out of range
    ├── AuthError          a caller could not be authenticated or is not allowed
    │   └── PairingError   a pairing code was refused (tray_app.identity.pairing)
    ├── TunnelError        the public tunnel could not be opened or was lost
    ├── SecretStoreError   no usable secret store, or it refused an operation
    ├── StorageError       LM Gate's database cannot be opened or written
    └── ApiError           a request the gateway answers with an error, as its client sees
                           it (tray_app.gateway.api_errors: the catalogue of every one)
"""

from __future__ import annotations


class LMGateError(Exception):
    """Base class of every error LM Gate raises on purpose."""


class ConfigError(LMGateError):
    """A configuration value is invalid; the message names the key and what is wrong."""

    def __init__(self, key: str, problem: str, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f" (from {source})" if source else ""
        super().__init__(f"{key}{where}: {problem}")


class AuthError(LMGateError):
    """Authentication failed (401) or the principal may not do this (403)."""

    def __init__(self, message: str, *, status: int = 401, code: str = "invalid_api_key") -> None:
        self.status = status
        self.code = code
        super().__init__(message)


class TunnelError(LMGateError):
    """A tunnel could not be opened, or an open one was lost."""


class SecretStoreError(LMGateError):
    """The secret store is unusable or refused an operation."""


class StorageError(LMGateError):
    """LM Gate's database cannot be opened or written (corrupt, locked, disk full)."""
