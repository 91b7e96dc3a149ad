"""Which headers cross the gateway, on their own: every header LM Studio may see, in any
spelling, named hop-by-hop or not; the client's credentials and LM Studio's own CORS, cookies
and connection headers, which never cross; upgrades; and which request ids may be echoed."""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterator, Mapping

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from tray_app.gateway.headers import (
    client_response_headers,
    is_upgrade_request,
    sane_request_id,
    upstream_request_headers,
)

PASSED_UPSTREAM = {
    "Accept": "text/event-stream",
    "Accept-Language": "de",
    "User-Agent": "openai-python/1.0",
    "OpenAI-Beta": "assistants=v2",
    "Anthropic-Version": "2023-06-01",
    "Anthropic-Beta": "tools-2024",
}
KEPT_FROM_UPSTREAM = [
    "Authorization",
    "X-API-Key",
    "Cookie",
    "Origin",
    "Referer",
    "Host",
    "Connection",
    "Keep-Alive",
    "Proxy-Authorization",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
    "Content-Length",
    "Accept-Encoding",
    "X-Forwarded-For",
    "X-Request-ID",
    "X-Unknown",
]
PASSED_TO_CLIENT = {
    "Content-Type": "text/event-stream",
    "Content-Encoding": "gzip",
    "Content-Language": "en",
    "Retry-After": "7",
}
KEPT_FROM_CLIENT = [
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Set-Cookie",
    "Connection",
    "Keep-Alive",
    "Transfer-Encoding",
    "Content-Length",
    "Server",
    "X-Powered-By",
    "WWW-Authenticate",
]
Spelling = Callable[[str], str]
SPELLINGS: list[Spelling] = [str, str.lower, str.upper]


def to_upstream(client: Mapping[str, str], token: str | None = None) -> CIMultiDict[str]:
    return upstream_request_headers(client, request_id="req-1", lmstudio_token=token)


class TestToUpstream:
    @pytest.mark.parametrize("spell", SPELLINGS)
    @pytest.mark.parametrize("name", sorted(PASSED_UPSTREAM))
    def test_a_header_lm_studio_needs_passes_in_any_spelling(
        self, name: str, spell: Spelling
    ) -> None:
        out = to_upstream({spell(name): PASSED_UPSTREAM[name]})
        assert out.getall(name) == [PASSED_UPSTREAM[name]]

    @pytest.mark.parametrize("spell", SPELLINGS)
    @pytest.mark.parametrize("name", KEPT_FROM_UPSTREAM)
    def test_any_other_header_stays_behind(self, name: str, spell: Spelling) -> None:
        out = to_upstream({spell(name): "client-value"})
        assert "client-value" not in out.values()

    @pytest.mark.parametrize("connection", ["Connection", "connection", "CONNECTION"])
    @pytest.mark.parametrize("name", sorted(PASSED_UPSTREAM))
    def test_a_header_the_client_marked_hop_by_hop_stays_behind(
        self, name: str, connection: str
    ) -> None:
        # Listed among others, with spaces and in another case: still this hop's only.
        listed = f"keep-alive , {name.upper()} ,close"
        out = to_upstream({name: PASSED_UPSTREAM[name], connection: listed})
        assert name not in out
        # The others that were not listed still pass.
        others = {n: v for n, v in PASSED_UPSTREAM.items() if n != name}
        out = to_upstream({**others, name: PASSED_UPSTREAM[name], connection: listed})
        assert {n: out[n] for n in others} == others

    def test_a_header_sent_twice_passes_twice(self) -> None:
        client = CIMultiDict([("Accept", "a/b"), ("accept", "c/d")])
        assert to_upstream(client).getall("Accept") == ["a/b", "c/d"]

    def test_the_gateway_sets_its_own_framing_and_id(self) -> None:
        client = {
            "Content-Type": "text/plain",
            "Accept-Encoding": "gzip, br",
            "X-Request-ID": "client-chosen",
        }
        out = upstream_request_headers(client, request_id="req-42", lmstudio_token=None)
        assert out.getall("Content-Type") == ["application/json"]
        # Compressed answers would hide usage from the gateway.
        assert out.getall("Accept-Encoding") == ["identity"]
        assert out.getall("X-Request-ID") == ["req-42"]
        assert "Authorization" not in out

    @pytest.mark.parametrize("token", [None, ""])
    def test_without_an_lm_studio_token_no_credential_goes_upstream(
        self, token: str | None
    ) -> None:
        out = to_upstream({"Authorization": "Bearer client-key"}, token)
        assert "Authorization" not in out

    def test_the_lm_studio_token_replaces_the_clients_credential(self) -> None:
        out = to_upstream({"Authorization": "Bearer client-key"}, "lm-secret")
        assert out.getall("Authorization") == ["Bearer lm-secret"]

    def test_exactly_these_headers_go_upstream(self) -> None:
        client = {**PASSED_UPSTREAM, **{n: "x" for n in KEPT_FROM_UPSTREAM}}
        out = to_upstream(client, "t")
        # The client's own spelling is kept; the gateway's headers go out in the usual one.
        assert sorted(out) == sorted(
            [*PASSED_UPSTREAM, "Content-Type", "Accept-Encoding", "X-Request-ID", "Authorization"]
        )


class TestToClient:
    @pytest.mark.parametrize("spell", SPELLINGS)
    @pytest.mark.parametrize("name", sorted(PASSED_TO_CLIENT))
    def test_a_header_the_client_needs_passes_in_any_spelling(
        self, name: str, spell: Spelling
    ) -> None:
        out = client_response_headers({spell(name): PASSED_TO_CLIENT[name]})
        assert out.getall(name) == [PASSED_TO_CLIENT[name]]

    @pytest.mark.parametrize("spell", SPELLINGS)
    @pytest.mark.parametrize("name", KEPT_FROM_CLIENT)
    def test_any_other_header_stays_behind(self, name: str, spell: Spelling) -> None:
        assert len(client_response_headers({spell(name): "lmstudio-value"})) == 0

    @pytest.mark.parametrize("name", sorted(PASSED_TO_CLIENT))
    def test_a_header_lm_studio_marked_hop_by_hop_stays_behind(self, name: str) -> None:
        upstream = {**PASSED_TO_CLIENT, "connection": f"close,  {name.lower()}"}
        out = client_response_headers(upstream)
        assert name not in out
        assert {n: out[n] for n in PASSED_TO_CLIENT if n != name} == {
            n: v for n, v in PASSED_TO_CLIENT.items() if n != name
        }

    def test_a_header_sent_twice_passes_twice(self) -> None:
        upstream = CIMultiDict([("Content-Language", "en"), ("content-language", "de")])
        assert client_response_headers(upstream).getall("Content-Language") == ["en", "de"]


class TestUpgrade:
    @pytest.mark.parametrize(
        "headers",
        [
            {"Upgrade": "websocket"},
            {"upgrade": "h2c"},
            {"UPGRADE": ""},
            {"Connection": "Upgrade"},
            {"connection": "keep-alive, upgrade"},
            {"CONNECTION": "close , UPGRADE "},
        ],
    )
    def test_an_upgrade_in_any_spelling(self, headers: dict[str, str]) -> None:
        assert is_upgrade_request(headers)

    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"Connection": "keep-alive"},
            {"Connection": "close, upgraded"},
            {"X-Upgrade": "websocket"},
            {"Accept": "upgrade"},
        ],
    )
    def test_no_upgrade(self, headers: dict[str, str]) -> None:
        assert not is_upgrade_request(headers)


def as_given(kind: str, pairs: list[tuple[str, str]]) -> Mapping[str, str]:
    """The same headers as aiohttp hands them over (a proxy of a CIMultiDict), as a
    CIMultiDict, or as a list of pairs any other Mapping gives."""
    multi = CIMultiDict(pairs)
    if kind == "proxy":
        return CIMultiDictProxy(multi)
    if kind == "multidict":
        return multi
    return PairsMapping(pairs)


class PairsMapping(Mapping[str, str]):
    """A Mapping that is no multidict, repeated names kept: the walk over every header."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs

    def __getitem__(self, name: str) -> str:
        return next(v for n, v in self._pairs if n == name)

    def __iter__(self) -> Iterator[str]:
        return iter(n for n, _ in self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def items(self) -> ItemsView[str, str]:
        return self._pairs  # type: ignore[return-value]


KINDS = ["proxy", "multidict", "pairs"]


class TestEveryContainerEveryRepeat:
    """A header named twice, in two spellings, counts twice however the headers are held:
    the second Connection header is read as the first is."""

    @pytest.mark.parametrize("kind", KINDS)
    def test_an_upgrade_in_a_second_connection_header(self, kind: str) -> None:
        pairs = [("Connection", "keep-alive"), ("CONNECTION", "Upgrade")]
        assert is_upgrade_request(as_given(kind, pairs))

    @pytest.mark.parametrize("kind", KINDS)
    def test_a_second_upgrade_header(self, kind: str) -> None:
        pairs = [("Accept", "a/b"), ("upgrade", "websocket")]
        assert is_upgrade_request(as_given(kind, pairs))
        assert not is_upgrade_request(as_given(kind, [("Accept", "a/b")]))

    @pytest.mark.parametrize("kind", KINDS)
    def test_a_hop_by_hop_name_in_a_second_connection_header_stays_behind(self, kind: str) -> None:
        pairs = [("Accept", "a/b"), ("Connection", "keep-alive"), ("connection", "ACCEPT")]
        assert "Accept" not in to_upstream(as_given(kind, pairs))
        upstream = [
            ("Content-Language", "en"),
            ("Connection", "close"),
            ("CONNECTION", "content-language"),
        ]
        assert "Content-Language" not in client_response_headers(as_given(kind, upstream))


class TestRequestId:
    @pytest.mark.parametrize(
        "candidate", ["a", "req-1", "A.b_c:D-9", "0" * 128, "550e8400-e29b-41d4-a716-446655440000"]
    )
    def test_a_safe_id_is_echoed(self, candidate: str) -> None:
        assert sane_request_id(candidate) == candidate

    @pytest.mark.parametrize(
        "candidate",
        [None, "", "0" * 129, "a b", "a\r\nSet-Cookie: x", "a\n", "<script>", "id/1", "ü"],
    )
    def test_an_unsafe_id_is_dropped(self, candidate: str | None) -> None:
        assert sane_request_id(candidate) is None
