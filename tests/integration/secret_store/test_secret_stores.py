"""Secret stores: memory, environment, private files, and the OS keyring — including a real
Secret Service (gnome-keyring in a private D-Bus session, set up by tests/run.sh)."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import keyring
import keyring.backends.fail
import pytest

from tray_app.errors import SecretStoreError
from tray_app.identity.signing_key import (
    SIGNING_KEY,
    load_or_create_signing_key,
    rotate_signing_key,
)
from tray_app.secret_store.base import (
    EnvSecretStore,
    ListingSecretStore,
    MemorySecretStore,
    SecretStore,
)
from tray_app.secret_store.keyring_store import SERVICE, FileSecretStore, KeyringSecretStore


def exercise(store: SecretStore) -> None:
    name = "test-" + secrets.token_hex(4)
    assert store.get(name) is None
    store.set(name, "first")
    assert store.get(name) == "first"
    store.set(name, "second")
    assert store.get(name) == "second"
    store.delete(name)
    assert store.get(name) is None
    store.delete(name)  # deleting twice is fine


def test_memory_store() -> None:
    exercise(MemorySecretStore())


def test_file_store_keeps_files_private(tmp_path: Path) -> None:
    store = FileSecretStore(tmp_path / "secrets")
    exercise(store)
    store.set("lmstudio-api-token", "sk-abc")
    path = tmp_path / "secrets" / "lmstudio-api-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
    path.chmod(0o644)
    with pytest.raises(SecretStoreError, match="chmod 600"):
        store.get("lmstudio-api-token")


@pytest.mark.parametrize("leftover", ["loose_file", "symlink"])
def test_file_store_never_writes_through_a_leftover_or_a_planted_temporary(
    tmp_path: Path, leftover: str
) -> None:
    store = FileSecretStore(tmp_path / "secrets")
    store.set("jwt-signing-key", "old")
    planted = tmp_path / "secrets" / "jwt-signing-key.tmp"  # the name the old code reused
    target = tmp_path / "elsewhere"
    if leftover == "loose_file":
        planted.write_text("x")
        planted.chmod(0o644)
    else:
        target.write_text("untouched")
        planted.symlink_to(target)
    store.set("jwt-signing-key", "new")
    path = tmp_path / "secrets" / "jwt-signing-key"
    assert store.get("jwt-signing-key") == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and not path.is_symlink()
    if leftover == "symlink":
        assert target.read_text() == "untouched"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporaries


def test_env_store_is_read_only() -> None:
    store = EnvSecretStore({"LMGATE_SECRET_LMSTUDIO_API_TOKEN": "sk-env"})
    assert store.get("lmstudio-api-token") == "sk-env"
    assert store.get("jwt-signing-key") is None
    with pytest.raises(SecretStoreError, match="LMGATE_SECRET_JWT_SIGNING_KEY"):
        store.set("jwt-signing-key", "x")


@pytest.mark.parametrize("bad", ["", "UPPER", "a/b", "../etc", "x" * 65])
def test_secret_names_are_checked(bad: str) -> None:
    with pytest.raises(SecretStoreError):
        MemorySecretStore().set(bad, "v")


def test_secrets_are_small_one_per_entry() -> None:
    with pytest.raises(SecretStoreError, match="larger than"):
        MemorySecretStore().set("big", "x" * 4096)  # Windows caps a credential at 2560 bytes


def test_no_keyring_backend_fails_with_advice() -> None:
    with pytest.raises(SecretStoreError) as caught:
        # keyring leaves its backends' __init__ unannotated.
        KeyringSecretStore(keyring.backends.fail.Keyring())  # type: ignore[no-untyped-call]
    message = str(caught.value)
    assert "No usable OS keyring" in message
    assert "--secret-store file" in message and "gnome-keyring" in message


def test_signing_key_is_256_bits_and_rotates() -> None:
    store = MemorySecretStore()
    key = load_or_create_signing_key(store)
    assert len(key) == 32
    assert load_or_create_signing_key(store) == key
    rotated = rotate_signing_key(store)
    assert rotated != key and len(rotated) == 32
    assert load_or_create_signing_key(store) == rotated


def test_damaged_signing_key_is_reported() -> None:
    store = MemorySecretStore({SIGNING_KEY: "c2hvcnQ"})
    with pytest.raises(SecretStoreError, match="keys rotate"):
        load_or_create_signing_key(store)


def _secret_service_available() -> bool:
    backend = keyring.get_keyring()
    return type(backend).__module__ == "keyring.backends.SecretService"


@pytest.fixture
def secret_service() -> KeyringSecretStore:
    if not _secret_service_available():
        if os.environ.get("LMGATE_REQUIRE_SECRET_SERVICE") == "1":
            pytest.fail(f"a Secret Service was required but keyring chose {keyring.get_keyring()}")
        pytest.skip("no Secret Service on this machine (tests/run.sh starts gnome-keyring)")
    return KeyringSecretStore()


@pytest.mark.secret_service
def test_real_secret_service_round_trip(secret_service: KeyringSecretStore) -> None:
    assert "SecretService" in secret_service.backend_name
    exercise(secret_service)
    secret_service.set("lmstudio-api-token", "sk-real-keyring")
    try:
        # The entry is visible to other keyring clients under the service name "lmgate".
        assert keyring.get_password(SERVICE, "lmstudio-api-token") == "sk-real-keyring"
    finally:
        secret_service.delete("lmstudio-api-token")


@pytest.mark.secret_service
def test_real_secret_service_holds_the_signing_key(secret_service: KeyringSecretStore) -> None:
    secret_service.delete(SIGNING_KEY)
    key = load_or_create_signing_key(secret_service)
    assert keyring.get_password(SERVICE, SIGNING_KEY) is not None
    assert load_or_create_signing_key(secret_service) == key
    assert rotate_signing_key(secret_service) != key
    secret_service.delete(SIGNING_KEY)


def test_the_stores_that_can_list_their_entries_do(tmp_path: Path) -> None:
    # doctor lists the tokens of upstreams removed by hand; an OS keyring cannot be listed.
    memory = MemorySecretStore({"upstream-token-desk": "a", "lmstudio-api-token": "b"})
    files = FileSecretStore(tmp_path / "secrets")
    files.set("upstream-token-desk", "a")
    files.set("lmstudio-api-token", "b")
    (tmp_path / "secrets" / ".upstream-token-x.123.tmp").write_text("half", encoding="utf-8")
    (tmp_path / "secrets" / "sub-dir").mkdir()
    env = EnvSecretStore(
        {
            "LMGATE_SECRET_UPSTREAM_TOKEN_DESK": "a",
            "LMGATE_SECRET_LMSTUDIO_API_TOKEN": "b",
            "LMGATE_SECRET_EMPTY": "",
            "HOME": "/root",
        }
    )
    for store in (memory, files, env):
        assert isinstance(store, ListingSecretStore)
        assert store.names() == ["lmstudio-api-token", "upstream-token-desk"]
    assert not isinstance(KeyringSecretStore.__new__(KeyringSecretStore), ListingSecretStore)
