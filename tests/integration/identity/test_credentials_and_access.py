"""The identity tables behind named storage methods (one transaction per change, races decided
by SQLite), principal ids as a type, and the one access policy."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from tray_app.config.settings import Config
from tray_app.control.assembly import Identity, open_identity, rotate_signing_key_everywhere
from tray_app.errors import StorageError
from tray_app.gateway.accounting import UsageRecorder
from tray_app.identity.access import (
    APP_KEY_SCOPES,
    DEVICE_SCOPES,
    SNIPPET_SCOPES,
    AccessPolicy,
    refused_model,
)
from tray_app.identity.pairing import PairingError
from tray_app.identity.principal import (
    ALL_SCOPES,
    SCOPE_CHAT,
    SCOPE_EMBEDDINGS,
    SCOPE_MODELS,
    CredentialKind,
    Principal,
    PrincipalId,
)
from tray_app.secret_store.base import MemorySecretStore
from tray_app.storage.credentials import CodeRefusal, CredentialStore, DeviceRow
from tray_app.storage.database import Database

CHAT_SCOPES = frozenset({SCOPE_CHAT})
RACERS = 8


@pytest.fixture
def identity(tmp_path: Path) -> Iterator[Identity]:
    opened = open_identity(Config(storage_data_dir=str(tmp_path)), b"k" * 32, clock=FakeClock())
    yield opened
    opened.close()


def _refuse_updates_of(db: Database, table: str) -> None:
    """Make every later write to ``table`` fail, as a full disk would, half-way through a
    change that spans several tables."""
    with db.transaction() as conn:
        for event in ("INSERT", "UPDATE"):
            conn.execute(
                f"CREATE TRIGGER refuse_{event}_{table} BEFORE {event} ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )


def _allow_writes_to(db: Database, table: str) -> None:
    with db.transaction() as conn:
        for event in ("INSERT", "UPDATE"):
            conn.execute(f"DROP TRIGGER refuse_{event}_{table}")


def _advance(identity: Identity, seconds: float) -> None:
    clock = identity.clock
    assert isinstance(clock, FakeClock)
    clock.advance(seconds)


# ---- one-time pairing codes under a race ----------------------------------------------------


def test_of_many_connections_redeeming_one_code_at_once_exactly_one_pairs(tmp_path: Path) -> None:
    path = tmp_path / "lmgate.db"
    first = Database(path)
    CredentialStore(first).add_pairing_code("h" * 64, 100.0, 700.0, None)
    databases = [first, *(Database(path) for _ in range(RACERS - 1))]  # as separate processes
    start = threading.Barrier(RACERS)
    results: list[DeviceRow | CodeRefusal] = []

    def redeem(db: Database, n: int) -> None:
        start.wait()
        results.append(CredentialStore(db).redeem_pairing_code("h" * 64, 200.0, f"d{n}", "phone"))

    threads = [threading.Thread(target=redeem, args=(db, n)) for n, db in enumerate(databases)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        winners = [r for r in results if isinstance(r, DeviceRow)]
        assert len(results) == RACERS
        assert len(winners) == 1
        assert [r for r in results if not isinstance(r, DeviceRow)] == [CodeRefusal.USED] * (
            RACERS - 1
        )
        assert [d.id for d in CredentialStore(first).devices()] == [winners[0].id]
    finally:
        for db in databases:
            db.close()


def test_two_services_exchanging_one_code_give_one_token(tmp_path: Path) -> None:
    config = Config(storage_data_dir=str(tmp_path))
    tray, cli = (open_identity(config, b"k" * 32) for _ in range(2))
    try:
        code, _ = tray.pairing.create_code()
        start = threading.Barrier(2)
        issued: list[str] = []
        refused: list[str | None] = []

        def exchange(identity: Identity) -> None:
            start.wait()
            try:
                issued.append(identity.pairing.exchange(code, "phone").token)
            except PairingError as exc:
                refused.append(exc.code)

        threads = [threading.Thread(target=exchange, args=(i,)) for i in (tray, cli)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert (len(issued), refused) == (1, ["pairing_code_used"])
        assert len(tray.pairing.devices()) == 1
        assert [r.kind for r in tray.tokens.list()] == [CredentialKind.DEVICE]
    finally:
        tray.close()
        cli.close()


@pytest.mark.parametrize(
    ("setup", "refusal"),
    [
        ("none", CodeRefusal.UNKNOWN),
        ("used", CodeRefusal.USED),
        ("expired", CodeRefusal.EXPIRED),
    ],
)
def test_a_refused_redemption_says_why_and_pairs_nothing(
    tmp_path: Path, setup: str, refusal: CodeRefusal
) -> None:
    db = Database(tmp_path / "lmgate.db")
    store = CredentialStore(db)
    try:
        if setup != "none":
            store.add_pairing_code("h" * 64, 100.0, 700.0, "named by the code")
        if setup == "used":
            assert isinstance(store.redeem_pairing_code("h" * 64, 200.0, "d0", "x"), DeviceRow)
        now = 800.0 if setup == "expired" else 300.0
        assert store.redeem_pairing_code("h" * 64, now, "d1", "x") == refusal
        assert [d.id for d in store.devices()] == (["d0"] if setup == "used" else [])
    finally:
        db.close()


def test_a_code_made_for_a_named_device_names_it(tmp_path: Path) -> None:
    db = Database(tmp_path / "lmgate.db")
    store = CredentialStore(db)
    try:
        store.add_pairing_code("a" * 64, 100.0, 700.0, "kitchen tablet")
        store.add_pairing_code("b" * 64, 100.0, 700.0, None)
        named = store.redeem_pairing_code("a" * 64, 200.0, "d1", "what the phone says")
        unnamed = store.redeem_pairing_code("b" * 64, 200.0, "d2", "what the phone says")
        assert named == DeviceRow("d1", "kitchen tablet", 200.0, 200.0, None)
        assert unnamed == DeviceRow("d2", "what the phone says", 200.0, 200.0, None)
        assert store.devices() == [named, unnamed]
    finally:
        db.close()


# ---- changes that span tables happen entirely or not at all ---------------------------------


def test_revoking_a_device_is_one_transaction_with_its_tokens(identity: Identity) -> None:
    code, _ = identity.pairing.create_code()
    issued = identity.pairing.exchange(code, "phone")
    device_id = issued.record.device_id
    assert device_id
    _refuse_updates_of(identity.db, "tokens")
    with pytest.raises(StorageError):
        identity.pairing.revoke_device(device_id)
    # Nothing of it was written: the device was not revoked without its tokens.
    assert [d.revoked for d in identity.pairing.devices()] == [None]
    assert identity.tokens.is_active(issued.record.jti)


def test_revoking_a_device_revokes_its_tokens(identity: Identity) -> None:
    code, _ = identity.pairing.create_code()
    issued = identity.pairing.exchange(code, "phone")
    other_code, _ = identity.pairing.create_code()
    other = identity.pairing.exchange(other_code, "tablet")
    assert issued.record.device_id
    device = identity.pairing.revoke_device(issued.record.device_id)
    assert (device.id, device.revoked) == (issued.record.device_id, identity.clock.time())
    revoked = {r.jti: r.revoked for r in identity.tokens.list()}
    assert revoked == {issued.record.jti: identity.clock.time(), other.record.jti: None}
    assert not identity.tokens.is_active(issued.record.jti)
    assert identity.tokens.is_active(other.record.jti)
    with pytest.raises(LookupError, match="no device"):
        identity.pairing.revoke_device("nope")


def test_the_kill_switch_is_one_transaction(identity: Identity) -> None:
    code, _ = identity.pairing.create_code()
    issued = identity.pairing.exchange(code, "phone")
    pending, _ = identity.pairing.create_code()
    _refuse_updates_of(identity.db, "tokens")
    with pytest.raises(StorageError):
        identity.pairing.revoke_all_devices()
    assert [d.revoked for d in identity.pairing.devices()] == [None]
    assert identity.tokens.is_active(issued.record.jti)
    _allow_writes_to(identity.db, "tokens")
    identity.pairing.exchange(pending, "tablet")  # the code shown before still pairs


def test_a_rotation_is_one_transaction(identity: Identity) -> None:
    store = MemorySecretStore()
    issued = identity.tokens.issue(name="t", scopes=CHAT_SCOPES, ttl=60)
    code, _ = identity.pairing.create_code()
    identity.pairing.exchange(code, "phone")
    _refuse_updates_of(identity.db, "meta")
    with pytest.raises(StorageError):
        rotate_signing_key_everywhere(identity, store)
    assert all(r.revoked is None for r in identity.tokens.list())
    assert [d.revoked for d in identity.pairing.devices()] == [None]
    assert identity.tokens.is_active(issued.record.jti)


def test_revoking_an_api_key_returns_it_revoked(identity: Identity) -> None:
    _, record = identity.api_keys.create("script", scopes=CHAT_SCOPES)
    revoked = identity.api_keys.revoke(record.id)
    assert (revoked.id, revoked.revoked) == (record.id, identity.clock.time())
    _advance(identity, 5)
    again = identity.api_keys.revoke(record.id)
    assert again.revoked == revoked.revoked  # the first revocation time stays
    assert not identity.api_keys.is_active(record.id)
    with pytest.raises(LookupError, match="no API key"):
        identity.api_keys.revoke("nope")


# ---- principal ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CredentialKind))
def test_a_principal_id_is_written_kind_colon_id_and_reads_back(kind: CredentialKind) -> None:
    pid = PrincipalId(kind, "ab12:cd")  # a dev-mode user name may hold a colon
    assert str(pid) == f"{kind.value}:ab12:cd"
    assert PrincipalId.parse(str(pid)) == pid


def test_every_credential_names_its_principal_as_before(identity: Identity) -> None:
    _, key = identity.api_keys.create("script", scopes=CHAT_SCOPES)
    token = identity.tokens.issue(name="t", scopes=CHAT_SCOPES, ttl=60).record
    snippet = identity.tokens.issue(
        name="s", scopes=CHAT_SCOPES, ttl=60, kind=CredentialKind.SNIPPET
    ).record
    code, _ = identity.pairing.create_code()
    device_token = identity.pairing.exchange(code, "phone").record
    device = identity.pairing.devices()[0]
    assert key.principal_name == f"key:{key.id}"
    assert (token.sub, snippet.sub) == (f"token:{token.jti}", f"snippet:{snippet.jti}")
    assert device_token.sub == device.principal_name == f"device:{device.id}"
    assert device_token.credential == PrincipalId(CredentialKind.TOKEN, device_token.jti)


def test_usage_marks_keys_and_devices_used_and_counts_labels_too(identity: Identity) -> None:
    _, key = identity.api_keys.create("script", scopes=CHAT_SCOPES)
    code, _ = identity.pairing.create_code()
    identity.pairing.exchange(code, "phone")
    device = identity.pairing.devices()[0]
    recorder = UsageRecorder(identity.db, identity.clock)
    _advance(identity, 10)
    for principal in (key.principal_name, device.principal_name, "owner", "dev:bob"):
        recorder.record(principal, None)
    assert recorder.flush()
    now = identity.clock.time()
    assert [k.last_used for k in identity.api_keys.list()] == [now]
    assert [d.last_seen for d in identity.pairing.devices()] == [now]
    counted = {u.principal: u.requests for u in identity.db.usage()}
    assert counted == {key.principal_name: 1, device.principal_name: 1, "owner": 1, "dev:bob": 1}


# ---- the access policy -----------------------------------------------------------------------


def test_what_each_kind_is_granted() -> None:
    policy = AccessPolicy.with_allowlist(["m1", "m2"])
    assert policy.for_device().scopes == DEVICE_SCOPES == {SCOPE_CHAT, SCOPE_MODELS}
    assert policy.for_snippet().scopes == SNIPPET_SCOPES == {SCOPE_CHAT}
    assert policy.for_app_key().scopes == APP_KEY_SCOPES
    assert {SCOPE_CHAT, SCOPE_MODELS, SCOPE_EMBEDDINGS} == APP_KEY_SCOPES
    grants = (policy.for_device(), policy.for_snippet(), policy.for_app_key())
    assert {g.models for g in grants} == {frozenset({"m1", "m2"})}
    assert AccessPolicy.with_allowlist([]).allowed_models is None


@pytest.mark.parametrize(
    ("kind", "follows"),
    [
        (CredentialKind.DEVICE, True),
        (CredentialKind.SNIPPET, True),
        (CredentialKind.TOKEN, False),
        (CredentialKind.KEY, False),
    ],
)
def test_devices_and_snippets_follow_the_allowlist_of_now_others_keep_theirs(
    kind: CredentialKind, follows: bool
) -> None:
    recorded = frozenset({"old"})
    for now in (frozenset({"new"}), None):
        expected = now if follows else recorded
        assert AccessPolicy(now).models_now(kind, recorded) == expected


def test_every_model_a_request_names_is_asked_about_in_order() -> None:
    phone = Principal("device:d", ALL_SCOPES, frozenset({"m1"}))
    assert refused_model(phone, {"model": "m1", "draft_model": None}) is None
    assert refused_model(phone, {"model": "m1", "draft_model": "m2"}) == ("draft_model", "m2")
    assert refused_model(phone, {"model": "m3", "draft_model": "m2"}) == ("model", "m3")
    anything = Principal("key:k", ALL_SCOPES)
    assert refused_model(anything, {"model": "m3", "draft_model": "m2"}) is None
