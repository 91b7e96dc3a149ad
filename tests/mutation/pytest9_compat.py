"""mutmut 3.8's stats phase reads ``item._nodeid``, which pytest 9 renamed away (the node id
is now only the ``nodeid`` property). Loaded into mutmut's runs only, by tests/mutation/run.py."""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item._nodeid = item.nodeid  # type: ignore[attr-defined]
