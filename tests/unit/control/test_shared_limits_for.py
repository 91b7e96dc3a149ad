"""Which limits a gateway is built with: this process's on one machine, the replicas' Redis in
a team's gateway (its URL a secret, said when missing; the `team` extra named when absent)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tray_app.config.parsers import StateBackend
from tray_app.config.settings import Config
from tray_app.control.assembly import shared_limits_for
from tray_app.errors import SecretStoreError
from tray_app.gateway.shared_limits import SharedLimits
from tray_app.secret_store.base import STATE_REDIS_URL, MemorySecretStore

TEAM = Config(state_backend=StateBackend.POSTGRES)


def test_one_machine_counts_in_this_process() -> None:
    store = MemorySecretStore({STATE_REDIS_URL: "redis://127.0.0.1:6379/0"})
    assert shared_limits_for(Config(), store) is None  # a stray URL changes nothing


def test_a_replica_counts_in_the_redis_its_secret_names() -> None:
    limits = shared_limits_for(TEAM, MemorySecretStore({STATE_REDIS_URL: "redis://127.0.0.1:1/0"}))
    assert isinstance(limits, SharedLimits)
    assert limits.lease_seconds == TEAM.state_lease_seconds


def test_a_replica_without_the_redis_url_says_how_to_set_it() -> None:
    with pytest.raises(SecretStoreError) as caught:
        shared_limits_for(TEAM, MemorySecretStore())
    assert f"lmgate secret set {STATE_REDIS_URL}" in str(caught.value)


_WITHOUT_REDIS = """
import sys
sys.modules["redis"] = None
from tray_app.config.parsers import StateBackend
from tray_app.config.settings import Config
from tray_app.control.assembly import shared_limits_for
from tray_app.errors import StorageError
from tray_app.secret_store.base import STATE_REDIS_URL, MemorySecretStore
store = MemorySecretStore({STATE_REDIS_URL: "redis://127.0.0.1:1/0"})
assert shared_limits_for(Config(), store) is None
try:
    shared_limits_for(Config(state_backend=StateBackend.POSTGRES), store)
except StorageError as exc:
    print(exc)
"""


def test_a_replica_without_the_team_extra_names_it() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_REDIS], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'lmgate[team]'" in result.stdout
