"""The collector settings a long-running process takes once started (tray_app/garbage.py)."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Iterator

import pytest

from tray_app.garbage import YOUNGEST_THRESHOLD, settle_after_start
from tray_app.logs import skip_unused_record_fields


@pytest.fixture
def restored_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_settling_freezes_what_exists_and_collects_the_young_less_often(
    restored_collector: None,
) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    _, middle, oldest = gc.get_threshold()
    settle_after_start()
    # What the imports made is out of every later collection...
    assert gc.get_freeze_count() > 10_000
    # ...and the older generations keep their own thresholds.
    assert gc.get_threshold() == (YOUNGEST_THRESHOLD, middle, oldest)


def test_settling_frees_start_up_garbage_instead_of_freezing_it(
    restored_collector: None,
) -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    gc.disable()
    try:
        made = Cycle()
        alive = weakref.ref(made)
        del made
        assert alive() is not None  # a cycle: only the collector frees it
        settle_after_start()
        assert alive() is None, "a dead cycle was frozen instead of freed"
    finally:
        gc.enable()


def test_the_tray_keeps_pythons_young_threshold(restored_collector: None) -> None:
    before = gc.get_threshold()
    settle_after_start(rarer_young_collections=False)
    assert gc.get_freeze_count() > 10_000
    assert gc.get_threshold() == before


def test_log_records_skip_only_fields_no_formatter_prints() -> None:
    saved = (
        logging._srcfile,
        logging.logThreads,
        logging.logProcesses,
        logging.logMultiprocessing,
    )
    try:
        skip_unused_record_fields()
        record = logging.getLogger("lmgate.test").makeRecord(
            "lmgate.test", logging.INFO, "f.py", 1, "hello", (), None
        )
        assert (record.thread, record.process) == (None, None)
        assert logging._srcfile is None
    finally:
        (
            logging._srcfile,
            logging.logThreads,
            logging.logProcesses,
            logging.logMultiprocessing,
        ) = saved
