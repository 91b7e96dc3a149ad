"""Path normalisation and route resolution: the pure part of default-deny, attacked with
hypothesis through real sockets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import CLIENT_KEY, LMSTUDIO_TOKEN
from tests.fake_lmstudio import FakeLMStudio
from tests.fakes import StaticKeyAuthenticator
from tests.helpers import raw_request_sync
from tray_app.config.settings import Config
from tray_app.control.loop_thread import LoopThread
from tray_app.gateway.app import Gateway
from tray_app.gateway.routes import (
    FORWARDED_ROUTES,
    EndpointTable,
    Part,
    fold_path,
    normalise_path,
)
from tray_app.gateway.server.runner import GatewayServer
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/v1/models", "/v1/models"),
        ("//v1///models//", "/v1/models"),
        ("/v1/./models", "/v1/models"),
        ("/v1/x/../models", "/v1/models"),
        ("/v1/models?q=1#frag", "/v1/models"),
        ("/%76%31/models", "/v1/models"),
        ("/v1/%2e%2e/api", "/api"),
        ("/", "/"),
        ("/..", None),
        ("/v1/../../api", None),
        ("v1/models", None),
        ("http://evil/v1/models", None),
        ("/v1%2fmodels", None),
        ("/v1%2Fmodels", None),
        ("/v1%5cmodels", None),
        ("/v1\\models", None),
        ("/v1/%25%32%66", None),
        ("/v1/models%00", None),
        ("/v1/models%0a", None),
        ("/%ff", None),
    ],
)
def test_normalise_path(raw: str, expected: str | None) -> None:
    assert normalise_path(raw) == expected


@settings(max_examples=500)
@given(st.text(alphabet="/._-%aZ09\\\n", max_size=24))
def test_the_plain_path_shortcut_agrees_with_the_full_rules(path: str) -> None:
    # normalise_path skips decoding and folding for plain paths; it must never disagree.
    assert normalise_path(path) == fold_path(path)


def test_route_table_keeps_opt_in_routes_off_by_default() -> None:
    table = EndpointTable()
    assert set(table.routes) == {
        "/v1/models",
        "/v1/models/{model}",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    }
    assert table.find("/v1/responses") is None
    refusal = table.refusal("/v1/responses")
    assert refusal.code == "route_disabled" and "routes.enable_responses" in refusal.message
    on = EndpointTable(frozenset({"routes.enable_responses", "routes.enable_messages"}))
    for path in ("/v1/responses", "/v1/messages"):
        found = on.find(path)
        assert found is not None and found.route is not None and found.route.path == path


def test_the_forwarded_list_in_errors_is_what_this_gateway_forwards() -> None:
    # It once listed only the always-on routes, also where the opt-in ones were on.
    plain = EndpointTable().refusal("/v2/nothing").message
    assert plain.endswith(
        "forwards only: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, "
        "POST /v1/embeddings, GET /v1/models/{model}."
    )
    on = EndpointTable(frozenset({"routes.enable_responses"})).refusal("/api/v0/models")
    assert on.code == "path_not_allowed"
    assert on.message.endswith("POST /v1/embeddings, POST /v1/responses, GET /v1/models/{model}.")


def test_a_part_the_gateway_lacks_serves_nothing() -> None:
    table = EndpointTable(parts={Part.HEALTH, Part.LM_STUDIO})
    assert table.find("/healthz") is not None and table.find("/v1/models") is not None
    for path in ("/readyz", "/metrics", "/pair", "/", "/api/chat", "/api/conversations/x"):
        assert table.find(path) is None, path


def test_the_conversation_prefix_answers_exactly_one_segment() -> None:
    table = EndpointTable()
    found = table.find("/api/conversations/abc")
    assert found is not None and found.allow == "GET, DELETE"
    for path in ("/api/conversations/a/b", "/api/conversationsabc", "/api/conversations/"):
        assert table.find(path) is None, path
    page = table.find("/")
    assert page is not None and page.path == "/", "the phone page is one path, not a prefix"
    assert table.find("/abc") is None
    assert table.find(None) is None
    assert table.refusal(None).code == "path_not_allowed"


# Pieces attackers combine to reach /api/* or other paths.
PIECES = [
    "api",
    "v1",
    "v0",
    "models",
    "load",
    "unload",
    "download",
    "chat",
    "completions",
    "embeddings",
    "..",
    ".",
    "",
    "%2e%2e",
    "%2E",
    "%2f",
    "%2F",
    "%252f",
    "%5c",
    "\\",
    "API",
    "V1",
    "%61pi",
    ";",
    "%00",
    "%20",
    "?",
    "#",
    "%3f",
    "responses",
    "messages",
    "%u002e",
    "%c0%af",
    "%",
    "~",
    "system",
    "llm",
]
ALLOWED_UPSTREAM = {r.path for r in FORWARDED_ROUTES if r.option is None}


@pytest.fixture(scope="module")
def live_gateway() -> Iterator[tuple[GatewayServer, FakeLMStudio]]:
    thread = LoopThread()
    thread.start()
    fake = FakeLMStudio()
    thread.submit(fake.start()).result(5)
    config = Config(upstream_url=fake.url, server_port=0, streaming_heartbeat_interval=0)
    server = GatewayServer(
        Gateway(
            config,
            StaticKeyAuthenticator(CLIENT_KEY),
            secrets=MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN}),
        )
    )
    thread.submit(server.start()).result(5)
    yield server, fake
    thread.submit(server.stop()).result(10)
    thread.submit(fake.stop()).result(5)
    thread.stop()


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    segments=st.lists(st.sampled_from(PIECES), min_size=1, max_size=8),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    slashes=st.sampled_from(["/", "//"]),
)
def test_generated_paths_only_ever_reach_allowed_endpoints(
    live_gateway: tuple[GatewayServer, FakeLMStudio], segments: list[str], method: str, slashes: str
) -> None:
    server, fake = live_gateway
    target = "/" + slashes.join(segments)
    before = len(fake.received)
    body = b'{"model": "m", "input": "x"}' if method != "GET" else b""
    response = raw_request_sync(
        server.port or 0,
        method,
        target,
        {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"},
        body,
    )
    assert response.status < 500 or response.status == 502
    new = fake.received[before:]
    for received in new:
        assert received.path in ALLOWED_UPSTREAM, (target, received.path)
    if new:
        assert normalise_path(target) in ALLOWED_UPSTREAM
    else:
        assert response.status in {400, 404, 405}, (target, response.status)
