"""Secret stores that persist: the OS keyring (the default) and an explicit private file.

The keyring store refuses to work when keyring has no usable backend (headless Linux gets the
``fail`` backend) and says how to fix that; it never falls back to a file on its own. The file
store exists for containers and servers, and only when chosen by name.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

import keyring
import keyring.backend
import keyring.errors

from tray_app.errors import SecretStoreError
from tray_app.paths import make_private_dir
from tray_app.secret_store.base import (
    EnvSecretStore,
    MemorySecretStore,
    SecretStore,
    check_entry,
    is_entry_name,
)

SERVICE = "lmgate"

NO_KEYRING_HELP = (
    "No usable OS keyring was found, and LM Gate keeps its secrets only in one. "
    "On a Linux desktop install and unlock GNOME Keyring or KWallet "
    "(e.g. `sudo apt install gnome-keyring`, then log in again); on a server or in a container, "
    "choose a store on purpose: `--secret-store file` keeps secrets in a private 0600 file, "
    "`--secret-store env` reads LMGATE_SECRET_* variables."
)


def _usable(backend: keyring.backend.KeyringBackend) -> bool:
    try:
        priority = float(backend.priority)
    except Exception:  # a backend that cannot even say its priority is unusable
        return False
    if priority <= 0:
        return False
    module = type(backend).__module__
    # The chainer wraps the real backends; it is usable only if one of them is.
    if module.startswith("keyring.backends.chainer"):
        return any(_usable(b) for b in getattr(backend, "backends", []))
    return not module.startswith(("keyring.backends.fail", "keyring.backends.null"))


class KeyringSecretStore:
    """Secrets in the OS keyring under the service name ``lmgate``, one entry each."""

    def __init__(self, backend: keyring.backend.KeyringBackend | None = None) -> None:
        self._backend = backend or keyring.get_keyring()
        if not _usable(self._backend):
            raise SecretStoreError(NO_KEYRING_HELP)

    @property
    def backend_name(self) -> str:
        return f"{type(self._backend).__module__}.{type(self._backend).__name__}"

    def get(self, name: str) -> str | None:
        check_entry(name)
        try:
            return self._backend.get_password(SERVICE, name)
        except keyring.errors.KeyringError as exc:
            raise SecretStoreError(
                f"The OS keyring refused to read {name!r}: {exc}. "
                "Is it locked? Unlock it and try again."
            ) from None

    def set(self, name: str, value: str) -> None:
        check_entry(name, value)
        try:
            self._backend.set_password(SERVICE, name, value)
        except keyring.errors.KeyringError as exc:
            raise SecretStoreError(
                f"The OS keyring refused to store {name!r}: {exc}. "
                "Is it locked? Unlock it and try again."
            ) from None

    def delete(self, name: str) -> None:
        check_entry(name)
        try:
            self._backend.delete_password(SERVICE, name)
        except keyring.errors.PasswordDeleteError:
            return  # already absent
        except keyring.errors.KeyringError as exc:
            raise SecretStoreError(f"The OS keyring refused to delete {name!r}: {exc}.") from None


class FileSecretStore:
    """Secrets as files in a private directory (0700, files 0600): an explicit server choice.

    One file per secret keeps each small and lets a deployment mount them (Docker secrets).
    """

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        try:
            # Every directory it makes is 0700, the data directory above it too on a fresh
            # install (mkdir(parents=True) would leave that one 0755).
            make_private_dir(directory)
        except OSError as exc:
            raise SecretStoreError(f"Cannot use {directory} for secrets: {exc.strerror}.") from None

    @property
    def directory(self) -> Path:
        return self._dir

    def get(self, name: str) -> str | None:
        check_entry(name)
        path = self._dir / name
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            return None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretStoreError(f"{path} is readable by other users; run `chmod 600 {path}`.")
        return path.read_text(encoding="utf-8").strip() or None

    def set(self, name: str, value: str) -> None:
        check_entry(name, value)
        path = self._dir / name
        # A fresh file of our own, 0600 from its first byte: never a leftover (which would keep
        # its old mode) nor a symlink someone planted (which would be followed).
        fd, temporary = tempfile.mkstemp(dir=self._dir, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(value)
                handle.flush()
                os.fsync(handle.fileno())
            Path(temporary).replace(path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                Path(temporary).unlink()
            raise

    def delete(self, name: str) -> None:
        check_entry(name)
        with contextlib.suppress(FileNotFoundError):
            (self._dir / name).unlink()

    def names(self) -> list[str]:
        # A half-written one is a hidden ".NAME.…tmp": never an entry.
        return sorted(
            path.name for path in self._dir.iterdir() if is_entry_name(path.name) and path.is_file()
        )


STORE_CHOICES = ("keyring", "file", "env", "memory")


def open_secret_store(choice: str, *, file_dir: Path) -> SecretStore:
    """The store named by ``secrets.backend``; raises SecretStoreError with advice if unusable."""
    if choice == "keyring":
        return KeyringSecretStore()
    if choice == "file":
        return FileSecretStore(file_dir)
    if choice == "env":
        return EnvSecretStore()
    if choice == "memory":
        return MemorySecretStore()
    raise SecretStoreError(
        f"unknown secret store {choice!r}; choose one of {', '.join(STORE_CHOICES)}"
    )
