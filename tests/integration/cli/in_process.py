"""Running the CLI in this process, as the installed command calls it, on a real database in a
temporary directory: the `lmgate` and `db` fixtures (tests/integration/cli/conftest.py) and
what reads a new credential's ID back from what the CLI printed."""

from __future__ import annotations

import re
from collections.abc import Callable

# (exit code, stdout, stderr) of one `lmgate ...` run.
Run = Callable[..., tuple[int, str, str]]


def key_id(out: str, err: str) -> str:
    found = re.search(r"API key ([0-9a-f]{12}) for", err)
    assert found, err
    return found.group(1)


def token_jti(err: str) -> str:
    found = re.search(r"Token ([0-9a-f]{24}) for", err)
    assert found, err
    return found.group(1)
