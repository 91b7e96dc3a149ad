"""The shared state's secrets and the replicas' common signing key (control.shared_state)."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest

from tray_app.control.shared_state import (
    MASTER_FINGERPRINT,
    check_shared_secret,
    claim_or_check_master,
    derived_signing_key,
    load_shared_signing_key,
    shared_secret,
)
from tray_app.errors import SecretStoreError
from tray_app.identity.signing_key import SIGNING_KEY
from tray_app.secret_store.base import STATE_DATABASE_URL, STATE_REDIS_URL, MemorySecretStore
from tray_app.storage.credentials import CredentialStore
from tray_app.storage.database import Database

PASSWORD = "s3cr3t-Pa55"


def _key_text(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


@pytest.mark.parametrize(
    ("name", "good"),
    [
        (STATE_DATABASE_URL, f"postgresql://lmgate:{PASSWORD}@db.internal:5432/lmgate"),
        (STATE_DATABASE_URL, f"postgres://lmgate:{PASSWORD}@127.0.0.1/lmgate"),
        (STATE_REDIS_URL, f"redis://:{PASSWORD}@cache.internal:6379/0"),
        (STATE_REDIS_URL, f"rediss://:{PASSWORD}@cache.internal:6380/0"),
        (STATE_REDIS_URL, "unix:///run/redis/redis.sock"),
        (SIGNING_KEY, secrets.token_urlsafe(32)),
    ],
)
def test_a_well_formed_shared_secret_is_accepted(name: str, good: str) -> None:
    check_shared_secret(name, good)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        (STATE_DATABASE_URL, f"mysql://lmgate:{PASSWORD}@db/lmgate"),
        (STATE_DATABASE_URL, f"lmgate:{PASSWORD}@db/lmgate"),
        (STATE_DATABASE_URL, f"postgresql://lmgate:{PASSWORD}@db:notaport/lmgate"),
        (STATE_DATABASE_URL, f"http://{PASSWORD}@db"),
        # A "/" in the password, not percent-encoded: parsed, it would put the password in
        # the path, which error messages name.
        (STATE_DATABASE_URL, f"postgresql://lmgate:2024/{PASSWORD}@db.internal:5432/lmgate"),
        (STATE_REDIS_URL, f"redis://:x?{PASSWORD}@cache:6379/0"),
        (STATE_REDIS_URL, f"postgresql://:{PASSWORD}@cache:6379"),
        (STATE_REDIS_URL, f"redis://:{PASSWORD}@cache:99999999/0"),
        (STATE_REDIS_URL, PASSWORD),
        (SIGNING_KEY, PASSWORD),  # far shorter than 32 bytes
        (SIGNING_KEY, "!" * 64),  # not base64
        (SIGNING_KEY, _key_text(b"\x01" * 31)),  # one byte short
    ],
)
def test_a_malformed_shared_secret_is_refused_without_repeating_it(name: str, bad: str) -> None:
    with pytest.raises(SecretStoreError) as refused:
        check_shared_secret(name, bad)
    assert name in str(refused.value) and "not changed" in str(refused.value)
    assert PASSWORD not in str(refused.value) and bad not in str(refused.value)


def test_a_signing_key_of_exactly_32_bytes_is_accepted() -> None:
    check_shared_secret(SIGNING_KEY, _key_text(b"\x01" * 32))


@pytest.mark.parametrize("name", [STATE_DATABASE_URL, STATE_REDIS_URL])
def test_a_missing_shared_secret_says_how_to_set_it(name: str) -> None:
    for store in (None, MemorySecretStore()):
        with pytest.raises(SecretStoreError) as refused:
            shared_secret(store, name)
        assert f"lmgate secret set {name}" in str(refused.value)
        assert "LMGATE_SECRET_STATE_" in str(refused.value)


def test_each_generation_and_each_master_signs_with_another_key() -> None:
    master, other = secrets.token_bytes(32), secrets.token_bytes(32)
    keys = {
        derived_signing_key(master, None),
        derived_signing_key(master, "1"),
        derived_signing_key(master, "2"),
        derived_signing_key(other, None),
    }
    assert len(keys) == 4 and all(len(k) == 32 for k in keys)
    assert derived_signing_key(master, None) == derived_signing_key(master, "0")
    assert master not in keys


def test_a_replica_with_another_master_is_refused(tmp_path: Path) -> None:
    db = Database.in_directory(tmp_path)
    master = secrets.token_bytes(32)
    claim_or_check_master(db, master)
    claim_or_check_master(db, master)  # the same master again: the second replica
    fingerprint = db.meta(MASTER_FINGERPRINT)
    assert fingerprint is not None and master.hex() not in fingerprint
    with pytest.raises(SecretStoreError) as refused:
        claim_or_check_master(db, secrets.token_bytes(32))
    assert "differs from the one the other replicas use" in str(refused.value)
    assert db.meta(MASTER_FINGERPRINT) == fingerprint


def test_rotation_gives_every_replica_the_same_new_key(tmp_path: Path) -> None:
    db = Database.in_directory(tmp_path)
    master = _key_text(secrets.token_bytes(32))
    first = load_shared_signing_key(MemorySecretStore({SIGNING_KEY: master}), db)
    second = load_shared_signing_key(MemorySecretStore({SIGNING_KEY: master}), db)
    before = first.current()
    assert second.current() == before
    CredentialStore(db).revoke_for_key_rotation(1000.0)
    assert first.current() == second.current() != before


def test_no_master_means_no_start_rather_than_a_key_for_one_replica(tmp_path: Path) -> None:
    with pytest.raises(SecretStoreError) as refused:
        load_shared_signing_key(MemorySecretStore(), Database.in_directory(tmp_path))
    assert f"lmgate secret set {SIGNING_KEY}" in str(refused.value)
