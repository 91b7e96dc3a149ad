"""The audit trail as every credential change writes it: each kind of credential, each change
(created, paired, revoked, rotated, budget changed) is exactly one entry, naming the principal,
the credential's name and where the change was made; a change that changes nothing (revoking
what is revoked) is none; and no entry ever holds a secret."""

from __future__ import annotations

import pytest

from tests.unit.identity.conftest import SIGNING_KEY, IdentityMaker
from tray_app.control.assembly import Identity
from tray_app.identity.principal import ALL_SCOPES, Budget, CredentialKind
from tray_app.storage.audit import AuditAction, AuditEntry, AuditLog, AuditSource
from tray_app.storage.budgets import BudgetStore
from tray_app.storage.credentials import SIGNING_KEY_PRINCIPAL, CredentialStore

CHAT = frozenset({"chat"})


def trail(identity: Identity) -> list[AuditEntry]:
    return AuditLog(identity.db).entries()


def only(identity: Identity) -> AuditEntry:
    (entry,) = trail(identity)
    return entry


def pair(identity: Identity, name: str = "phone") -> str:
    """Pair a device; its principal."""
    code, _ = identity.pairing.create_code()
    return identity.pairing.exchange(code, name).record.sub


class TestCreating:
    @pytest.mark.parametrize("source", list(AuditSource))
    def test_a_key_is_one_created_entry_from_where_it_was_made(
        self, identity: Identity, source: AuditSource
    ) -> None:
        _, record = identity.api_keys.create("script", scopes=CHAT, source=source)
        assert only(identity) == AuditEntry(
            identity.clock.time(),
            AuditAction.CREATED,
            record.principal_name,
            "script",
            source,
            "scopes chat; no budget",
        )

    def test_a_key_made_without_saying_where_was_made_at_the_cli(self, identity: Identity) -> None:
        identity.api_keys.create("script", scopes=CHAT)
        assert only(identity).source is AuditSource.CLI

    def test_a_keys_entry_names_its_budget(self, identity: Identity) -> None:
        identity.api_keys.create("script", scopes=CHAT, budget=Budget(500, 9000))
        assert only(identity).detail == "scopes chat; 500/day, 9,000/month"

    @pytest.mark.parametrize(
        ("kind", "source"),
        [(CredentialKind.TOKEN, AuditSource.CLI), (CredentialKind.SNIPPET, AuditSource.TRAY)],
    )
    def test_a_token_is_one_created_entry_from_where_its_kind_is_made(
        self, identity: Identity, kind: CredentialKind, source: AuditSource
    ) -> None:
        issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=60, kind=kind)
        assert only(identity) == AuditEntry(
            identity.clock.time(),
            AuditAction.CREATED,
            f"{kind.value}:{issued.record.jti}",
            "t",
            source,
            "scopes chat; no budget",
        )

    def test_a_token_says_where_it_was_made_when_told(self, identity: Identity) -> None:
        identity.tokens.issue(
            name="t", scopes=CHAT, ttl=60, source=AuditSource.TRAY, budget=Budget(None, 3)
        )
        entry = only(identity)
        assert (entry.source, entry.detail) == (
            AuditSource.TRAY,
            "scopes chat; no daily cap, 3/month",
        )

    def test_pairing_a_device_is_one_paired_entry_from_pairing(
        self, make_identity: IdentityMaker
    ) -> None:
        identity = make_identity(budget_device_tokens_per_day=2000)
        principal = pair(identity, "Ana's phone")
        assert only(identity) == AuditEntry(
            identity.clock.time(),
            AuditAction.PAIRED,
            principal,
            "Ana's phone",
            AuditSource.PAIRING,
            "2,000/day, no monthly cap",
        )

    def test_a_devices_token_adds_no_entry_of_its_own(self, identity: Identity) -> None:
        principal = pair(identity)
        device_id = principal.split(":", 1)[1]
        identity.tokens.issue(
            name="phone", scopes=CHAT, ttl=60, kind=CredentialKind.DEVICE, device_id=device_id
        )
        assert [e.action for e in trail(identity)] == [AuditAction.PAIRED]

    def test_a_pairing_code_refused_adds_no_entry(self, identity: Identity) -> None:
        code, _ = identity.pairing.create_code()
        pair_principal = identity.pairing.exchange(code, "first").record.sub
        with pytest.raises(Exception, match="already used"):
            identity.pairing.exchange(code, "second")
        assert [e.principal for e in trail(identity)] == [pair_principal]


class TestRevoking:
    @pytest.mark.parametrize("source", [AuditSource.CLI, AuditSource.TRAY])
    def test_a_key_revoked_is_one_entry_and_revoking_it_again_none(
        self, identity: Identity, source: AuditSource
    ) -> None:
        _, record = identity.api_keys.create("script", scopes=CHAT)
        identity.clock.advance(5)  # type: ignore[attr-defined]
        identity.api_keys.revoke(record.id, source=source)
        identity.api_keys.revoke(record.id, source=source)
        created, revoked = trail(identity)
        assert revoked == AuditEntry(
            identity.clock.time(),
            AuditAction.REVOKED,
            record.principal_name,
            "script",
            source,
            None,
        )
        assert created.at == revoked.at - 5

    def test_a_key_revoked_without_saying_where_was_revoked_at_the_cli(
        self, identity: Identity
    ) -> None:
        _, record = identity.api_keys.create("script", scopes=CHAT)
        identity.api_keys.revoke(record.id)
        assert trail(identity)[-1].source is AuditSource.CLI

    @pytest.mark.parametrize("kind", [CredentialKind.TOKEN, CredentialKind.SNIPPET])
    @pytest.mark.parametrize("source", [AuditSource.CLI, AuditSource.TRAY])
    def test_a_token_revoked_is_one_entry(
        self, identity: Identity, kind: CredentialKind, source: AuditSource
    ) -> None:
        record = identity.tokens.issue(name="t", scopes=CHAT, ttl=60, kind=kind).record
        identity.tokens.revoke(record.jti, source=source)
        CredentialStore(identity.db).revoke_token(record.jti, 1.0, source=source)  # again
        assert trail(identity)[1:] == [
            AuditEntry(
                identity.clock.time(),
                AuditAction.REVOKED,
                record.sub,
                "t",
                source,
                f"token {record.jti}",
            )
        ]

    def test_a_token_revoked_without_saying_where_was_revoked_at_the_cli(
        self, identity: Identity
    ) -> None:
        record = identity.tokens.issue(name="t", scopes=CHAT, ttl=60).record
        identity.tokens.revoke(record.jti)
        assert trail(identity)[-1].source is AuditSource.CLI

    def test_one_token_of_a_device_revoked_is_named_by_its_device(self, identity: Identity) -> None:
        code, _ = identity.pairing.create_code()
        record = identity.pairing.exchange(code, "phone").record
        identity.tokens.revoke(record.jti, source=AuditSource.TRAY)
        revoked = trail(identity)[-1]
        assert (revoked.action, revoked.principal, revoked.detail) == (
            AuditAction.REVOKED,
            record.sub,
            f"token {record.jti}",
        )

    @pytest.mark.parametrize("source", [AuditSource.CLI, AuditSource.TRAY])
    def test_a_device_revoked_is_one_entry_counting_its_tokens(
        self, identity: Identity, source: AuditSource
    ) -> None:
        principal = pair(identity, "phone")
        device_id = principal.split(":", 1)[1]
        identity.pairing.revoke_device(device_id, source=source)
        identity.pairing.revoke_device(device_id, source=source)  # again: no change
        assert trail(identity)[1:] == [
            AuditEntry(
                identity.clock.time(),
                AuditAction.REVOKED,
                principal,
                "phone",
                source,
                "1 token(s) with it",
            )
        ]

    def test_a_device_revoked_without_saying_where_was_revoked_at_the_cli(
        self, identity: Identity
    ) -> None:
        device_id = pair(identity).split(":", 1)[1]
        identity.pairing.revoke_device(device_id)
        assert trail(identity)[-1].source is AuditSource.CLI

    @pytest.mark.parametrize("source", [AuditSource.CLI, AuditSource.TRAY])
    def test_revoking_every_device_is_one_entry_per_live_device(
        self, identity: Identity, source: AuditSource
    ) -> None:
        first, second, gone = pair(identity, "a"), pair(identity, "b"), pair(identity, "c")
        identity.pairing.revoke_device(gone.split(":", 1)[1], source=source)
        assert identity.pairing.revoke_all_devices(source=source) == 2
        assert identity.pairing.revoke_all_devices(source=source) == 0
        entries = trail(identity)[4:]
        assert [(e.action, e.principal, e.name, e.source) for e in entries] == [
            (AuditAction.REVOKED, first, "a", source),
            (AuditAction.REVOKED, second, "b", source),
        ]
        assert {e.detail for e in entries} == {"every device revoked"}

    def test_revoking_every_device_without_saying_where_was_done_at_the_cli(
        self, identity: Identity
    ) -> None:
        pair(identity)
        identity.pairing.revoke_all_devices()
        assert trail(identity)[-1].source is AuditSource.CLI


class TestRotating:
    @pytest.mark.parametrize("source", [AuditSource.CLI, AuditSource.TRAY])
    def test_a_rotation_is_one_entry_with_the_counts(
        self, identity: Identity, source: AuditSource
    ) -> None:
        identity.tokens.issue(name="t", scopes=CHAT, ttl=60)
        pair(identity)
        pair(identity)
        store = CredentialStore(identity.db)
        before = len(trail(identity))
        revoked = store.revoke_for_key_rotation(identity.clock.time(), source=source)
        assert (revoked.tokens, revoked.devices) == (3, 2)
        assert trail(identity)[before:] == [
            AuditEntry(
                identity.clock.time(),
                AuditAction.ROTATED,
                SIGNING_KEY_PRINCIPAL,
                None,
                source,
                "3 token(s) and 2 device(s) revoked",
            )
        ]

    def test_a_rotation_is_made_at_the_cli_unless_said(self, identity: Identity) -> None:
        CredentialStore(identity.db).revoke_for_key_rotation(identity.clock.time())
        assert only(identity).source is AuditSource.CLI


class TestEveryChangeHappensWithItsEntryOrNotAtAll:
    def fail_audit_writes(self, identity: Identity) -> None:
        with identity.db.transaction() as conn:
            conn.execute(
                "CREATE TRIGGER no_audit BEFORE INSERT ON audit "
                "BEGIN SELECT RAISE(ABORT, 'no'); END"
            )

    def test_no_key_without_its_entry(self, identity: Identity) -> None:
        self.fail_audit_writes(identity)
        with pytest.raises(Exception, match="could not be written"):
            identity.api_keys.create("k", scopes=CHAT, budget=Budget(5))
        assert identity.api_keys.list() == []
        assert BudgetStore(identity.db).all() == {}

    def test_no_token_without_its_entry(self, identity: Identity) -> None:
        self.fail_audit_writes(identity)
        with pytest.raises(Exception, match="could not be written"):
            identity.tokens.issue(name="t", scopes=CHAT, ttl=60, budget=Budget(5))
        assert identity.tokens.list() == []
        assert BudgetStore(identity.db).all() == {}

    def test_no_revocation_without_its_entry(self, identity: Identity) -> None:
        _, record = identity.api_keys.create("k", scopes=CHAT)
        self.fail_audit_writes(identity)
        with pytest.raises(Exception, match="could not be written"):
            identity.api_keys.revoke(record.id)
        assert identity.api_keys.list()[0].revoked is None

    def test_no_pairing_without_its_entry(self, identity: Identity) -> None:
        code, _ = identity.pairing.create_code()
        self.fail_audit_writes(identity)
        with pytest.raises(Exception, match="could not be written"):
            identity.pairing.exchange(code, "phone")
        assert identity.pairing.devices() == []


class TestNoSecretInTheTrail:
    def test_no_entry_holds_a_key_a_token_a_code_or_the_signing_key(
        self, make_identity: IdentityMaker
    ) -> None:
        identity = make_identity(
            budget_device_tokens_per_day=10, budget_copied_key_tokens_per_month=20
        )
        secrets: list[str] = [SIGNING_KEY.decode(), SIGNING_KEY.hex()]
        key, record = identity.api_keys.create("k", scopes=ALL_SCOPES, budget=Budget(1, 2))
        secrets.append(key)
        token = identity.tokens.issue(name="t", scopes=CHAT, ttl=60, budget=Budget(3))
        snippet = identity.tokens.issue(name="s", scopes=CHAT, ttl=60, kind=CredentialKind.SNIPPET)
        secrets += [token.token, snippet.token]
        code, _ = identity.pairing.create_code()
        device = identity.pairing.exchange(code, "phone")
        secrets += [code, device.token]
        BudgetStore(identity.db).set(device.record.sub, Budget(4), now=1.0, source=AuditSource.CLI)
        identity.api_keys.revoke(record.id)
        identity.tokens.revoke(token.record.jti)
        identity.pairing.revoke_device(device.record.device_id or "")
        CredentialStore(identity.db).revoke_for_key_rotation(identity.clock.time())
        rows = identity.db.query("SELECT * FROM audit")
        assert len(rows) == 9  # 3 created, 1 paired, 1 budget, 3 revoked, 1 rotated
        text = "\n".join(str(value) for row in rows for value in tuple(row))
        for secret in secrets:
            # Whole, or any long piece of it (a JWT's payload or signature alone).
            pieces = [secret, *(part for part in secret.split(".") if len(part) >= 16)]
            for piece in pieces:
                assert piece not in text
        assert key.removeprefix("lmg_")[:12] not in text
