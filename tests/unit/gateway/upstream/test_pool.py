"""The upstream pool's choice and health bookkeeping, without sockets (the choice has no I/O)."""

from __future__ import annotations

import pytest

from tests.fakes import FakeClock
from tray_app.gateway.upstream.pool import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    HEALTHY_PROBE_INTERVAL,
    UpstreamPool,
    UpstreamSpec,
)


def pool(*specs: UpstreamSpec, clock: FakeClock | None = None) -> UpstreamPool:
    return UpstreamPool(specs, clock or FakeClock())


def spec(name: str, weight: int = 1, *, enabled: bool = True) -> UpstreamSpec:
    return UpstreamSpec(name, f"http://127.0.0.1:1/{name}", weight, enabled)


def chosen(p: UpstreamPool, model: str | None, **kwargs: str) -> str | None:
    found = p.choose(model, **kwargs)
    return None if found is None else found.name


class TestConstruction:
    def test_needs_one_upstream(self) -> None:
        with pytest.raises(ValueError, match="at least one"):
            pool()

    def test_names_are_unique(self) -> None:
        with pytest.raises(ValueError, match="'a'"):
            pool(spec("a"), spec("a"))

    def test_iterates_in_configured_order(self) -> None:
        p = pool(spec("b"), spec("a"), spec("c"))
        assert [u.name for u in p] == ["b", "a", "c"]
        assert len(p) == 3
        assert p.get("a") is not None and p.get("zz") is None


class TestOneUpstream:
    def test_unknown_models_are_asked_anyway(self) -> None:
        p = pool(spec("only"))
        assert chosen(p, "m") == "only"
        assert chosen(p, None) == "only"

    def test_asked_even_when_down_or_lacking_the_model(self) -> None:
        p = pool(spec("only"))
        p.answered("only", models=["a"])
        assert chosen(p, "b") == "only"  # its own 404 says it in LM Studio's words
        p.failed("only", "refused")
        assert chosen(p, "a") == "only"  # it may be back; its own error says if not

    def test_disabled_goes_nowhere(self) -> None:
        assert chosen(pool(spec("only", enabled=False)), "m") is None

    def test_no_retry_on_the_same(self) -> None:
        assert chosen(pool(spec("only")), "m", avoid="only") is None


class TestChoice:
    def test_only_those_with_the_model(self) -> None:
        p = pool(spec("a"), spec("b"))
        p.answered("a", models=["x"])
        p.answered("b", models=["y"])
        assert chosen(p, "y") == "b"
        assert chosen(p, "x") == "a"
        assert chosen(p, "z") is None

    def test_one_not_probed_yet_is_asked_only_when_no_known_one_has_the_model(self) -> None:
        p = pool(spec("early", weight=9), spec("known"))
        p.answered("known", models=["x"])
        assert chosen(p, "x") == "known"  # despite early's weight: it may not have x
        assert chosen(p, "y") == "early"  # nobody known has y: early may
        p.answered("early", models=["z"])
        assert chosen(p, "y") is None

    def test_loaded_first(self) -> None:
        p = pool(spec("a", weight=5), spec("b"))
        p.answered("a", models=["x"], loaded=[])
        p.answered("b", models=["x"], loaded=["x"])
        assert chosen(p, "x") == "b"

    def test_loaded_beats_less_busy(self) -> None:
        p = pool(spec("a"), spec("b"))
        p.answered("a", models=["x"], loaded=[])
        p.answered("b", models=["x"], loaded=["x"])
        b = p.get("b")
        assert b is not None
        for _ in range(3):
            p.started(b)
        assert chosen(p, "x") == "b"

    def test_least_busy_then_weight_then_order(self) -> None:
        p = pool(spec("a"), spec("b", weight=3), spec("c", weight=3))
        assert chosen(p, "x") == "b"  # equal load: the heavier, the first of equals
        b = p.get("b")
        assert b is not None
        p.started(b)
        assert chosen(p, "x") == "c"
        c = p.get("c")
        assert c is not None
        p.started(c)
        assert chosen(p, "x") == "a"  # idle beats heavy
        p.ended(b)
        assert chosen(p, "x") == "b"
        assert b.in_flight == 0

    def test_loaded_unknown_prefers_nothing(self) -> None:
        p = pool(spec("a"), spec("b", weight=2))
        p.answered("a", models=["x"], loaded=None)
        p.answered("b", models=["x"], loaded=None)
        assert chosen(p, "x") == "b"

    def test_sticky_kept_while_it_qualifies(self) -> None:
        p = pool(spec("a", weight=9), spec("b"))
        assert chosen(p, "x", sticky="b") == "b"
        p.answered("b", models=["y"])
        assert chosen(p, "x", sticky="b") == "a"  # it lost the model
        p.failed("a", "refused")
        p.answered("b", models=["x"])
        assert chosen(p, "x", sticky="a") == "b"  # it is down
        assert chosen(p, "x", sticky="gone") == "b"  # removed from the configuration

    def test_avoid_beats_sticky(self) -> None:
        p = pool(spec("a"), spec("b"))
        assert chosen(p, "x", sticky="a", avoid="a") == "b"
        assert chosen(p, "x", avoid="b") == "a"

    def test_down_and_disabled_skipped(self) -> None:
        p = pool(spec("a", weight=5), spec("b", enabled=False), spec("c"))
        p.failed("a", "refused")
        assert chosen(p, "x") == "c"
        p.failed("c", "refused")
        assert chosen(p, "x") is None

    def test_no_model_named_any_usable(self) -> None:
        p = pool(spec("a"), spec("b", weight=2))
        p.answered("b", models=["y"], loaded=["y"])
        assert chosen(p, None) == "b"


class TestMayHave:
    def test_a_model_some_enabled_upstream_lists_up_or_down(self) -> None:
        p = pool(spec("a"), spec("b"), spec("off", enabled=False))
        p.answered("a", models=["x"])
        p.answered("b", models=["y"])
        p.answered("off", models=["z"])
        p.failed("b", "refused")
        assert p.may_have("x") and p.may_have("y")  # b is down, yet y is there
        assert not p.may_have("z")  # only a disabled one has it
        assert not p.may_have("typo")

    def test_one_that_never_said_may_have_anything(self) -> None:
        p = pool(spec("a"), spec("b"))
        p.answered("a", models=["x"])
        assert p.may_have("typo")


class TestModels:
    def test_union_of_usable(self) -> None:
        p = pool(spec("a"), spec("b"), spec("c"), spec("d", enabled=False))
        p.answered("a", models=["x", "y"])
        p.answered("b", models=["y", "z"])
        p.answered("c", models=["w"])
        p.failed("c", "refused")
        assert p.models() == {"x", "y", "z"}

    def test_unknown_lists_add_nothing(self) -> None:
        assert pool(spec("a")).models() == frozenset()

    def test_answer_without_list_keeps_the_last(self) -> None:
        p = pool(spec("a"))
        p.answered("a", models=["x"], loaded=["x"])
        p.answered("a", models=None)
        only = p.get("a")
        assert only is not None
        assert only.models == frozenset({"x"}) and only.loaded == frozenset({"x"})


class TestHealth:
    def test_backoff_doubles_up_to_its_cap(self) -> None:
        clock = FakeClock()
        p = pool(spec("a"), clock=clock)
        a = p.get("a")
        assert a is not None
        waits = []
        for _ in range(10):
            p.failed("a", "refused")
            waits.append(a.next_probe - clock.monotonic())
        assert waits[:3] == [BACKOFF_FIRST, 2 * BACKOFF_FIRST, 4 * BACKOFF_FIRST]
        assert max(waits) == BACKOFF_MAX
        assert a.down_reason == "refused" and a.failures == 10

    def test_a_request_s_suspicion_takes_it_out_but_only_probes_grow_the_backoff(
        self,
    ) -> None:
        clock = FakeClock()
        p = pool(spec("a"), clock=clock)
        a = p.get("a")
        assert a is not None
        for _ in range(8):  # a burst of requests refused at once
            p.suspect("a", "refused")
        assert (a.up, a.failures, a.next_probe) == (False, 1, clock.monotonic() + BACKOFF_FIRST)
        p.failed("a", "refused again")  # the probe after the backoff
        assert (a.failures, a.next_probe) == (2, clock.monotonic() + 2 * BACKOFF_FIRST)
        p.suspect("nobody", "refused")  # an unknown name changes nothing

    def test_one_answer_puts_it_back(self) -> None:
        clock = FakeClock()
        p = pool(spec("a"), spec("b"), clock=clock)
        p.failed("a", "refused")
        p.failed("a", "refused")
        assert chosen(p, "x", avoid="b") is None
        p.answered("a", models=["x"])
        a = p.get("a")
        assert a is not None
        assert a.up and a.failures == 0 and a.down_reason is None
        assert a.next_probe == clock.monotonic() + HEALTHY_PROBE_INTERVAL
        assert chosen(p, "x", avoid="b") == "a"

    def test_due_and_next_due(self) -> None:
        clock = FakeClock()
        p = pool(spec("a"), spec("b"), spec("c", enabled=False), clock=clock)
        assert {u.name for u in p.due()} == {"a", "b"}  # never probed
        p.answered("a", models=[])
        p.failed("b", "refused")
        assert p.due() == []
        assert p.next_due_in() == BACKOFF_FIRST
        clock.advance(BACKOFF_FIRST)
        assert [u.name for u in p.due()] == ["b"]
        assert p.next_due_in() == 0.0

    def test_next_due_with_nothing_enabled(self) -> None:
        p = pool(spec("a", enabled=False))
        assert p.due() == []
        assert p.next_due_in() == HEALTHY_PROBE_INTERVAL

    def test_unknown_names_are_ignored(self) -> None:
        p = pool(spec("a"))
        p.failed("gone", "refused")
        p.answered("gone", models=["x"])
        assert [v.state for v in p.views()] == ["starting"]


class TestViews:
    def test_states_in_words(self) -> None:
        p = pool(spec("a"), spec("b"), spec("c"), spec("d", enabled=False))
        p.answered("a", models=["y", "x"], loaded=["x"])
        p.failed("b", "connection refused")
        views = {v.name: v for v in p.views()}
        assert {n: v.state for n, v in views.items()} == {
            "a": "up",
            "b": "down",
            "c": "starting",
            "d": "disabled",
        }
        assert views["a"].models == ("x", "y") and views["a"].loaded == ("x",)
        assert views["b"].down_reason == "connection refused"
        assert views["c"].models == () and views["c"].url == "http://127.0.0.1:1/c"
