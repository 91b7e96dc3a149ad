"""Pairing: a code made for a named device names it, whatever the phone calls itself; the
device's principal is the one its token speaks for; unknown devices cannot be revoked."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import jwt
import pytest

from tests.fakes import FakeClock
from tests.unit.identity.conftest import SIGNING_KEY, IdentityMaker
from tray_app.config.settings import Config
from tray_app.control.assembly import Identity, open_identity
from tray_app.errors import AuthError
from tray_app.identity.pairing import PairingError, PairingService
from tray_app.identity.principal import Budget
from tray_app.storage.audit import AuditAction, AuditLog, AuditSource
from tray_app.storage.budgets import BudgetStore


@pytest.fixture(params=["sqlite", "postgres"])
def identity(request: pytest.FixtureRequest, make_identity: IdentityMaker) -> Iterator[Identity]:
    """Pairing on this machine's SQLite and on a real PostgreSQL (tests.postgres_server)."""
    if request.param == "sqlite":
        yield make_identity()
        return
    from tray_app.storage.postgres import PostgresDatabase

    db = PostgresDatabase.connect(request.getfixturevalue("postgres_url"))
    identity = open_identity(Config(), SIGNING_KEY, clock=FakeClock(), db=db)
    yield identity
    identity.close()


def test_a_code_made_for_a_named_device_keeps_that_name(identity: Identity) -> None:
    code, _ = identity.pairing.create_code(device_name="Kitchen tablet")
    issued = identity.pairing.exchange(code, "iPhone of a stranger")
    (device,) = identity.pairing.devices()
    assert device.name == issued.record.name == "Kitchen tablet"


def test_a_code_for_no_particular_device_takes_the_phones_name(identity: Identity) -> None:
    code, _ = identity.pairing.create_code()
    identity.pairing.exchange(code, "Ana's phone")
    assert [d.name for d in identity.pairing.devices()] == ["Ana's phone"]


def test_a_devices_principal_is_the_one_its_token_speaks_for(identity: Identity) -> None:
    code, _ = identity.pairing.create_code()
    issued = identity.pairing.exchange(code, "phone")
    (device,) = identity.pairing.devices()
    principal = identity.authenticator.authenticate(
        {"Authorization": f"Bearer {issued.token}"}, "127.0.0.1"
    )
    assert principal.name == device.principal_name == f"device:{device.id}"


def test_revoking_an_unknown_device_says_so_and_revokes_nothing(identity: Identity) -> None:
    code, _ = identity.pairing.create_code()
    identity.pairing.exchange(code, "phone")
    with pytest.raises(LookupError, match="no device with ID 'nope'"):
        identity.pairing.revoke_device("nope")
    assert [d.revoked for d in identity.pairing.devices()] == [None]


# ---- what a refused code tells the phone ----------------------------------------------------

NOT_A_CODE = "That is not a pairing code; scan the QR code again."


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "A" * 23,  # one character short
        "A" * 25,  # one character long
        "A" * 23 + "1",  # 0, 1, 8 and 9 are not base32
        "A" * 23 + "0",
        "A" * 23 + "8",
        "A" * 23 + "=",  # padding
        "A" * 23 + "É",
    ],
)
def test_what_is_not_a_pairing_code_is_refused_before_any_lookup(
    identity: Identity, raw: str
) -> None:
    with pytest.raises(PairingError) as caught:
        identity.pairing.exchange(raw, "phone")
    assert (caught.value.status, caught.value.code) == (401, "pairing_code_invalid")
    assert str(caught.value) == NOT_A_CODE  # the phone page shows it as it is
    assert identity.pairing.devices() == []


@pytest.mark.parametrize(
    ("spoil", "code", "message"),
    [
        (
            "unknown",
            "pairing_code_invalid",
            "This pairing code is unknown; ask for a new QR code.",
        ),
        (
            "used",
            "pairing_code_used",
            "This pairing code was already used; ask for a new QR code.",
        ),
        (
            "expired",
            "pairing_code_expired",
            "This pairing code has expired; ask for a new QR code.",
        ),
    ],
)
def test_every_refusal_of_a_well_formed_code_is_a_401_that_says_why(
    identity: Identity, spoil: str, code: str, message: str
) -> None:
    made, _ = identity.pairing.create_code()
    if spoil == "unknown":
        made = "A" * 24
    elif spoil == "used":
        identity.pairing.exchange(made, "first phone")
    else:
        assert isinstance(identity.clock, FakeClock)
        identity.clock.advance(identity.pairing.code_ttl)
    with pytest.raises(PairingError) as caught:
        identity.pairing.exchange(made, "phone")
    assert (caught.value.status, caught.value.code, str(caught.value)) == (401, code, message)
    assert len(identity.pairing.devices()) == (1 if spoil == "used" else 0)


# ---- codes and devices ----------------------------------------------------------------------


def test_a_code_made_with_its_own_lifetime_expires_then_not_at_the_default(
    identity: Identity,
) -> None:
    assert isinstance(identity.clock, FakeClock)
    now = identity.clock.time()
    code, expires = identity.pairing.create_code(ttl=60.0)
    assert expires == now + 60.0
    identity.clock.advance(60.0)
    with pytest.raises(PairingError) as caught:
        identity.pairing.exchange(code, "phone")
    assert caught.value.code == "pairing_code_expired"
    long_lived, _ = identity.pairing.create_code(ttl=3600.0)
    identity.clock.advance(3599.0)
    identity.pairing.exchange(long_lived, "phone")
    assert len(identity.pairing.devices()) == 1


def test_the_services_own_lifetimes_are_the_settings_defaults(identity: Identity) -> None:
    # Whoever builds the service without the settings gets what the settings default to.
    service = PairingService(identity.db, identity.tokens, identity.clock, access=identity.access)
    defaults = Config()
    now = identity.clock.time()
    code, expires = service.create_code()
    assert expires == now + defaults.auth_pairing_code_ttl
    issued = service.exchange(code, "phone")
    assert issued.record.expires == now + defaults.auth_device_token_ttl


@pytest.mark.parametrize("given", ["", "   ", "\x00\x01\x7f", "\n\t"])
def test_a_device_that_gives_no_usable_name_is_called_device(
    identity: Identity, given: str
) -> None:
    code, _ = identity.pairing.create_code()
    issued = identity.pairing.exchange(code, given)
    assert [d.name for d in identity.pairing.devices()] == ["device"] == [issued.record.name]


def test_a_device_is_listed_with_when_it_was_paired_and_a_short_id_to_type(
    identity: Identity,
) -> None:
    assert isinstance(identity.clock, FakeClock)
    ids = set()
    for n in range(3):
        identity.clock.advance(10.0)
        code, _ = identity.pairing.create_code()
        paired_at = identity.clock.time()
        identity.pairing.exchange(code, f"phone {n}")
        device = identity.pairing.devices()[-1]
        assert (device.created, device.last_seen, device.revoked) == (paired_at, paired_at, None)
        # Typed into `lmgate device revoke ID`: 48 random bits, spelled as 12 hex digits.
        assert re.fullmatch(r"[0-9a-f]{12}", device.id)
        ids.add(device.id)
    assert len(ids) == 3


def test_a_device_token_records_the_allowlist_it_was_paired_under(
    make_identity: IdentityMaker,
) -> None:
    identity = make_identity(auth_allowed_models=("small", "medium"))
    code, _ = identity.pairing.create_code()
    issued = identity.pairing.exchange(code, "phone")
    assert issued.record.models == frozenset({"small", "medium"})
    claims = jwt.decode(issued.token, options={"verify_signature": False})
    assert claims["models"] == ["medium", "small"]
    unlisted = make_identity()  # every model allowed: the token says nothing of models
    code, _ = unlisted.pairing.create_code()
    issued = unlisted.pairing.exchange(code, "phone")
    assert issued.record.models is None
    assert "models" not in jwt.decode(issued.token, options={"verify_signature": False})


def test_a_device_name_is_one_printable_line_of_at_most_64_characters(
    identity: Identity,
) -> None:
    code, _ = identity.pairing.create_code()
    identity.pairing.exchange(code, " a\x00b\n\tc  " + "d" * 100 + "\u200b")
    (device,) = identity.pairing.devices()
    assert device.name == "ab c " + "d" * 59
    named_code, _ = identity.pairing.create_code(device_name="e" * 65)
    identity.pairing.exchange(named_code, "phone")
    assert identity.pairing.devices()[-1].name == "e" * 64


@pytest.mark.parametrize(
    "typed",
    [
        lambda code: code.lower(),
        lambda code: "-".join(code[i : i + 4] for i in range(0, 24, 4)),
        lambda code: " ".join(code[i : i + 6] for i in range(0, 24, 6)).lower(),
        lambda code: f"\t{code[:12]}\n{code[12:]} ",
    ],
)
def test_a_code_typed_by_hand_in_groups_or_lower_case_pairs(
    identity: Identity, typed: Callable[[str], str]
) -> None:
    code, _ = identity.pairing.create_code()
    identity.pairing.exchange(typed(code), "phone")
    assert len(identity.pairing.devices()) == 1


def test_the_kill_switch_revokes_every_device_now_and_every_code_shown_before(
    identity: Identity,
) -> None:
    assert isinstance(identity.clock, FakeClock)
    tokens = []
    for name in ("phone", "tablet"):
        code, _ = identity.pairing.create_code()
        tokens.append(identity.pairing.exchange(code, name).token)
    shown, _ = identity.pairing.create_code()
    identity.clock.advance(5.0)
    assert identity.pairing.revoke_all_devices() == 2
    now = identity.clock.time()
    assert [d.revoked for d in identity.pairing.devices()] == [now, now]
    for token in tokens:
        with pytest.raises(AuthError):
            identity.authenticator.authenticate({"Authorization": f"Bearer {token}"}, None)
    with pytest.raises(PairingError):
        identity.pairing.exchange(shown, "late phone")
    assert identity.pairing.revoke_all_devices() == 0


def test_revoking_one_device_stamps_it_and_ends_its_token(identity: Identity) -> None:
    assert isinstance(identity.clock, FakeClock)
    code, _ = identity.pairing.create_code()
    issued = identity.pairing.exchange(code, "phone")
    identity.clock.advance(5.0)
    (device,) = identity.pairing.devices()
    revoked = identity.pairing.revoke_device(device.id)
    assert (revoked.id, revoked.revoked) == (device.id, identity.clock.time())
    with pytest.raises(AuthError) as caught:
        identity.authenticator.authenticate({"Authorization": f"Bearer {issued.token}"}, None)
    assert caught.value.code == "token_revoked"


# ---- a device's budget and its audit entries --------------------------------------------------


def test_a_paired_device_gets_the_device_budget_and_one_paired_entry(
    make_identity: IdentityMaker,
) -> None:
    identity = make_identity(budget_device_tokens_per_month=9000)
    code, _ = identity.pairing.create_code()
    issued = identity.pairing.exchange(code, "phone")
    assert BudgetStore(identity.db).all() == {issued.record.sub: Budget(None, 9000)}
    (entry,) = AuditLog(identity.db).entries()
    assert (entry.action, entry.principal, entry.source) == (
        AuditAction.PAIRED,
        issued.record.sub,
        AuditSource.PAIRING,
    )


def test_a_device_paired_without_a_default_has_no_budget(identity: Identity) -> None:
    code, _ = identity.pairing.create_code()
    identity.pairing.exchange(code, "phone")
    assert BudgetStore(identity.db).all() == {}


def test_revoking_devices_records_where_it_was_done(identity: Identity) -> None:
    ids = []
    for name in ("a", "b"):
        code, _ = identity.pairing.create_code()
        ids.append(identity.pairing.exchange(code, name).record.device_id or "")
    identity.pairing.revoke_device(ids[0], source=AuditSource.TRAY)
    identity.pairing.revoke_all_devices(source=AuditSource.TRAY)
    entries = AuditLog(identity.db).entries()[2:]
    assert [(e.action, e.principal, e.source) for e in entries] == [
        (AuditAction.REVOKED, f"device:{ids[0]}", AuditSource.TRAY),
        (AuditAction.REVOKED, f"device:{ids[1]}", AuditSource.TRAY),
    ]
