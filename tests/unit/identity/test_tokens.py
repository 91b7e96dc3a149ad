"""Access tokens refused at issue and at revocation, and tokens signed with the real key whose
claims are still not what LM Gate issues (only a holder of the key can make these)."""

from __future__ import annotations

import itertools

import jwt
import pytest

from tests.fakes import FakeClock
from tests.unit.identity.conftest import SIGNING_KEY
from tray_app.control.assembly import Identity
from tray_app.errors import AuthError
from tray_app.identity import tokens as tokens_module
from tray_app.identity.principal import CredentialKind

CHAT = frozenset({"chat"})


@pytest.mark.parametrize("scopes", [frozenset(), frozenset({"chat", "admin"})])
def test_a_token_needs_known_scopes(identity: Identity, scopes: frozenset[str]) -> None:
    with pytest.raises(ValueError, match="scopes must be some of"):
        identity.tokens.issue(name="t", scopes=scopes, ttl=60)
    assert identity.tokens.list() == []


@pytest.mark.parametrize("ttl", [0, -5])
def test_a_token_needs_a_positive_lifetime(identity: Identity, ttl: float) -> None:
    with pytest.raises(ValueError, match=r"^the lifetime must be positive$"):
        identity.tokens.issue(name="t", scopes=CHAT, ttl=ttl)
    assert identity.tokens.list() == []


def test_a_token_of_an_unknown_kind_or_a_device_token_without_a_device_is_refused(
    identity: Identity,
) -> None:
    # An API key is not a token kind: it has its own service and table.
    with pytest.raises(ValueError, match="unknown token kind"):
        identity.tokens.issue(name="t", scopes=CHAT, ttl=60, kind=CredentialKind.KEY)
    with pytest.raises(ValueError, match="needs its device's ID"):
        identity.tokens.issue(name="t", scopes=CHAT, ttl=60, kind=CredentialKind.DEVICE)
    assert identity.tokens.list() == []


def forge(identity: Identity, **changes: object) -> str:
    """A token signed with the real key, whose claims are those of a real one, changed."""
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=600)
    claims = jwt.decode(
        issued.token,
        SIGNING_KEY,
        algorithms=["HS256"],
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    return jwt.encode({**claims, **changes}, SIGNING_KEY, algorithm="HS256")


def refusal(identity: Identity, token: str) -> AuthError:
    with pytest.raises(AuthError) as caught:
        identity.authenticator.authenticate({"Authorization": f"Bearer {token}"}, "127.0.0.1")
    return caught.value


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["2099-01-01", True, [1]])
def test_time_claims_that_are_not_numbers_are_refused(
    identity: Identity, claim: str, value: object
) -> None:
    error = refusal(identity, forge(identity, **{claim: value}))
    assert error.code == "invalid_token"
    assert str(error) == "The access token's time claims are malformed."


@pytest.mark.parametrize("claim", ["jti", "sub", "scope"])
@pytest.mark.parametrize("value", [12345678, ["chat"]])
def test_identity_claims_that_are_not_strings_are_refused(
    identity: Identity, claim: str, value: object
) -> None:
    error = refusal(identity, forge(identity, **{claim: value}))
    assert error.code == "invalid_token"
    if claim == "scope":  # PyJWT itself checks that jti and sub are strings
        assert str(error) == "The access token's claims are malformed."


def test_many_distinct_tokens_keep_verifying_as_the_cache_turns_over(
    identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens_module, "_CACHE_LIMIT", 2)
    issued = [identity.tokens.issue(name=f"t{i}", scopes=CHAT, ttl=600) for i in range(5)]
    for _ in range(2):
        for one in issued:
            assert str(identity.tokens.verify(one.token).credential) == f"token:{one.record.jti}"
    identity.tokens.revoke(issued[0].record.jti)
    with pytest.raises(AuthError) as caught:
        identity.tokens.verify(issued[0].token)
    assert caught.value.code == "token_revoked"


def test_revoking_needs_six_characters_of_one_existing_token(
    identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two tokens whose IDs share their first six characters, as random IDs eventually will.
    counter = itertools.count()
    monkeypatch.setattr("secrets.token_hex", lambda n: f"abcdef{next(counter):0{2 * n - 6}x}")
    first = identity.tokens.issue(name="a", scopes=CHAT, ttl=600)
    second = identity.tokens.issue(name="b", scopes=CHAT, ttl=600)
    with pytest.raises(ValueError, match=r"^give at least 6 characters of the token ID$"):
        identity.tokens.revoke("abcde")
    with pytest.raises(LookupError, match="no token with ID '123456'"):
        identity.tokens.revoke("123456")
    with pytest.raises(LookupError, match="matches 2 tokens; give more of the ID"):
        identity.tokens.revoke("abcdef")
    assert all(r.revoked is None for r in identity.tokens.list())
    assert identity.tokens.revoke(second.record.jti).jti == second.record.jti
    assert identity.tokens.is_active(first.record.jti)
    assert not identity.tokens.is_active(second.record.jti)


@pytest.mark.parametrize("pattern", ["%%%%%%", "______", "%_%_%_", "a%%%%%", "\\%%%%%"])
def test_a_revoke_prefix_is_matched_as_text_never_as_a_pattern(
    identity: Identity, pattern: str
) -> None:
    issued = identity.tokens.issue(name="only", scopes=CHAT, ttl=600)
    with pytest.raises(LookupError, match="no token with ID"):
        identity.tokens.revoke(pattern)
    assert identity.tokens.verify(issued.token).name == f"token:{issued.record.jti}"


def _clock(identity: Identity) -> FakeClock:
    clock = identity.tokens._clock
    assert isinstance(clock, FakeClock)
    return clock


@pytest.mark.parametrize(("past", "verifies"), [(3.0, True), (6.0, False)])
def test_a_token_that_just_expired_is_forgiven_within_the_leeway(
    identity: Identity, past: float, verifies: bool
) -> None:
    issued = identity.tokens.issue(name="t", scopes=CHAT, ttl=60)
    _clock(identity).advance(60 + past)
    if verifies:
        assert identity.tokens.verify(issued.token).credential is not None
    else:
        assert refusal(identity, issued.token).code == "token_expired"


def test_the_verified_token_cache_stays_bounded(identity: Identity) -> None:
    # Every valid token a client presents is cached until it expires; a client holding many
    # (or one minting them with the admin scope) must not grow this process without bound.
    # The real limit, not a patched one: the mutant this kills is an unbounded limit.
    tokens = identity.tokens
    issued = [tokens.issue(name=f"t{i}", scopes=CHAT, ttl=600) for i in range(10_001)]
    for one in issued:
        assert str(tokens.verify(one.token).credential) == f"token:{one.record.jti}"
    assert 0 < len(tokens._cache) <= 10_000
    # A token verified after the cache turned over is remembered again, and still verifies.
    assert str(tokens.verify(issued[0].token).credential) == f"token:{issued[0].record.jti}"
    assert issued[0].token in tokens._cache
