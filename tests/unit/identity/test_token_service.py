"""Access tokens end to end in the token service: what a token says and whom it speaks for,
in the process that issued it and in any other; every way one is refused, with its code and
message; every claim a key holder could re-sign, each way; the leeway at both ends of a
token's life; the verified-token cache; and a signing key rotated by another process."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from tests.fakes import FakeClock
from tests.unit.identity.conftest import SIGNING_KEY
from tray_app.control.assembly import Identity
from tray_app.errors import AuthError, SecretStoreError
from tray_app.identity import tokens as tokens_module
from tray_app.identity.access import AccessPolicy
from tray_app.identity.principal import ALL_SCOPES, Budget, CredentialKind, Principal, PrincipalId
from tray_app.identity.tokens import IssuedToken, TokenService, check_scopes, principal_for
from tray_app.storage.audit import AuditAction, AuditLog, AuditSource
from tray_app.storage.budgets import BudgetStore
from tray_app.storage.credentials import CredentialStore

CHAT = frozenset({"chat"})
NEW_KEY = b"n" * 32
EVERY_MODEL = AccessPolicy.with_allowlist(())


def clock_of(identity: Identity) -> FakeClock:
    assert isinstance(identity.clock, FakeClock)
    return identity.clock


def service(
    identity: Identity,
    *,
    clock: FakeClock | None = None,
    key: bytes = SIGNING_KEY,
    key_loader: Callable[[], bytes] | None = None,
    access: AccessPolicy = EVERY_MODEL,
) -> TokenService:
    """Another process's token service on the same database."""
    return TokenService(
        identity.db, key, clock or identity.clock, key_loader=key_loader, access=access
    )


def refused(tokens: TokenService, token: str) -> AuthError:
    with pytest.raises(AuthError) as caught:
        tokens.verify(token)
    assert caught.value.status == 401
    return caught.value


def decode(token: str, key: bytes) -> dict[str, Any]:
    """The claims of a token signed with ``key`` (the fake clock is not PyJWT's)."""
    return jwt.decode(
        token,
        key,
        algorithms=["HS256"],
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


# ---- scopes and kinds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scopes", "got"),
    [
        (frozenset(), "none"),
        (frozenset({"admin"}), "admin"),
        (frozenset({"chat", "admin", "root"}), "admin, chat, root"),
        (frozenset({"Chat"}), "Chat"),
    ],
)
def test_scopes_outside_the_four_or_none_at_all_are_refused_by_name(
    scopes: frozenset[str], got: str
) -> None:
    with pytest.raises(ValueError) as caught:
        check_scopes(scopes)
    assert str(caught.value) == (
        f"scopes must be some of chat, embeddings, metrics, models; got {got}"
    )


@pytest.mark.parametrize(
    "scopes", [CHAT, frozenset({"models", "metrics"}), ALL_SCOPES, frozenset({"embeddings"})]
)
def test_known_scopes_pass_as_they_are(scopes: frozenset[str]) -> None:
    assert check_scopes(scopes) is scopes


@pytest.mark.parametrize("kind", [CredentialKind.TOKEN, CredentialKind.SNIPPET])
def test_a_cli_or_snippet_token_speaks_for_itself(kind: CredentialKind) -> None:
    assert principal_for(kind, "j" * 24, None) == PrincipalId(kind, "j" * 24)
    assert principal_for(kind, "j" * 24, "dev1") == PrincipalId(kind, "j" * 24)


def test_a_device_token_speaks_for_its_device() -> None:
    assert principal_for(CredentialKind.DEVICE, "j" * 24, "dev1") == PrincipalId(
        CredentialKind.DEVICE, "dev1"
    )
    for missing in (None, ""):
        with pytest.raises(ValueError) as caught:
            principal_for(CredentialKind.DEVICE, "j" * 24, missing)
        assert str(caught.value) == "a device token needs its device's ID"


@pytest.mark.parametrize("kind", [CredentialKind.KEY, CredentialKind.DEV])
def test_a_key_or_a_dev_user_is_no_token_kind(kind: CredentialKind) -> None:
    with pytest.raises(ValueError) as caught:
        principal_for(kind, "j" * 24, "dev1")
    assert str(caught.value) == f"unknown token kind {kind!r}"


# ---- what an issued token is ------------------------------------------------------------

VARIANTS = [
    (CredentialKind.TOKEN, None, None, None),
    (CredentialKind.TOKEN, frozenset({"small", "large"}), 64, None),
    (CredentialKind.SNIPPET, frozenset({"small"}), None, None),
    (CredentialKind.DEVICE, None, 128, "dev1"),
]


@pytest.mark.parametrize(("kind", "models", "max_tokens", "device_id"), VARIANTS)
def test_a_token_carries_exactly_its_record_and_verifies_in_any_process(
    identity: Identity,
    kind: CredentialKind,
    models: frozenset[str] | None,
    max_tokens: int | None,
    device_id: str | None,
) -> None:
    clock_of(identity).advance(0.75)  # a fraction of a second: the claims are whole seconds
    now = identity.clock.time()
    scopes = frozenset({"models", "chat"})
    issued = identity.tokens.issue(
        name="my token",
        scopes=scopes,
        ttl=90.5,
        kind=kind,
        models=models,
        max_tokens=max_tokens,
        device_id=device_id,
    )
    record = issued.record
    sub = f"device:{device_id}" if kind is CredentialKind.DEVICE else f"{kind.value}:{record.jti}"
    assert len(record.jti) == 24 and int(record.jti, 16) >= 0
    assert (record.sub, record.name, record.kind) == (sub, "my token", kind)
    assert (record.scopes, record.models, record.max_tokens) == (scopes, models, max_tokens)
    assert (record.created, record.expires) == (now, float(int(now + 90.5)))
    assert (record.revoked, record.device_id, record.issued_sub) == (None, device_id, None)
    assert record.credential == PrincipalId(CredentialKind.TOKEN, record.jti)

    claims = decode(issued.token, SIGNING_KEY)
    assert jwt.get_unverified_header(issued.token)["alg"] == "HS256"
    expected: dict[str, Any] = {
        "sub": sub,
        "scope": "chat models",
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + 90.5),
        "jti": record.jti,
    }
    if models is not None:
        expected["models"] = sorted(models)
    if max_tokens is not None:
        expected["max_tokens"] = max_tokens
    assert claims == expected

    other = service(identity)
    assert identity.tokens.list() == other.list() == [record]
    for tokens in (identity.tokens, other, service(identity)):
        for _ in range(2):  # decoded, then from the cache
            assert tokens.verify(issued.token) == Principal(
                name=sub,
                scopes=scopes,
                models=models if kind is CredentialKind.TOKEN else None,  # today's allowlist
                max_tokens=max_tokens,
                credential=PrincipalId(CredentialKind.TOKEN, record.jti),
            )
            assert tokens.is_active(record.jti)


def test_devices_and_snippets_follow_todays_allowlist_and_cli_tokens_keep_theirs(
    identity: Identity,
) -> None:
    made = {
        kind: identity.tokens.issue(
            name="t", scopes=CHAT, ttl=60, kind=kind, models=frozenset({"big"}), device_id="d"
        )
        for kind in (CredentialKind.TOKEN, CredentialKind.SNIPPET, CredentialKind.DEVICE)
    }
    today = service(identity, access=AccessPolicy.with_allowlist(["small"]))
    assert today.verify(made[CredentialKind.TOKEN].token).models == frozenset({"big"})
    assert today.verify(made[CredentialKind.SNIPPET].token).models == frozenset({"small"})
    assert today.verify(made[CredentialKind.DEVICE].token).models == frozenset({"small"})


def test_a_record_with_unknown_scopes_grants_only_known_ones(identity: Identity) -> None:
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=60)
    with identity.db.transaction() as conn:  # a later version's scope, read by this one
        conn.execute("UPDATE tokens SET scopes = 'admin chat' WHERE jti = ?", (issued.record.jti,))
    other = service(identity)
    forged = jwt.encode(
        {**claims_of(issued.token), "scope": "admin chat"}, SIGNING_KEY, algorithm="HS256"
    )
    assert other.verify(forged).scopes == CHAT


# ---- every way a token is refused ----------------------------------------------------------


def test_a_token_signed_with_another_key_is_refused(identity: Identity) -> None:
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=60)
    error = refused(service(identity, key=NEW_KEY), issued.token)
    assert error.code == "invalid_token"
    assert str(error) == ("The access token's signature is invalid (was the signing key rotated?).")


@pytest.mark.parametrize("algorithm", ["HS384", "HS512", "none"])
def test_a_token_with_another_algorithm_is_refused(identity: Identity, algorithm: str) -> None:
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=60)
    key: str | bytes = "" if algorithm == "none" else SIGNING_KEY * 2  # enough for HS512
    forged = jwt.encode(claims_of(issued.token), key, algorithm=algorithm)
    error = refused(identity.tokens, forged)
    assert error.code == "invalid_token"
    assert str(error) == "The access token uses a signing algorithm LM Gate does not accept."


@pytest.mark.parametrize("claim", ["sub", "scope", "iat", "nbf", "exp", "jti"])
def test_a_token_without_a_required_claim_is_refused_by_its_name(
    identity: Identity, claim: str
) -> None:
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=60)
    claims = claims_of(issued.token)
    del claims[claim]
    error = refused(identity.tokens, jwt.encode(claims, SIGNING_KEY, algorithm="HS256"))
    assert error.code == "invalid_token"
    assert str(error) == f"The access token lacks the {claim!r} claim."


@pytest.mark.parametrize("garbage", ["x", "a.b.c", "a.b", "lmg", "eyJhbGciOiJIUzI1NiJ9.e30"])
def test_what_is_no_token_at_all_is_refused(identity: Identity, garbage: str) -> None:
    error = refused(identity.tokens, garbage)
    assert error.code == "invalid_token"
    assert str(error) == "The credential is neither a valid access token nor an API key."


def test_time_claims_that_are_floats_are_numbers(identity: Identity) -> None:
    # PyJWT writes whole seconds, another issuer might not: a float is still a time.
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=60)
    claims = claims_of(issued.token)
    for claim in ("exp", "nbf", "iat"):
        forged = jwt.encode({**claims, claim: claims[claim] + 0.5}, SIGNING_KEY, algorithm="HS256")
        assert refused(identity.tokens, forged).code == "invalid_token"  # differs from its record
        assert "does not match" in str(refused(identity.tokens, forged))


def test_a_token_whose_id_was_never_issued_reads_as_revoked(identity: Identity) -> None:
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=60)
    forged = jwt.encode(
        {**claims_of(issued.token), "jti": "0" * 24}, SIGNING_KEY, algorithm="HS256"
    )
    error = refused(identity.tokens, forged)
    assert error.code == "token_revoked"
    assert str(error) == "The access token has been revoked."


def test_a_revoked_token_is_refused_at_once_here_and_after_a_reload_elsewhere(
    identity: Identity,
) -> None:
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=600)
    elsewhere = service(identity)
    assert identity.tokens.verify(issued.token).credential is not None  # now cached
    elsewhere.verify(issued.token)
    clock_of(identity).advance(3)
    revoked = identity.tokens.revoke(issued.record.jti[:8])
    assert revoked.jti == issued.record.jti
    assert identity.tokens.list()[0].revoked == identity.clock.time()
    assert not identity.tokens.is_active(issued.record.jti)
    elsewhere.reload()
    unread = service(identity)  # has never read it live: looks it up on first use
    for tokens in (identity.tokens, elsewhere, unread):
        for _ in range(2):
            error = refused(tokens, issued.token)
            assert error.code == "token_revoked"
            assert str(error) == "The access token has been revoked."
        assert not tokens.is_active(issued.record.jti)  # a dead token is not remembered as live


def test_a_token_from_another_process_is_accepted_on_first_use_and_remembered(
    identity: Identity,
) -> None:
    issued = service(identity).issue(name="t", scopes=CHAT, ttl=600)
    assert not identity.tokens.is_active(issued.record.jti)
    assert identity.tokens.verify(issued.token).name == issued.record.sub
    assert identity.tokens.is_active(issued.record.jti)


# ---- every claim a key holder could re-sign, each way -------------------------------------

Tamper = Callable[[dict[str, Any]], None]


def _set(name: str, value: object) -> Tamper:
    return lambda claims: claims.__setitem__(name, value)


def _drop(name: str) -> Tamper:
    return lambda claims: claims.pop(name)


def _shift(name: str, by: int) -> Tamper:
    return lambda claims: claims.__setitem__(name, claims[name] + by)


def _reverse(name: str) -> Tamper:
    return lambda claims: claims.__setitem__(name, claims[name][::-1])


FULL_TAMPERS: dict[str, Tamper] = {  # a token issued with models and max_tokens
    "sub of another token": _set("sub", "token:" + "0" * 24),
    "sub of a device": _set("sub", "device:d"),
    "more scopes": _set("scope", "chat models"),
    "fewer scopes": _set("scope", "models"),
    "scopes unsorted": _set("scope", "models chat"),
    "later exp": _shift("exp", 3600),
    "earlier exp": _shift("exp", -10),
    "earlier iat": _shift("iat", -1),
    "later iat": _shift("iat", 1),
    "earlier nbf": _shift("nbf", -1),
    "backdated iat and nbf": lambda c: c.update(iat=c["iat"] - 60, nbf=c["nbf"] - 60),
    "models removed": _drop("models"),
    "models widened": _set("models", ["large", "medium", "small"]),
    "models narrowed": _set("models", ["large"]),
    "models unsorted": _reverse("models"),
    "models null": _set("models", None),
    "max_tokens removed": _drop("max_tokens"),
    "max_tokens raised": _set("max_tokens", 1_000_000),
    "max_tokens lowered": _set("max_tokens", 1),
    "max_tokens as a float": _set("max_tokens", 64.0),
    "max_tokens as a string": _set("max_tokens", "64"),
    "max_tokens null": _set("max_tokens", None),
    "an extra claim": _set("admin", True),
    "an audience": _set("aud", "lmgate"),
}
BARE_TAMPERS: dict[str, Tamper] = {  # a token issued with neither
    "models added": _set("models", ["small"]),
    "models added empty": _set("models", []),
    "models added null": _set("models", None),
    "max_tokens added": _set("max_tokens", 64),
    "max_tokens added null": _set("max_tokens", None),
    "an extra claim": _set("x", 1),
}
ONE_TOKEN_TAMPERS: dict[str, Tamper] = {  # a token issued with max_tokens 1
    "max_tokens as true": _set("max_tokens", True),
    "max_tokens as 1.0": _set("max_tokens", 1.0),
}


def _issue_for(identity: Identity, shape: str) -> IssuedToken:
    if shape == "full":
        return identity.tokens.issue(
            name="t",
            scopes=CHAT,
            ttl=3600,
            models=frozenset({"small", "large"}),
            max_tokens=64,
        )
    if shape == "one":
        return identity.tokens.issue(name="t", scopes=CHAT, ttl=3600, max_tokens=1)
    return identity.tokens.issue(name="t", scopes=CHAT, ttl=3600)


CASES = (
    [("full", name) for name in FULL_TAMPERS]
    + [("bare", name) for name in BARE_TAMPERS]
    + [("one", name) for name in ONE_TOKEN_TAMPERS]
)
TAMPERS = {"full": FULL_TAMPERS, "bare": BARE_TAMPERS, "one": ONE_TOKEN_TAMPERS}


@pytest.mark.parametrize("shape", ["full", "bare", "one"])
def test_re_signing_the_same_claims_is_accepted(identity: Identity, shape: str) -> None:
    issued = _issue_for(identity, shape)
    claims = dict(reversed(claims_of(issued.token).items()))
    again = jwt.encode(claims, SIGNING_KEY, algorithm="HS256")
    assert again != issued.token
    assert identity.tokens.verify(again) == identity.tokens.verify(issued.token)


@pytest.mark.parametrize(("shape", "tamper"), CASES)
def test_a_re_signed_token_that_differs_from_its_record_is_refused(
    identity: Identity, shape: str, tamper: str
) -> None:
    issued = _issue_for(identity, shape)
    identity.tokens.verify(issued.token)  # the real one, now cached
    claims = claims_of(issued.token)
    TAMPERS[shape][tamper](claims)
    forged = jwt.encode(claims, SIGNING_KEY, algorithm="HS256")
    for tokens in (identity.tokens, service(identity)):
        error = refused(tokens, forged)
        assert error.code == "invalid_token"
        assert str(error) == "The access token does not match the token LM Gate issued."


def test_a_renamed_token_is_checked_against_the_sub_it_was_issued_with(
    identity: Identity,
) -> None:
    # An upgrade renamed the principal: the JWT keeps the sub it was signed with.
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=600)
    with identity.db.transaction() as conn:
        conn.execute(
            "UPDATE tokens SET sub = 'token:renamed', issued_sub = ? WHERE jti = ?",
            (issued.record.sub, issued.record.jti),
        )
    other = service(identity)
    assert other.verify(issued.token).name == "token:renamed"
    assert other.list()[0].issued_sub == issued.record.sub
    renamed = jwt.encode(
        {**claims_of(issued.token), "sub": "token:renamed"}, SIGNING_KEY, algorithm="HS256"
    )
    assert refused(service(identity), renamed).code == "invalid_token"


# ---- the leeway at both ends of a token's life ---------------------------------------------


@pytest.mark.parametrize("cached", [False, True])
def test_a_token_is_accepted_until_five_seconds_past_its_expiry(
    identity: Identity, cached: bool
) -> None:
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=60)
    clock = clock_of(identity)
    if cached:
        identity.tokens.verify(issued.token)
    clock.advance(64.75)
    assert identity.tokens.verify(issued.token).name == issued.record.sub
    assert identity.tokens.is_active(issued.record.jti)
    clock.advance(0.25)  # exactly exp + 5 s
    assert not identity.tokens.is_active(issued.record.jti)
    for _ in range(2):
        error = refused(identity.tokens, issued.token)
        assert error.code == "token_expired"
        assert str(error) == "The access token has expired; get a new one."
        assert issued.token not in identity.tokens._cache  # nothing dead is kept


def test_a_reload_keeps_a_token_within_its_leeway(identity: Identity) -> None:
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=60)
    clock_of(identity).advance(62)
    identity.tokens.reload()
    assert identity.tokens.is_active(issued.record.jti)
    assert identity.tokens.verify(issued.token).name == issued.record.sub
    clock_of(identity).advance(3)
    identity.tokens.reload()
    assert not identity.tokens.is_active(issued.record.jti)


def test_a_process_whose_clock_is_behind_accepts_a_token_up_to_five_seconds_early(
    identity: Identity,
) -> None:
    now = identity.clock.time()
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=600)
    assert service(identity, clock=FakeClock(start=now - 5)).verify(issued.token).credential
    behind = service(identity, clock=FakeClock(start=now - 5.25))
    error = refused(behind, issued.token)
    assert error.code == "token_not_yet_valid"
    assert str(error) == "The access token is not valid yet."


def test_expired_tokens_are_listed_only_when_asked(identity: Identity) -> None:
    old = identity.tokens.issue(name="old", scopes=CHAT, ttl=10).record
    clock_of(identity).advance(5)
    new = identity.tokens.issue(name="new", scopes=CHAT, ttl=60).record
    clock_of(identity).advance(5)  # exactly when the old one expires
    assert identity.tokens.list() == [new]
    assert identity.tokens.list(include_expired=True) == [old, new]


# ---- the verified-token cache ---------------------------------------------------------------


def test_the_cache_never_holds_more_than_its_limit_and_keeps_the_latest(
    identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens_module, "_CACHE_LIMIT", 3)
    tokens = identity.tokens
    issued = [tokens.issue(name=f"t{i}", scopes=CHAT, ttl=600) for i in range(7)]
    for one in issued:
        tokens.verify(one.token)
        assert 0 < len(tokens._cache) <= 3
        assert one.token in tokens._cache


def test_a_cached_token_is_refused_once_another_key_replaces_the_old(
    identity: Identity,
) -> None:
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=600)
    identity.tokens.verify(issued.token)
    identity.tokens.replace_key(NEW_KEY)
    assert refused(identity.tokens, issued.token).code == "invalid_token"
    after = identity.tokens.issue(name="t2", scopes=CHAT, ttl=600)
    decode(after.token, NEW_KEY)  # signed with the new key


# ---- a signing key rotated by another process ----------------------------------------------


class Loader:
    def __init__(self, key: bytes = NEW_KEY) -> None:
        self.key = key
        self.calls = 0
        self.locked = False

    def __call__(self) -> bytes:
        self.calls += 1
        if self.locked:
            raise SecretStoreError("the keyring is locked")
        return self.key


def rotate_elsewhere(identity: Identity) -> IssuedToken:
    """What `lmgate keys rotate` does in another process, then a token it issues."""
    CredentialStore(identity.db).revoke_for_key_rotation(identity.clock.time())
    return service(identity, key=NEW_KEY).issue(name="new", scopes=CHAT, ttl=600)


def test_without_a_rotation_or_a_loader_the_key_stays(identity: Identity) -> None:
    loader = Loader()
    tokens = service(identity, key_loader=loader)
    assert tokens.sync_key() is False
    assert loader.calls == 0
    rotate_elsewhere(identity)
    assert service(identity).sync_key() is False  # no loader: a restart picks the key up
    # A process started after the rotation already has the key of that generation.
    assert service(identity, key=NEW_KEY, key_loader=loader).sync_key() is False
    assert loader.calls == 0


def test_a_rotation_elsewhere_is_picked_up_once(
    identity: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    loader = Loader()
    tokens = service(identity, key_loader=loader)
    new = rotate_elsewhere(identity)
    with caplog.at_level(logging.INFO, logger="lmgate.tokens"):
        assert tokens.sync_key() is True
    assert "the signing key was rotated; tokens are now checked against the new one" in (
        caplog.messages
    )
    assert tokens.sync_key() is False
    assert loader.calls == 1
    assert tokens.verify(new.token).name == new.record.sub


def test_a_token_signed_with_a_key_rotated_a_moment_ago_verifies_on_first_use(
    identity: Identity,
) -> None:
    loader = Loader()
    tokens = service(identity, key_loader=loader)
    new = rotate_elsewhere(identity)
    assert tokens.verify(new.token).name == new.record.sub
    assert loader.calls == 1


def test_issuing_after_a_rotation_elsewhere_signs_with_the_new_key(identity: Identity) -> None:
    tokens = service(identity, key_loader=Loader())
    rotate_elsewhere(identity)
    issued = tokens.issue(name="t", scopes=CHAT, ttl=600)
    decode(issued.token, NEW_KEY)


def test_other_refusals_do_not_reread_the_key(identity: Identity) -> None:
    loader = Loader()
    tokens = service(identity, key_loader=loader)
    expired = identity.tokens.issue(name="t", scopes=CHAT, ttl=1)
    clock_of(identity).advance(10)
    rotate_elsewhere(identity)
    # Signed with the key this process has, but expired: no new key would help.
    assert refused(tokens, expired.token).code == "token_expired"
    assert loader.calls == 0


def test_a_rotated_key_that_cannot_be_read_keeps_the_old_and_is_tried_again(
    identity: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    loader = Loader()
    loader.locked = True
    tokens = service(identity, key_loader=loader)
    new = rotate_elsewhere(identity)
    with caplog.at_level(logging.ERROR, logger="lmgate.tokens"):
        assert tokens.sync_key() is False
        assert refused(tokens, new.token).code == "invalid_token"
    assert (
        "the signing key was rotated but cannot be read: the keyring is locked" in caplog.messages
    )
    assert tokens.verify(identity.tokens.issue(name="o", scopes=CHAT, ttl=60).token)  # old key
    loader.locked = False
    assert tokens.verify(new.token).name == new.record.sub
    assert tokens.sync_key() is False


def test_a_verified_token_is_not_decoded_again_until_it_changes(
    identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    real = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)  # the module the token service calls
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=600)
    for _ in range(3):
        identity.tokens.verify(issued.token)
    assert decoded == [issued.token]
    clock_of(identity).advance(604)  # until the last second of its leeway, from the cache
    identity.tokens.verify(issued.token)
    assert decoded == [issued.token]
    identity.tokens.reload()  # the database changed: verified again, once
    for _ in range(2):
        identity.tokens.verify(issued.token)
    assert decoded == [issued.token] * 2


def test_a_token_known_to_this_process_is_verified_without_a_database_lookup(
    identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[str] = []
    real = CredentialStore.token

    def counting(self: CredentialStore, jti: str) -> object:
        looked_up.append(jti)
        return real(self, jti)

    monkeypatch.setattr(CredentialStore, "token", counting)
    here = identity.tokens.issue(name="here", scopes=CHAT, ttl=600)
    elsewhere = service(identity).issue(name="elsewhere", scopes=CHAT, ttl=600)
    identity.tokens.verify(here.token)
    assert looked_up == []
    for _ in range(2):
        identity.tokens.reload()  # a change elsewhere: the cache is dropped, not what is live
        identity.tokens.verify(here.token)
        identity.tokens.verify(elsewhere.token)
    assert looked_up == []


@pytest.mark.parametrize("state", ["issued elsewhere", "expired", "revoked elsewhere"])
def test_a_token_this_process_does_not_hold_as_live_can_be_revoked(
    identity: Identity, state: str
) -> None:
    maker = identity.tokens if state == "expired" else service(identity)
    issued = maker.issue(name="t", scopes=CHAT, ttl=60)
    if state == "expired":
        clock_of(identity).advance(70)
        identity.tokens.reload()
    if state == "revoked elsewhere":
        maker.revoke(issued.record.jti)
    assert identity.tokens.revoke(issued.record.jti).jti == issued.record.jti
    assert not identity.tokens.is_active(issued.record.jti)
    assert refused(identity.tokens, issued.token).code in {"token_revoked", "token_expired"}


@pytest.mark.parametrize("start", [1_000_000_000.0, 4_000_000_000.0])  # 2001 and 2096
def test_times_are_checked_against_the_injected_clock_never_the_machines(
    identity: Identity, start: float
) -> None:
    clock = FakeClock(start=start)
    tokens = service(identity, clock=clock)
    issued = tokens.issue(name="t", scopes=CHAT, ttl=60)
    assert tokens.verify(issued.token).name == issued.record.sub
    clock.advance(70)
    assert refused(service(identity, clock=clock), issued.token).code == "token_expired"


def test_a_record_and_its_database_row_carry_every_field_both_ways() -> None:
    # Every field set, none at its default: a field dropped or reset on the way is noticed.
    record = tokens_module.TokenRecord(
        jti="j" * 24,
        sub="token:" + "j" * 24,
        name="phone",
        kind=CredentialKind.DEVICE,
        scopes=frozenset({"chat"}),
        models=frozenset({"m"}),
        max_tokens=64,
        created=100.0,
        expires=200.0,
        revoked=150.0,
        device_id="d" * 12,
        issued_sub="device:" + "d" * 12,
    )
    row = tokens_module._row(record)
    assert (row.revoked, row.issued_sub, row.device_id, row.kind) == (
        150.0,
        "device:" + "d" * 12,
        "d" * 12,
        "device",
    )
    assert tokens_module._record(row) == record


# ---- a token's budget and its audit entries ---------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "source"),
    [(CredentialKind.TOKEN, AuditSource.CLI), (CredentialKind.SNIPPET, AuditSource.TRAY)],
)
def test_a_token_is_stored_with_its_budget_under_its_own_principal(
    identity: Identity, kind: CredentialKind, source: AuditSource
) -> None:
    issued = identity.tokens.issue(
        name="t", scopes=frozenset({"chat"}), ttl=60, kind=kind, budget=Budget(None, 8)
    )
    assert issued.record.sub == f"{kind.value}:{issued.record.jti}"
    assert BudgetStore(identity.db).all() == {issued.record.sub: Budget(None, 8)}
    (entry,) = AuditLog(identity.db).entries()
    assert (entry.principal, entry.source) == (issued.record.sub, source)
    assert tokens_module.ISSUED_FROM[kind] is source


def test_a_devices_token_is_given_no_budget_and_no_entry_of_its_own(identity: Identity) -> None:
    identity.tokens.issue(
        name="phone",
        scopes=frozenset({"chat"}),
        ttl=60,
        kind=CredentialKind.DEVICE,
        device_id="d1",
        budget=Budget(5),
        source=AuditSource.CLI,
    )
    assert BudgetStore(identity.db).all() == {}
    assert AuditLog(identity.db).entries() == []
    assert tokens_module.ISSUED_FROM[CredentialKind.DEVICE] is AuditSource.PAIRING


def test_a_token_says_where_it_was_made_and_revoked_when_told(identity: Identity) -> None:
    record = identity.tokens.issue(
        name="t", scopes=frozenset({"chat"}), ttl=60, source=AuditSource.GATEWAY
    ).record
    identity.tokens.revoke(record.jti, source=AuditSource.TRAY)
    created, revoked = AuditLog(identity.db).entries()
    assert (created.action, created.source) == (AuditAction.CREATED, AuditSource.GATEWAY)
    assert (revoked.action, revoked.source) == (AuditAction.REVOKED, AuditSource.TRAY)
