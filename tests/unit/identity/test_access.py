"""The access policy as the credentials it shapes live it: what each kind of credential the
tray hands out may do, and which allowlist holds it after the setting changes (paired devices
and curl snippets follow today's, app keys and CLI tokens keep their own)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from tests.unit.identity.conftest import SIGNING_KEY
from tray_app.cli.main import main
from tray_app.config.parsers import SecretStoreKind
from tray_app.config.settings import Config
from tray_app.control.assembly import Identity, open_identity, secret_store_for
from tray_app.identity.access import DEVICE_SCOPES, AccessPolicy, Grant, budget_from_settings
from tray_app.identity.principal import (
    ALL_SCOPES,
    SCOPE_CHAT,
    SCOPE_EMBEDDINGS,
    SCOPE_MODELS,
    Budget,
    CredentialKind,
    Principal,
)
from tray_app.identity.signing_key import load_or_create_signing_key

# Opens the identity layer on one data directory with the allowlist setting given.
Opener = Callable[[tuple[str, ...]], Identity]


@pytest.fixture
def reopen(tmp_path: Path) -> Iterator[Opener]:
    opened: list[Identity] = []

    def open_with(allowed: tuple[str, ...]) -> Identity:
        config = Config(storage_data_dir=str(tmp_path / "data"), auth_allowed_models=allowed)
        identity = open_identity(config, SIGNING_KEY, clock=FakeClock())
        opened.append(identity)
        return identity

    yield open_with
    for identity in opened:
        identity.close()


def _bearer(identity: Identity, credential: str) -> Principal:
    return identity.authenticator.authenticate(
        {"Authorization": f"Bearer {credential}"}, "127.0.0.1"
    )


def _device(identity: Identity) -> str:
    code, _ = identity.pairing.create_code()
    return identity.pairing.exchange(code, "phone").token


def _snippet(identity: Identity) -> str:
    grant = identity.access.for_snippet()
    return identity.tokens.issue(
        name="curl snippet",
        kind=CredentialKind.SNIPPET,
        scopes=grant.scopes,
        ttl=3600.0,
        models=grant.models,
        budget=grant.budget,
    ).token


def _app_key(identity: Identity) -> str:
    grant = identity.access.for_app_key()
    key, _ = identity.api_keys.create(
        "app settings", scopes=grant.scopes, models=grant.models, budget=grant.budget
    )
    return key


MAKERS: dict[str, Callable[[Identity], str]] = {
    "device": _device,
    "snippet": _snippet,
    "app key": _app_key,
}

# What each is for: a phone chats and picks a model; a copied curl line only chats; an app
# (an OpenAI SDK) also embeds. None of them reads the operator's metrics.
MAY = {
    "device": {SCOPE_CHAT, SCOPE_MODELS},
    "snippet": {SCOPE_CHAT},
    "app key": {SCOPE_CHAT, SCOPE_MODELS, SCOPE_EMBEDDINGS},
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("scope", sorted(ALL_SCOPES))
def test_each_credential_the_tray_hands_out_may_do_what_it_is_for_and_nothing_else(
    reopen: Opener, kind: str, scope: str
) -> None:
    identity = reopen(())
    principal = _bearer(identity, MAKERS[kind](identity))
    assert principal.has_scope(scope) == (scope in MAY[kind])


@pytest.mark.parametrize(
    ("kind", "follows"), [("device", True), ("snippet", True), ("app key", False)]
)
@pytest.mark.parametrize(
    ("then", "now"),
    [
        ((), ("small",)),  # narrowed from every model
        (("small",), ("small", "large")),  # widened
        (("small",), ()),  # widened to every model
        (("small", "large"), ("large",)),
    ],
)
def test_devices_and_snippets_follow_the_allowlist_of_today_app_keys_keep_theirs(
    reopen: Opener,
    kind: str,
    follows: bool,
    then: tuple[str, ...],
    now: tuple[str, ...],
) -> None:
    credential = MAKERS[kind](reopen(then))
    principal = _bearer(reopen(now), credential)
    held_to = now if follows else then
    assert principal.models == (frozenset(held_to) or None)
    for model in ("small", "large", "other"):
        assert principal.may_use_model(model) == (not held_to or model in held_to)


@pytest.mark.parametrize("allowed", [(), ("small",)])
def test_a_cli_token_keeps_the_models_it_was_given_whatever_the_allowlist(
    reopen: Opener, allowed: tuple[str, ...]
) -> None:
    for given in (frozenset({"large"}), None):
        token = (
            reopen(("small", "large"))
            .tokens.issue(name="cli", scopes=frozenset({SCOPE_CHAT}), ttl=3600.0, models=given)
            .token
        )
        assert _bearer(reopen(allowed), token).models == given


def test_an_empty_allowlist_is_every_model_and_a_listed_one_only_those(
    reopen: Opener,
) -> None:
    everything = reopen(())
    assert everything.access.allowed_models is None
    assert everything.access.for_device().models is None
    listed = reopen(("b", "a", "a"))
    assert listed.access.allowed_models == frozenset({"a", "b"})
    for grant in (listed.access.for_device(), listed.access.for_snippet()):
        assert grant.models == frozenset({"a", "b"})
    phone = _bearer(listed, _device(listed))
    assert phone.may_use_model("a") and not phone.may_use_model("c")


# ---- what `lmgate token create` and `lmgate key create` grant without --scope --------------

# A CLI token is for a person at a terminal (chat, pick a model); a CLI key is for a script,
# which may embed too. Neither reads the operator's metrics unless --scope says so.
CLI_MAY = {
    "token": {SCOPE_CHAT, SCOPE_MODELS},
    "key": {SCOPE_CHAT, SCOPE_MODELS, SCOPE_EMBEDDINGS},
}


@pytest.mark.parametrize("command", sorted(CLI_MAY))
def test_the_cli_grants_what_each_credential_is_for_when_no_scope_is_given(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    for name in [n for n in os.environ if n.startswith("LMGATE_")]:
        monkeypatch.delenv(name)
    data = tmp_path / "data"
    flags = ["--config", str(tmp_path / "none.toml"), "--data-dir", str(data)]
    assert main([command, "create", "made by hand", *flags, "--secret-store", "file"]) == 0
    credential = capsys.readouterr().out.strip()
    config = Config(storage_data_dir=str(data), secrets_store=SecretStoreKind.FILE)
    key = load_or_create_signing_key(secret_store_for(config))  # a key needs none
    identity = open_identity(config, key)  # the CLI's token was made by the real clock
    try:
        principal = _bearer(identity, credential)
    finally:
        identity.close()
    for scope in ALL_SCOPES:
        assert principal.has_scope(scope) == (scope in CLI_MAY[command]), scope


# ---- budget defaults: devices get the device setting, what the tray copies the copied one ----


@pytest.mark.parametrize(
    ("day", "month", "budget"),
    [(0, 0, Budget()), (5, 0, Budget(5, None)), (0, 6, Budget(None, 6)), (1, 2, Budget(1, 2))],
)
def test_a_setting_of_0_is_no_cap(day: int, month: int, budget: Budget) -> None:
    assert budget_from_settings(day, month) == budget


def test_a_policy_without_budget_defaults_grants_none() -> None:
    for policy in (AccessPolicy(), AccessPolicy.with_allowlist(["m"])):
        for grant in (policy.for_device(), policy.for_snippet(), policy.for_app_key()):
            assert grant.budget == Budget() and not grant.budget.limited
    assert Grant(frozenset({SCOPE_CHAT}), None).budget == Budget()


def test_each_grant_carries_the_default_budget_of_its_kind() -> None:
    policy = AccessPolicy.with_allowlist(["m"]).with_budgets(
        device=Budget(1, 2), copied_key=Budget(3, 4)
    )
    assert policy.for_device() == Grant(DEVICE_SCOPES, frozenset({"m"}), Budget(1, 2))
    assert policy.for_snippet().budget == policy.for_app_key().budget == Budget(3, 4)


@pytest.mark.parametrize(
    ("kind", "budget"),
    [("device", Budget(100, 1000)), ("snippet", Budget(20, 200)), ("app key", Budget(20, 200))],
)
def test_what_the_tray_hands_out_carries_the_configured_default_budget(
    tmp_path: Path, kind: str, budget: Budget
) -> None:
    config = Config(
        storage_data_dir=str(tmp_path / "data"),
        budget_device_tokens_per_day=100,
        budget_device_tokens_per_month=1000,
        budget_copied_key_tokens_per_day=20,
        budget_copied_key_tokens_per_month=200,
    )
    identity = open_identity(config, SIGNING_KEY, clock=FakeClock())
    try:
        assert _bearer(identity, MAKERS[kind](identity)).budget == budget
    finally:
        identity.close()


def test_a_cli_credential_gets_no_default_budget(tmp_path: Path) -> None:
    config = Config(
        storage_data_dir=str(tmp_path / "data"),
        budget_device_tokens_per_day=100,
        budget_copied_key_tokens_per_day=20,
    )
    identity = open_identity(config, SIGNING_KEY, clock=FakeClock())
    try:
        key, _ = identity.api_keys.create("script", scopes=frozenset({SCOPE_CHAT}))
        assert _bearer(identity, key).budget is None
    finally:
        identity.close()
