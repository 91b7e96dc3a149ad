"""Random credentials and headers against the auth layer: only 401/403, never a 5xx."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import LMSTUDIO_TOKEN
from tests.fake_lmstudio import FakeLMStudio
from tests.helpers import raw_request_sync
from tray_app.config.settings import Config
from tray_app.control.assembly import build_gateway, open_identity
from tray_app.control.loop_thread import LoopThread
from tray_app.gateway.server.runner import GatewayServer
from tray_app.identity.signing_key import load_or_create_signing_key
from tray_app.secret_store.base import LMSTUDIO_API_TOKEN, MemorySecretStore


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, FakeLMStudio]]:
    thread = LoopThread()
    thread.start()
    fake = FakeLMStudio()
    thread.submit(fake.start()).result(5)
    config = Config(
        upstream_url=fake.url,
        server_port=0,
        streaming_heartbeat_interval=0,
        limits_auth_failures_per_minute=100_000,
        storage_data_dir=str(tmp_path_factory.mktemp("fuzz")),
    )
    store = MemorySecretStore({LMSTUDIO_API_TOKEN: LMSTUDIO_TOKEN})
    identity = open_identity(config, load_or_create_signing_key(store))
    identity.tokens.issue(name="real", scopes=frozenset({"models"}), ttl=3600)
    server = GatewayServer(build_gateway(config, identity, store))
    thread.submit(server.start()).result(5)
    assert server.port is not None
    yield server.port, fake
    thread.submit(server.stop()).result(10)
    thread.submit(fake.stop()).result(5)
    thread.stop()
    identity.close()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def jwt_like(draw: st.DrawFn) -> str:
    header = draw(
        st.dictionaries(
            st.sampled_from(["alg", "typ", "kid", "jku", "x5u"]),
            st.sampled_from(["none", "HS256", "HS512", "RS256", "ES256", "JWT", "", "../../key"]),
            max_size=3,
        )
    )
    claims = draw(
        st.dictionaries(
            st.sampled_from(["sub", "scope", "iat", "nbf", "exp", "jti", "models", "max_tokens"]),
            json_values,
            max_size=8,
        )
    )
    signature = draw(st.binary(max_size=64))
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)]
    )


credentials = st.one_of(
    header_text,
    jwt_like(),
    st.builds(lambda s: "lmg_" + s, header_text),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    credential=credentials,
    scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", "", "Bearer  ", "Token "]),
    where=st.sampled_from(["authorization", "x-api-key", "both"]),
    extra=st.dictionaries(
        st.sampled_from(["X-User-Id", "X-Forwarded-For", "Origin", "Cookie", "X-Request-ID"]),
        header_text,
        max_size=3,
    ),
)
def test_random_credentials_get_only_401_or_403(
    live: tuple[int, FakeLMStudio], credential: str, scheme: str, where: str, extra: dict[str, str]
) -> None:
    port, fake = live
    headers = dict(extra)
    headers.pop("Origin", None)  # a foreign Origin is a 403 for other reasons; tested elsewhere
    if where in {"authorization", "both"}:
        headers["Authorization"] = (scheme + credential).strip()
    if where in {"x-api-key", "both"}:
        headers["X-API-Key"] = credential
    try:
        response = raw_request_sync(port, "GET", "/v1/models", headers)
    except ValueError:
        return  # a header our raw client cannot even frame
    assert response.status in {400, 401, 403}, (response.status, response.body[:200])
    if response.status != 400:  # 400 is aiohttp refusing a malformed header line
        error = response.json()["error"]
        assert error["type"] in {"authentication_error", "permission_error"}
    assert all(r.path == "/v1/models" for r in fake.received)
    assert not fake.received, "nothing unauthenticated may reach LM Studio"
