"""The forwarded part of the endpoint table: each LM Studio route under its own path, method,
scope, model requirement and opt-in flag, as the gateway serves it.

The table is built when ``tray_app.gateway.routes`` is imported, before any test runs, so a
test of the already-imported module checks only the table, never the code that builds it
(mutation testing changes that code after the import). These tests build the module afresh
from its source and look at the result through its public API.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from tray_app.identity.principal import SCOPE_CHAT, SCOPE_EMBEDDINGS, SCOPE_MODELS

EVERY_OPTION = frozenset({"routes.enable_responses", "routes.enable_messages"})

# (path, method, scope a key needs, whether the body must name a model, opt-in flag)
FORWARDED = [
    ("/v1/models", "GET", SCOPE_MODELS, False, None),
    ("/v1/chat/completions", "POST", SCOPE_CHAT, True, None),
    ("/v1/completions", "POST", SCOPE_CHAT, True, None),
    ("/v1/embeddings", "POST", SCOPE_EMBEDDINGS, True, None),
    ("/v1/responses", "POST", SCOPE_CHAT, True, "routes.enable_responses"),
    ("/v1/messages", "POST", SCOPE_CHAT, True, "routes.enable_messages"),
]
# Answered by the gateway itself (from LM Studio's model list, or not asking it at all).
LOCAL = [
    ("/v1/models/{model}", "GET", SCOPE_MODELS, False, None),
    ("/v1/messages/count_tokens", "POST", SCOPE_CHAT, True, "routes.enable_messages"),
]
OPT_IN = [row for row in FORWARDED if row[4] is not None]


@pytest.fixture
def routes() -> ModuleType:
    """A fresh copy of the routes module, its table built now (not cached in sys.modules)."""
    spec = importlib.util.find_spec("tray_app.gateway.routes")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("path", "method", "scope", "needs_model", "option"), FORWARDED)
def test_each_forwarded_route_is_served_as_itself(
    routes: ModuleType,
    path: str,
    method: str,
    scope: str,
    needs_model: bool,
    option: str | None,
) -> None:
    table = routes.EndpointTable(EVERY_OPTION)
    endpoint = table.find(path)
    assert endpoint is not None, path
    assert endpoint.path == path
    assert endpoint.methods == (method,)
    assert endpoint.allow == method
    assert endpoint.part is routes.Part.LM_STUDIO
    # The upstream URL is built from route.path: it must be the path the client matched.
    assert endpoint.route == routes.Route(path, method, scope, needs_model, option)
    assert table.routes[path] is endpoint.route


def test_the_forwarded_list_is_exactly_the_lm_studio_routes(routes: ModuleType) -> None:
    assert [
        (r.path, r.method, r.scope, r.needs_model, r.option) for r in routes.FORWARDED_ROUTES
    ] == (FORWARDED)
    every = routes.EndpointTable(EVERY_OPTION)
    # Exact paths first, in table order, then the prefix one.
    listed = [*FORWARDED, LOCAL[1], LOCAL[0]]
    assert every.forwarded_text == ", ".join(f"{m} {p}" for p, m, *_ in listed)


@pytest.mark.parametrize(("path", "method", "scope", "needs_model", "option"), LOCAL)
def test_each_local_route_is_answered_by_the_gateway(
    routes: ModuleType,
    path: str,
    method: str,
    scope: str,
    needs_model: bool,
    option: str | None,
) -> None:
    table = routes.EndpointTable(EVERY_OPTION)
    concrete = path.replace("{model}", "qwen/qwen3-4b")
    endpoint = table.find(concrete)
    assert endpoint is not None, concrete
    assert endpoint.path == path
    assert endpoint.methods == (method,)
    assert endpoint.part is routes.Part.LM_STUDIO
    assert endpoint.route == routes.Route(path, method, scope, needs_model, option, local=True)
    assert endpoint.route not in routes.FORWARDED_ROUTES
    assert table.routes[path] is endpoint.route


def test_count_tokens_is_off_with_messages() -> None:
    from tray_app.gateway.routes import EndpointTable

    off = EndpointTable()
    assert off.find("/v1/messages/count_tokens") is None
    refusal = off.refusal("/v1/messages/count_tokens")
    assert (refusal.status, refusal.code) == (404, "route_disabled")
    assert "routes.enable_messages" in refusal.message
    assert "count_tokens" not in off.forwarded_text
    assert "/v1/messages" not in off.forwarded_text


@pytest.mark.parametrize(("path", "method", "scope", "needs_model", "option"), OPT_IN)
def test_an_opt_in_route_is_refused_by_name_until_its_flag_is_on(
    routes: ModuleType,
    path: str,
    method: str,
    scope: str,
    needs_model: bool,
    option: str,
) -> None:
    off = routes.EndpointTable()
    assert off.find(path) is None
    assert path not in off.routes
    refusal = off.refusal(path)
    assert refusal.code == "route_disabled" and option in refusal.message
    others = EVERY_OPTION - {option}
    assert routes.EndpointTable(others).find(path) is None
    assert routes.EndpointTable(frozenset({option})).find(path) is not None


def test_a_gateway_without_lm_studio_forwards_nothing(routes: ModuleType) -> None:
    parts = set(routes.Part) - {routes.Part.LM_STUDIO}
    table = routes.EndpointTable(EVERY_OPTION, parts)
    assert table.routes == {}
    for path, *_ in FORWARDED:
        assert table.find(path) is None, path
