"""A stored upstream token goes only where its binding says, and a binding that cannot be
read or was not written by LM Gate sends nothing (the review of issue 18's fixes)."""

from __future__ import annotations

from pathlib import Path

from tray_app.config.upstreams import UpstreamEntry
from tray_app.control.upstream_changes import add_with_token, remove_with_token
from tray_app.errors import SecretStoreError
from tray_app.secret_store.base import MemorySecretStore
from tray_app.secret_store.upstream_tokens import bind_token, binding_name, read_token

DESK = "http://192.0.2.10:1234"
ELSEWHERE = "http://192.0.2.99:1234"


class UnreadableBindings(MemorySecretStore):
    """A store whose binding entries cannot be read (a keyring that fails for them)."""

    def get(self, name: str) -> str | None:
        if name.startswith("upstream-server-"):
            raise SecretStoreError("the keyring said no")
        return super().get(name)


class UndeletableTokens(MemorySecretStore):
    """A store that cannot delete upstream tokens (a keyring whose delete fails)."""

    def delete(self, name: str) -> None:
        if name.startswith("upstream-token-"):
            raise SecretStoreError("the keyring said no")
        super().delete(name)


def test_a_binding_that_cannot_be_read_sends_nothing() -> None:
    store = UnreadableBindings({"upstream-token-desk": "sk-desk"})
    read = read_token(store, "desk", ELSEWHERE)
    assert read.token is None
    assert read.refused is not None and "cannot be read" in read.refused
    assert "lmgate secret set upstream-token-desk" in read.refused


def test_a_binding_lm_gate_did_not_write_sends_nothing() -> None:
    for written in ("nonsense", f"{DESK}", f"{DESK} short", " 0123456789abcdef"):
        store = MemorySecretStore({"upstream-token-desk": "sk-desk", binding_name("desk"): written})
        read = read_token(store, "desk", DESK)
        assert read.token is None, written
        assert read.refused is not None and "not a binding LM Gate wrote" in read.refused
        assert store.get(binding_name("desk")) == written  # not silently rebound


def test_a_bound_token_goes_to_its_server_only() -> None:
    store = MemorySecretStore({"upstream-token-desk": "sk-desk"})
    bind_token(store, "desk", DESK, "sk-desk")
    assert read_token(store, "desk", DESK).token == "sk-desk"
    moved = read_token(store, "desk", ELSEWHERE)
    assert moved.token is None and moved.refused is not None


def test_a_token_that_cannot_be_deleted_keeps_its_binding(tmp_path: Path) -> None:
    # Its binding gone, the token left behind would be bound to the next server given the
    # name, and sent there.
    config = tmp_path / "lmgate.toml"
    config.write_text("")
    store = UndeletableTokens()
    add_with_token(config, UpstreamEntry("desk", DESK), (), store, "sk-desk")
    remove_with_token(config, "desk", store)
    assert store.get("upstream-token-desk") == "sk-desk"
    assert store.get(binding_name("desk")) is not None
    assert read_token(store, "desk", ELSEWHERE).token is None
