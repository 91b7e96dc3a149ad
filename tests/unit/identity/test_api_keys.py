"""API keys refused at creation and at revocation, leaving nothing behind."""

from __future__ import annotations

import pytest

from tray_app.control.assembly import Identity

MODELS = frozenset({"models"})


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_a_key_needs_a_name(identity: Identity, name: str) -> None:
    with pytest.raises(ValueError, match="needs a name"):
        identity.api_keys.create(name, scopes=MODELS)
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
