"""The private Docker engine and LM Gate's image, shared by the Docker tests (test_docker.py,
test_team_compose.py): each module gets an engine of its own, started once for its tests."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.docker_engine import Engine, missing_tools, prepared, running_engine
from tests.helpers import REPO_ROOT

IMAGE = "lmgate:test"


def docker_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the Docker tests run dockerd and a network namespace, which need root"
    if missing := missing_tools():
        return f"missing {', '.join(missing)} (tests/run.sh installs them)"
    if not prepared():
        return "the base filesystem and wheels are not made yet: run tests/docker_prepare.sh"
    return None


def skip_or_fail(reason: str) -> None:
    """Skipped where Docker cannot run; a failure where it must (LMGATE_REQUIRE_DOCKER, CI)."""
    if os.environ.get("LMGATE_REQUIRE_DOCKER"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    reason = docker_unavailable()
    if reason is not None:
        skip_or_fail(reason)
    with running_engine() as running:
        yield running


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    started = time.monotonic()
    engine.docker(
        "build", "-q", "-f", "packaging/Dockerfile", "-t", IMAGE, str(REPO_ROOT), timeout=600
    )
    print(f"image built in {time.monotonic() - started:.1f} s")
    return IMAGE
