"""The authenticator's edges: dev mode's X-User-Id must be a short printable name, and paired
devices stay held to the current allowlist however many of them there are."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jwt
import pytest
from multidict import CIMultiDict

from tests.fakes import FakeClock
from tests.unit.identity.conftest import SIGNING_KEY, IdentityMaker
from tray_app.config.settings import Config
from tray_app.control.assembly import Identity, open_identity
from tray_app.errors import AuthError
from tray_app.identity import tokens as tokens_module
from tray_app.identity.authenticator import IdentityAuthenticator
from tray_app.identity.principal import (
    ALL_SCOPES,
    MISSING_CREDENTIAL,
    Budget,
    CredentialKind,
    Principal,
    PrincipalId,
)
from tray_app.storage.audit import AuditSource
from tray_app.storage.budgets import BudgetStore

LOCAL = {"Host": "localhost:8787"}
CHAT = frozenset({"chat"})


@pytest.mark.parametrize("user", ["", "   ", "x" * 65, "bad\x00name", "tab\there"])
def test_dev_mode_refuses_a_user_name_that_is_not_a_short_printable_name(
    make_identity: IdentityMaker, user: str
) -> None:
    identity = make_identity(auth_dev_mode=True)
    with pytest.raises(AuthError) as caught:
        identity.authenticator.authenticate({**LOCAL, "X-User-Id": user}, "127.0.0.1")
    assert caught.value.code == "dev_mode_bad_user"


def test_dev_mode_takes_a_short_printable_name(make_identity: IdentityMaker) -> None:
    identity = make_identity(auth_dev_mode=True)
    principal = identity.authenticator.authenticate(
        {**LOCAL, "X-User-Id": " " + "x" * 64 + " "}, "127.0.0.1"
    )
    assert principal.name == "dev:" + "x" * 64


def test_every_paired_device_follows_the_allowlist_as_the_cache_turns_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens_module, "_CACHE_LIMIT", 2)
    data = str(tmp_path / "data")
    before = open_identity(Config(storage_data_dir=data), SIGNING_KEY, clock=FakeClock())
    try:  # paired while every model was allowed
        tokens = []
        for i in range(5):
            code, _ = before.pairing.create_code()
            tokens.append(before.pairing.exchange(code, f"phone {i}").token)
    finally:
        before.close()
    identity = open_identity(
        Config(storage_data_dir=data, auth_allowed_models=("small",)),
        SIGNING_KEY,
        clock=FakeClock(),
    )
    try:
        for _ in range(2):
            for token in tokens:
                principal = identity.authenticator.authenticate(
                    {"Authorization": f"Bearer {token}"}, "127.0.0.1"
                )
                assert principal.models == frozenset({"small"})
                assert principal.may_use_model("small") and not principal.may_use_model("large")
    finally:
        identity.close()


# ---- what each refusal tells the client ------------------------------------------------------

DEV_MODE_OFF = "X-User-Id is only accepted in dev mode (auth.dev_mode), which is off."
DEV_MODE_REMOTE = "Dev mode accepts X-User-Id only from this machine, addressed to localhost."
DEV_BAD_USER = "X-User-Id must be a short printable name."


def _refusal(identity: Identity, headers: Mapping[str, str], peer: str | None) -> AuthError:
    with pytest.raises(AuthError) as caught:
        identity.authenticator.authenticate(headers, peer)
    return caught.value


@pytest.mark.parametrize("dev_mode", [False, True])
@pytest.mark.parametrize("headers", [{}, LOCAL, {**LOCAL, "X-API-Key": "  "}])
def test_a_request_without_a_credential_is_told_how_to_send_one(
    make_identity: IdentityMaker, dev_mode: bool, headers: dict[str, str]
) -> None:
    refused = _refusal(make_identity(auth_dev_mode=dev_mode), headers, "127.0.0.1")
    assert (refused.status, refused.code, str(refused)) == (
        401,
        "missing_api_key",
        MISSING_CREDENTIAL,
    )


@pytest.mark.parametrize("peer", ["127.0.0.1", "203.0.113.9"])
def test_x_user_id_with_dev_mode_off_says_dev_mode_is_off(identity: Identity, peer: str) -> None:
    refused = _refusal(identity, {**LOCAL, "X-User-Id": "bob"}, peer)
    assert (refused.status, refused.code, str(refused)) == (401, "dev_mode_off", DEV_MODE_OFF)


def test_an_authenticator_built_without_saying_is_not_in_dev_mode(identity: Identity) -> None:
    built = IdentityAuthenticator(identity.db, identity.tokens, identity.api_keys, identity.clock)
    with pytest.raises(AuthError) as caught:
        built.authenticate({**LOCAL, "X-User-Id": "bob"}, "127.0.0.1")
    assert caught.value.code == "dev_mode_off"
    assert not built.still_valid(Principal("dev:bob", frozenset(), credential=_DEV_BOB))


@pytest.mark.parametrize(
    ("headers", "peer"),
    [
        ({**LOCAL, "X-User-Id": "bob"}, "203.0.113.9"),
        ({**LOCAL, "X-User-Id": "bob"}, None),
        ({"Host": "attacker.example", "X-User-Id": "bob"}, "127.0.0.1"),
        ({"X-User-Id": "bob"}, "127.0.0.1"),
    ],
)
def test_dev_mode_from_elsewhere_says_where_it_is_accepted(
    make_identity: IdentityMaker, headers: dict[str, str], peer: str | None
) -> None:
    refused = _refusal(make_identity(auth_dev_mode=True), headers, peer)
    assert (refused.status, refused.code, str(refused)) == (
        401,
        "dev_mode_remote",
        DEV_MODE_REMOTE,
    )


def test_a_bad_dev_user_name_is_told_what_a_name_must_be(make_identity: IdentityMaker) -> None:
    refused = _refusal(
        make_identity(auth_dev_mode=True), {**LOCAL, "X-User-Id": "\x00"}, "127.0.0.1"
    )
    assert (refused.status, refused.code, str(refused)) == (401, "dev_mode_bad_user", DEV_BAD_USER)


# ---- dev mode beside real credentials --------------------------------------------------------

_DEV_BOB = PrincipalId(CredentialKind.DEV, "bob")

# Headers relays of every kind add, written out here rather than read from the module, so that
# a name dropped from its lists is noticed. Some are in no list and only a prefix catches them.
RELAY_HEADERS = [
    "Forwarded",
    "Via",
    "Client-IP",
    "X-Forwarded",
    "X-Forwarded-For",
    "x-forwarded-host",
    "X-Forwarded-Proto",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Server",
    "X-Forwarded-Ssl",
    "X-Original-Forwarded-For",
    "X-Original-URL",
    "X-Real-IP",
    "X-Real-Port",
    "X-Envoy-External-Address",
    "X-Cluster-Client-IP",
    "X-Client-IP",
    "X-Client-Port",
    "CF-Connecting-IP",
    "CF-Ray",
    "cf-ipcountry",
    "CDN-Loop",
    "Fly-Client-IP",
    "Fly-Forwarded-Port",
    "Fastly-Client-IP",
    "Fastly-SSL",
    "Tailscale-User-Login",
    "True-Client-IP",
    "X-ProxyUser-Ip",
]


@pytest.mark.parametrize("header", RELAY_HEADERS)
def test_dev_mode_refuses_a_request_a_proxy_relayed(
    make_identity: IdentityMaker, header: str
) -> None:
    identity = make_identity(auth_dev_mode=True)
    headers = CIMultiDict({**LOCAL, "X-User-Id": "bob", header: "127.0.0.1"})
    refused = _refusal(identity, headers, "127.0.0.1")
    assert (refused.status, refused.code) == (401, "dev_mode_remote")


@pytest.mark.parametrize("header", ["X-Request-Id", "User-Agent", "Accept", "X-Custom-Forward"])
def test_dev_mode_takes_a_request_with_ordinary_headers(
    make_identity: IdentityMaker, header: str
) -> None:
    identity = make_identity(auth_dev_mode=True)
    headers = CIMultiDict({**LOCAL, "X-User-Id": "bob", header: "x"})
    principal = identity.authenticator.authenticate(headers, "127.0.0.1")
    assert (principal.name, principal.scopes, principal.credential) == (
        "dev:bob",
        ALL_SCOPES,
        _DEV_BOB,
    )
    assert identity.authenticator.still_valid(principal)


@pytest.mark.parametrize("authorization", ["Bearer lmg_" + "x" * 43, "Basic Ym9iOg=="])
def test_in_dev_mode_x_user_id_speaks_for_the_request_whatever_else_it_carries(
    make_identity: IdentityMaker, authorization: str
) -> None:
    identity = make_identity(auth_dev_mode=True)
    headers = {**LOCAL, "X-User-Id": "bob", "Authorization": authorization}
    assert identity.authenticator.authenticate(headers, "127.0.0.1").credential == _DEV_BOB


@pytest.mark.parametrize("peer", ["127.0.0.1", "203.0.113.9"])
def test_in_dev_mode_keys_and_tokens_work_as_ever(make_identity: IdentityMaker, peer: str) -> None:
    identity = make_identity(auth_dev_mode=True)
    key, record = identity.api_keys.create("script", scopes=frozenset({"chat"}))
    token = identity.tokens.issue(name="cli", scopes=frozenset({"models"}), ttl=60.0).token
    by_key = identity.authenticator.authenticate({"Authorization": f"Bearer {key}"}, peer)
    assert by_key.name == record.principal_name
    by_token = identity.authenticator.authenticate({"X-API-Key": token}, peer)
    assert by_token.scopes == frozenset({"models"})


# ---- changes other processes make ------------------------------------------------------------


class BootClock(FakeClock):
    """A machine just booted: its monotonic clock is still below one second."""

    def monotonic(self) -> float:
        return super().monotonic() - 1000.0


def test_the_first_request_reads_what_another_process_changed(tmp_path: Path) -> None:
    config = Config(storage_data_dir=str(tmp_path / "shared"))
    here = open_identity(config, SIGNING_KEY, clock=FakeClock())
    cli = open_identity(config, SIGNING_KEY, clock=FakeClock())  # another process
    try:
        key, record = here.api_keys.create("script", scopes=frozenset({"chat"}))
        built = IdentityAuthenticator(here.db, here.tokens, here.api_keys, BootClock())
        cli.api_keys.revoke(record.id)
        with pytest.raises(AuthError) as caught:
            built.authenticate({"Authorization": f"Bearer {key}"}, None)
        assert caught.value.code == "api_key_revoked"
    finally:
        cli.close()
        here.close()


def test_other_processes_changes_are_looked_for_at_most_twice_a_second(
    identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, _ = identity.api_keys.create("script", scopes=frozenset({"chat"}))
    looked = []
    real = identity.db.changed_by_others

    def counting() -> bool:
        looked.append(identity.clock.monotonic())
        return real()

    monkeypatch.setattr(identity.db, "changed_by_others", counting)
    assert isinstance(identity.clock, FakeClock)
    for _ in range(4):  # two seconds of requests, ten a second
        for _ in range(5):
            identity.authenticator.authenticate({"Authorization": f"Bearer {key}"}, None)
            identity.clock.advance(0.1)
    assert len(looked) == 4


# ---- budgets: from the budgets table, for every kind of credential, never from a token -------


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


class TestBudgetsComeFromTheDatabase:
    def test_a_key_made_with_a_budget_carries_it(self, identity: Identity) -> None:
        key, _ = identity.api_keys.create("k", scopes=CHAT, budget=Budget(100, 1000))
        principal = identity.authenticator.authenticate(bearer(key), None)
        assert principal.budget == Budget(100, 1000)

    def test_a_credential_without_a_budget_carries_none(self, identity: Identity) -> None:
        key, _ = identity.api_keys.create("k", scopes=CHAT)
        token = identity.tokens.issue(name="t", scopes=CHAT, ttl=60).token
        for credential in (key, token):
            assert identity.authenticator.authenticate(bearer(credential), None).budget is None

    @pytest.mark.parametrize("kind", [CredentialKind.TOKEN, CredentialKind.SNIPPET])
    def test_a_token_made_with_a_budget_carries_it(
        self, identity: Identity, kind: CredentialKind
    ) -> None:
        token = identity.tokens.issue(name="t", scopes=CHAT, ttl=60, kind=kind, budget=Budget(7))
        principal = identity.authenticator.authenticate(bearer(token.token), None)
        assert (principal.name, principal.budget) == (token.record.sub, Budget(7))

    def test_every_token_of_a_device_carries_the_devices_budget(
        self, make_identity: IdentityMaker
    ) -> None:
        identity = make_identity(
            budget_device_tokens_per_day=2000, budget_device_tokens_per_month=30000
        )
        code, _ = identity.pairing.create_code()
        first = identity.pairing.exchange(code, "phone")
        device_id = first.record.device_id
        second = identity.tokens.issue(
            name="phone", scopes=CHAT, ttl=60, kind=CredentialKind.DEVICE, device_id=device_id
        )
        for token in (first.token, second.token):
            principal = identity.authenticator.authenticate(bearer(token), None)
            assert (principal.name, principal.budget) == (
                f"device:{device_id}",
                Budget(2000, 30000),
            )

    def test_another_processs_change_reaches_the_next_request_within_a_second(
        self, tmp_path: Path
    ) -> None:
        config = Config(storage_data_dir=str(tmp_path / "data"))
        gateway = open_identity(config, SIGNING_KEY, clock=FakeClock())
        cli = open_identity(config, SIGNING_KEY, clock=FakeClock())
        try:
            key, record = gateway.api_keys.create("k", scopes=CHAT, budget=Budget(100))
            assert gateway.authenticator.authenticate(bearer(key), None).budget == Budget(100)
            BudgetStore(cli.db).set(
                record.principal_name, Budget(None, 50), now=1.0, source=AuditSource.CLI
            )
            assert isinstance(gateway.clock, FakeClock)
            gateway.clock.advance(0.5)
            assert gateway.authenticator.authenticate(bearer(key), None).budget == Budget(None, 50)
            BudgetStore(cli.db).set(
                record.principal_name, Budget(), now=2.0, source=AuditSource.CLI
            )
            gateway.clock.advance(0.5)
            assert gateway.authenticator.authenticate(bearer(key), None).budget is None
        finally:
            cli.close()
            gateway.close()

    def test_a_budget_set_in_this_process_applies_once_budgets_are_reloaded(
        self, identity: Identity
    ) -> None:
        key, record = identity.api_keys.create("k", scopes=CHAT)
        assert identity.authenticator.authenticate(bearer(key), None).budget is None
        BudgetStore(identity.db).set(
            record.principal_name, Budget(9), now=1.0, source=AuditSource.TRAY
        )
        identity.authenticator.reload_budgets()
        assert identity.authenticator.authenticate(bearer(key), None).budget == Budget(9)

    @pytest.mark.parametrize("kind", ["key", "token"])
    def test_a_credential_another_process_just_made_has_its_budget_on_its_first_request(
        self, tmp_path: Path, kind: str
    ) -> None:
        config = Config(storage_data_dir=str(tmp_path / "data"))
        gateway = open_identity(config, SIGNING_KEY, clock=FakeClock())
        cli = open_identity(config, SIGNING_KEY, clock=FakeClock())
        try:
            gateway.authenticator.refresh_if_changed()  # the last look: nothing changed yet
            if kind == "key":
                credential, _ = cli.api_keys.create("k", scopes=CHAT, budget=Budget(3, 4))
            else:
                credential = cli.tokens.issue(
                    name="t", scopes=CHAT, ttl=60, budget=Budget(3, 4)
                ).token
            # Within the half second in which the gateway does not look for changes.
            principal = gateway.authenticator.authenticate(bearer(credential), None)
            assert principal.budget == Budget(3, 4)
        finally:
            cli.close()
            gateway.close()

    def test_dev_mode_users_have_no_budget(self, make_identity: IdentityMaker) -> None:
        identity = make_identity(auth_dev_mode=True)
        BudgetStore(identity.db).set("dev:ana", Budget(1), now=1.0, source=AuditSource.CLI)
        identity.authenticator.reload_budgets()
        principal = identity.authenticator.authenticate({**LOCAL, "X-User-Id": "ana"}, "127.0.0.1")
        assert principal.budget is None


class TestTokenClaimsNeverCarryABudget:
    """A budget is the database's: issued tokens carry none, and a token re-signed with one
    (by someone holding the signing key) is refused, not believed."""

    def test_an_issued_token_names_no_budget(self, identity: Identity) -> None:
        token = identity.tokens.issue(name="t", scopes=CHAT, ttl=60, budget=Budget(5, 50))
        claims = jwt.decode(token.token, options={"verify_signature": False})
        assert not any("budget" in c or "tokens_per" in c for c in claims)
        assert "5" not in {str(v) for v in claims.values()}

    @pytest.mark.parametrize(
        "extra",
        [
            {"budget": None},
            {"budget": {"tokens_per_day": 10**12}},
            {"tokens_per_day": 10**12},
            {"tokens_per_month": None},
        ],
    )
    def test_a_token_re_signed_with_a_budget_claim_is_refused(
        self, identity: Identity, extra: dict[str, object]
    ) -> None:
        token = identity.tokens.issue(name="t", scopes=CHAT, ttl=60, budget=Budget(5))
        claims = jwt.decode(token.token, options={"verify_signature": False})
        forged = jwt.encode({**claims, **extra}, SIGNING_KEY, algorithm="HS256")
        with pytest.raises(AuthError) as caught:
            identity.authenticator.authenticate(bearer(forged), None)
        assert caught.value.code == "invalid_token"
        # The real token still has the database's budget.
        assert identity.authenticator.authenticate(bearer(token.token), None).budget == Budget(5)


class TestARevokedCredentialsBudgetIsHarmless:
    def test_a_revoked_key_with_a_budget_row_stays_refused(self, identity: Identity) -> None:
        key, record = identity.api_keys.create("k", scopes=CHAT, budget=Budget(10**9))
        identity.api_keys.revoke(record.id)
        assert BudgetStore(identity.db).get(record.principal_name) == Budget(10**9)
        with pytest.raises(AuthError) as caught:
            identity.authenticator.authenticate(bearer(key), None)
        assert caught.value.code == "api_key_revoked"

    def test_a_revoked_devices_budget_reaches_no_new_device(
        self, make_identity: IdentityMaker
    ) -> None:
        identity = make_identity()
        code, _ = identity.pairing.create_code()
        old = identity.pairing.exchange(code, "phone")
        BudgetStore(identity.db).set(old.record.sub, Budget(1), now=1.0, source=AuditSource.CLI)
        identity.pairing.revoke_device(old.record.device_id or "")
        code, _ = identity.pairing.create_code()
        new = identity.pairing.exchange(code, "phone")
        assert new.record.sub != old.record.sub
        assert identity.authenticator.authenticate(bearer(new.token), None).budget is None
        with pytest.raises(AuthError):
            identity.authenticator.authenticate(bearer(old.token), None)
