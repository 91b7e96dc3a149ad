"""Pairing: a code made for a named device names it, whatever the phone calls itself; the
device's principal is the one its token speaks for; unknown devices cannot be revoked."""

from __future__ import annotations

import pytest

from tray_app.control.assembly import Identity


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
