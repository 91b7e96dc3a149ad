"""Where secrets live: one small interface, several explicit backends.

Secrets are small and stored one per entry (Windows caps a credential at 2560 bytes). The OS
keyring backend arrives with the identity layer; until then the gateway reads secrets from an
in-memory store (tests, one-run keys) or from ``LMGATE_SECRET_*`` environment variables, which is
an explicit choice for containers. Nothing here ever falls back to a plaintext file on its own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from tray_app.config.upstreams import LOCAL_TOKEN_SECRET
from tray_app.errors import SecretStoreError

# Entry names, one secret each. Each further upstream's token has its own entry
# (config.upstreams.token_secret_name).
LMSTUDIO_API_TOKEN = LOCAL_TOKEN_SECRET
# With state.backend = postgres: where the shared state lives. URLs, because they carry the
# password (postgresql://user:pw@host/db, redis://:pw@host:6379/0), never config or argv.
STATE_DATABASE_URL = "state-database-url"
STATE_REDIS_URL = "state-redis-url"

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
MAX_SECRET_BYTES = 2048


def check_entry(name: str, value: str | None = None) -> None:
    if not _NAME.match(name):
        raise SecretStoreError(f"invalid secret name {name!r}")
    if value is not None and len(value.encode("utf-8")) > MAX_SECRET_BYTES:
        raise SecretStoreError(f"secret {name!r} is larger than {MAX_SECRET_BYTES} bytes")


def is_entry_name(name: str) -> bool:
    return _NAME.match(name) is not None


def read_or_none(store: SecretStore | None, name: str) -> str | None:
    """A secret for a check or a probe: a missing or unusable store counts as "not set"."""
    if store is None:
        return None
    try:
        return store.get(name)
    except SecretStoreError:
        return None


class SecretStore(Protocol):
    """get/set/delete of small named secrets."""

    def get(self, name: str) -> str | None: ...

    def set(self, name: str, value: str) -> None: ...

    def delete(self, name: str) -> None: ...


@runtime_checkable
class ListingSecretStore(SecretStore, Protocol):
    """A store that can say which entries it has (an OS keyring cannot)."""

    def names(self) -> list[str]: ...


class MemorySecretStore:
    """Secrets that live only as long as this object: for tests and one-run keys."""

    def __init__(self, initial: Mapping[str, str] | None = None) -> None:
        self._values: dict[str, str] = {}
        for name, value in (initial or {}).items():
            self.set(name, value)

    def get(self, name: str) -> str | None:
        check_entry(name)
        return self._values.get(name)

    def set(self, name: str, value: str) -> None:
        check_entry(name, value)
        self._values[name] = value

    def delete(self, name: str) -> None:
        check_entry(name)
        self._values.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._values)


class EnvSecretStore:
    """Read-only secrets from ``LMGATE_SECRET_<NAME>`` variables, chosen explicitly (containers)."""

    PREFIX = "LMGATE_SECRET_"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    @classmethod
    def variable_for(cls, name: str) -> str:
        return cls.PREFIX + name.replace("-", "_").upper()

    def get(self, name: str) -> str | None:
        check_entry(name)
        value = self._environ.get(self.variable_for(name))
        return value or None

    def names(self) -> list[str]:
        # A variable's name is the entry's upper-cased, '-' as '_': an entry's own '_' cannot
        # be told from its '-', and entries have only '-'.
        return sorted(
            variable.removeprefix(self.PREFIX).lower().replace("_", "-")
            for variable, value in self._environ.items()
            if variable.startswith(self.PREFIX) and value
        )

    def set(self, name: str, value: str) -> None:
        raise SecretStoreError(
            f"secrets from the environment are read-only; set {self.variable_for(name)} instead"
        )

    def delete(self, name: str) -> None:
        raise SecretStoreError(
            f"secrets from the environment are read-only; unset {self.variable_for(name)} instead"
        )
