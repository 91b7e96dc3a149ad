"""API keys: what one is and whom it speaks for, in the process that made it and in any other;
every way one is refused (unknown, revoked, expired, at creation and at revocation)."""

from __future__ import annotations

import hashlib
import re

import pytest

from tests.fakes import FakeClock
from tray_app.control.assembly import Identity
from tray_app.errors import AuthError
from tray_app.identity.api_keys import ApiKeyService, looks_like_api_key
from tray_app.identity.principal import ALL_SCOPES, Budget, CredentialKind, Principal, PrincipalId
from tray_app.storage.audit import AuditAction, AuditLog, AuditSource
from tray_app.storage.budgets import BudgetStore
from tray_app.storage.credentials import CredentialStore

MODELS = frozenset({"models"})


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_a_key_needs_a_name(identity: Identity, name: str) -> None:
    with pytest.raises(ValueError) as caught:
        identity.api_keys.create(name, scopes=MODELS)
    assert str(caught.value) == "an API key needs a name"
    assert identity.api_keys.list() == []


def test_a_key_needs_known_scopes(identity: Identity) -> None:
    with pytest.raises(ValueError, match="scopes must be some of"):
        identity.api_keys.create("k", scopes=frozenset({"admin"}))
    assert identity.api_keys.list() == []


def test_revoking_an_unknown_key_says_so_and_revokes_nothing(identity: Identity) -> None:
    key, record = identity.api_keys.create("k", scopes=MODELS)
    with pytest.raises(LookupError, match="no API key with ID 'nope'"):
        identity.api_keys.revoke("nope")
    assert identity.api_keys.verify(key)[0].id == record.id
    assert identity.api_keys.revoke(record.id).id == record.id
    assert not identity.api_keys.is_active(record.id)


# ---- what a key is and whom it speaks for ---------------------------------------------------

SCOPE_SETS = [frozenset({"chat"}), frozenset({"models", "embeddings"}), ALL_SCOPES]
MODEL_SETS: list[frozenset[str] | None] = [None, frozenset(), frozenset({"small", "large"})]


def clock_of(identity: Identity) -> FakeClock:
    assert isinstance(identity.clock, FakeClock)
    return identity.clock


def another_process(identity: Identity) -> ApiKeyService:
    """A second service on the same database, as `lmgate keys create` in another process is."""
    return ApiKeyService(identity.db, identity.clock)


def test_a_key_is_lmg_and_256_random_bits_and_only_its_hash_is_stored(
    identity: Identity,
) -> None:
    keys = {identity.api_keys.create(f"k{i}", scopes=MODELS)[0] for i in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert key.startswith("lmg_")
        body = key.removeprefix("lmg_")
        assert len(body) == 43 and re.fullmatch(r"[A-Za-z0-9_-]+", body)  # 32 bytes, base64url
    stored = [tuple(row) for row in identity.db.query("SELECT * FROM api_keys")]
    for key in keys:
        assert not any(key in str(value) for row in stored for value in row)
        # Another process finds the key by the SHA-256 of its text: one indexed lookup.
        assert any(hashlib.sha256(key.encode()).hexdigest() in row for row in stored)


@pytest.mark.parametrize("credential", ["lmg_", "lmg_x", "lmg_" + "a" * 43])
def test_a_credential_with_the_key_prefix_looks_like_a_key(credential: str) -> None:
    assert looks_like_api_key(credential)


@pytest.mark.parametrize("credential", ["", "lmg", "LMG_x", "lmgx", "xlmg_", "eyJhbGciOi.x.y"])
def test_anything_else_does_not(credential: str) -> None:
    assert not looks_like_api_key(credential)


@pytest.mark.parametrize("scopes", SCOPE_SETS)
@pytest.mark.parametrize("models", MODEL_SETS)
@pytest.mark.parametrize("ttl", [None, 90.0])
def test_a_key_speaks_for_itself_with_what_it_was_made_with(
    identity: Identity, scopes: frozenset[str], models: frozenset[str] | None, ttl: float | None
) -> None:
    now = clock_of(identity).time()
    key, record = identity.api_keys.create("  my script ", scopes=scopes, models=models, ttl=ttl)
    assert re.fullmatch(r"[0-9a-f]{12}", record.id)
    assert record.name == "my script"
    assert (record.scopes, record.models) == (scopes, models)
    assert record.created == now
    assert record.expires == (None if ttl is None else now + ttl)
    assert record.last_used is None and record.revoked is None
    assert record.principal == PrincipalId(CredentialKind.KEY, record.id)
    assert record.principal_name == f"key:{record.id}"
    assert identity.api_keys.list() == [record]
    # The same, whether verified by the process that made it or by one that only reads it.
    for service in (identity.api_keys, another_process(identity)):
        for _ in range(2):  # the first lookup, then from memory
            found, principal = service.verify(key)
            assert found == record
            assert principal == Principal(
                f"key:{record.id}",
                scopes,
                models,
                credential=PrincipalId(CredentialKind.KEY, record.id),
            )
            assert principal.max_tokens is None
            assert service.is_active(record.id)


def test_a_key_made_by_another_process_works_on_its_first_request(identity: Identity) -> None:
    key, record = another_process(identity).create("cli", scopes=MODELS)
    assert not identity.api_keys.is_active(record.id)  # not read yet
    assert identity.api_keys.verify(key)[0] == record
    assert identity.api_keys.is_active(record.id)


def test_keys_are_listed_oldest_first(identity: Identity) -> None:
    made = []
    for name in ("a", "b", "c"):
        made.append(identity.api_keys.create(name, scopes=MODELS)[1])
        clock_of(identity).advance(1)
    assert identity.api_keys.list() == made


# ---- every way a key is refused -----------------------------------------------------------


def refused(service: ApiKeyService, key: str) -> AuthError:
    with pytest.raises(AuthError) as caught:
        service.verify(key)
    assert caught.value.status == 401
    return caught.value


@pytest.mark.parametrize("change", ["unknown", "one character off", "without prefix", "hash"])
def test_a_key_that_was_never_made_is_invalid(identity: Identity, change: str) -> None:
    key, _ = identity.api_keys.create("k", scopes=MODELS)
    wrong = {
        "unknown": "lmg_" + "A" * 43,
        "one character off": key[:-1] + ("A" if key[-1] != "A" else "B"),
        "without prefix": key.removeprefix("lmg_"),
        "hash": hashlib.sha256(key.encode()).hexdigest(),  # what the database holds
    }[change]
    error = refused(identity.api_keys, wrong)
    assert error.code == "invalid_api_key"
    assert str(error) == "Invalid API key."


def test_a_revoked_key_is_refused_here_and_in_every_other_process(identity: Identity) -> None:
    key, record = identity.api_keys.create("k", scopes=MODELS)
    reader = another_process(identity)
    reader.verify(key)  # remembered there before the revocation
    clock_of(identity).advance(7)
    revoked = identity.api_keys.revoke(record.id)
    assert revoked.id == record.id and revoked.revoked == clock_of(identity).time()
    assert identity.api_keys.list()[0].revoked == revoked.revoked
    assert not identity.api_keys.is_active(record.id)
    fresh = another_process(identity)
    reader.reload()
    for service in (identity.api_keys, fresh, reader):
        error = refused(service, key)
        assert error.code == "api_key_revoked"
        assert str(error) == "This API key has been revoked."
        assert not service.is_active(record.id)


def test_revoking_twice_keeps_the_first_time(identity: Identity) -> None:
    _, record = identity.api_keys.create("k", scopes=MODELS)
    first = identity.api_keys.revoke(record.id).revoked
    clock_of(identity).advance(5)
    assert identity.api_keys.revoke(record.id).revoked == first


@pytest.mark.parametrize("made_here", [True, False])
def test_a_key_works_until_the_second_it_expires_and_never_after(
    identity: Identity, made_here: bool
) -> None:
    maker = identity.api_keys if made_here else another_process(identity)
    key, record = maker.create("k", scopes=MODELS, ttl=60)
    clock = clock_of(identity)
    clock.advance(59.5)
    assert identity.api_keys.verify(key)[0].id == record.id
    assert identity.api_keys.is_active(record.id)
    clock.advance(0.5)  # exactly at the expiry: no leeway for a key
    assert not identity.api_keys.is_active(record.id)
    for _ in range(2):
        error = refused(identity.api_keys, key)
        assert error.code == "api_key_expired"
        assert str(error) == "This API key has expired; create a new one."
    assert refused(another_process(identity), key).code == "api_key_expired"


def test_a_key_without_a_lifetime_never_expires(identity: Identity) -> None:
    key, record = identity.api_keys.create("k", scopes=MODELS)
    clock_of(identity).advance(10 * 365 * 86400)
    assert identity.api_keys.verify(key)[0].id == record.id
    assert identity.api_keys.is_active(record.id)


def test_an_unknown_key_id_is_not_active(identity: Identity) -> None:
    identity.api_keys.create("k", scopes=MODELS)
    assert not identity.api_keys.is_active("000000000000")
    assert not identity.api_keys.is_active("")


def test_reload_forgets_what_the_database_no_longer_holds(identity: Identity) -> None:
    key, record = identity.api_keys.create("k", scopes=MODELS)
    identity.api_keys.verify(key)
    with identity.db.transaction() as conn:
        conn.execute("DELETE FROM api_keys")
    identity.api_keys.reload()
    assert not identity.api_keys.is_active(record.id)
    assert refused(identity.api_keys, key).code == "invalid_api_key"


def test_a_key_is_listed_with_when_it_was_last_used(identity: Identity) -> None:
    _, used = identity.api_keys.create("used", scopes=MODELS)
    _, unused = identity.api_keys.create("unused", scopes=MODELS)
    identity.db.add_usage([], key_last_used={used.id: 1_800_000_123.5})
    listed = {record.id: record.last_used for record in identity.api_keys.list()}
    assert listed == {used.id: 1_800_000_123.5, unused.id: None}


def test_a_known_key_is_verified_from_memory_without_a_database_lookup(
    identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[str] = []
    real = CredentialStore.api_key_by_hash

    def counting(self: CredentialStore, key_hash: str) -> object:
        looked_up.append(key_hash)
        return real(self, key_hash)

    monkeypatch.setattr(CredentialStore, "api_key_by_hash", counting)
    made_here, _ = identity.api_keys.create("here", scopes=MODELS)
    made_elsewhere, _ = another_process(identity).create("elsewhere", scopes=MODELS)
    for _ in range(3):
        identity.api_keys.verify(made_here)
    assert looked_up == []  # created by this process: known at once
    for _ in range(3):
        identity.api_keys.verify(made_elsewhere)
    assert looked_up == [hashlib.sha256(made_elsewhere.encode()).hexdigest()]  # once
    identity.api_keys.reload()  # the database changed: both are read from it, no lookup
    for key in (made_here, made_elsewhere):
        identity.api_keys.verify(key)
    assert len(looked_up) == 1


# ---- a key's budget and its audit entries -----------------------------------------------------


def test_a_key_is_stored_with_its_budget_and_where_it_was_made(identity: Identity) -> None:
    _, record = identity.api_keys.create(
        "k", scopes=MODELS, budget=Budget(10, 20), source=AuditSource.GATEWAY
    )
    assert BudgetStore(identity.db).all() == {record.principal_name: Budget(10, 20)}
    (entry,) = AuditLog(identity.db).entries()
    assert (entry.action, entry.principal, entry.source) == (
        AuditAction.CREATED,
        record.principal_name,
        AuditSource.GATEWAY,
    )


def test_a_key_made_without_a_budget_has_no_budget_row(identity: Identity) -> None:
    identity.api_keys.create("k", scopes=MODELS)
    assert BudgetStore(identity.db).all() == {}
    assert AuditLog(identity.db).entries()[0].source is AuditSource.CLI


def test_a_revocation_records_where_it_was_made(identity: Identity) -> None:
    _, record = identity.api_keys.create("k", scopes=MODELS)
    identity.api_keys.revoke(record.id, source=AuditSource.TRAY)
    last = AuditLog(identity.db).entries()[-1]
    assert (last.action, last.source) == (AuditAction.REVOKED, AuditSource.TRAY)
    identity.api_keys.revoke(record.id)
    assert AuditLog(identity.db).entries()[-1] == last
