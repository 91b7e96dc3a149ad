"""The single-key authenticator (a test double): a key too short to be one is refused at
start, and a wrong key is an invalid_api_key failure."""

from __future__ import annotations

import pytest

from tests.fakes import MIN_KEY_LENGTH, StaticKeyAuthenticator
from tray_app.errors import AuthError

KEY = "s" * MIN_KEY_LENGTH


def test_a_key_shorter_than_the_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match=f"at least {MIN_KEY_LENGTH} characters"):
        StaticKeyAuthenticator(KEY[:-1])


def test_only_the_key_itself_is_accepted() -> None:
    gate = StaticKeyAuthenticator(KEY, principal_name="me")
    principal = gate.authenticate({"Authorization": f"Bearer {KEY}"}, None)
    assert principal.name == "me" and gate.still_valid(principal)
    for wrong in (KEY[:-1] + "t", KEY + "s", "t" * len(KEY)):
        with pytest.raises(AuthError) as caught:
            gate.authenticate({"X-API-Key": wrong}, None)
        assert caught.value.code == "invalid_api_key"
    with pytest.raises(AuthError) as caught:
        gate.authenticate({}, None)
    assert caught.value.code == "missing_api_key"
