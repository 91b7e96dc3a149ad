"""The authenticator's edges: dev mode's X-User-Id must be a short printable name, and paired
devices stay held to the current allowlist however many of them there are."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes import FakeClock
from tests.unit.identity.conftest import SIGNING_KEY, IdentityMaker
from tray_app.config.settings import Config
from tray_app.control.assembly import open_identity
from tray_app.errors import AuthError
from tray_app.identity import tokens as tokens_module

LOCAL = {"Host": "localhost:8787"}


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
