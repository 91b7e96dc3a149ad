"""CORS policy on its own: which origins a browser page may call from, what counts as a
preflight, and the exact headers each answer carries.

Origins and Host headers come in many spellings for the same thing (case, a trailing slash,
surrounding blanks, a port); every spelling of an allowed origin must pass and every near miss
must not, so the cases below are crossed rather than picked one by one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import pytest
from multidict import CIMultiDict

from tray_app.gateway.cors import CorsPolicy, normalise_origin

# Spellings a browser, a proxy or a hand-edited config may give the same origin.
ORIGIN_SPELLINGS: list[Callable[[str], str]] = [
    lambda o: o,
    lambda o: o + "/",
    lambda o: o.upper(),
    lambda o: f"  {o}/  ",
    lambda o: o.title(),
]

# The gateway's own page, as (origin it is served from, Host header the request carries).
SAME_ORIGINS = [
    ("http://lmgate.box", "lmgate.box"),
    ("https://lmgate.box", "lmgate.box"),
    ("https://lmgate.box", "LMGATE.BOX"),
    ("http://127.0.0.1:8080", "127.0.0.1:8080"),
    ("https://abc-123.ngrok-free.app", "abc-123.ngrok-free.app"),
    ("http://[::1]:8080", "[::1]:8080"),
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("https://app.example.com/", "https://app.example.com"),
        ("https://app.example.com///", "https://app.example.com"),
        ("  https://app.example.com/ \t", "https://app.example.com"),
        ("HTTPS://App.Example.COM", "https://app.example.com"),
        # Ends in a capital letter that is not a slash: only slashes come off the end.
        ("HTTP://PHONE.BOX", "http://phone.box"),
        ("http://phone.box:8080/", "http://phone.box:8080"),
    ],
)
def test_normalise_origin_folds_only_case_blanks_and_trailing_slashes(
    raw: str, expected: str
) -> None:
    assert normalise_origin(raw) == expected


def test_a_leading_slash_is_not_folded_away() -> None:
    # Only the end is trimmed; a malformed origin stays malformed and matches nothing.
    assert normalise_origin("/https://app.example.com") == "/https://app.example.com"


@pytest.mark.parametrize(
    ("listed", "spell"),
    list(
        itertools.product(
            ["https://app.example.com", "http://phone.box:8080", "HTTPS://Upper.Example.ORG/"],
            ORIGIN_SPELLINGS,
        )
    ),
)
def test_every_spelling_of_a_listed_origin_is_allowed(
    listed: str, spell: Callable[[str], str]
) -> None:
    policy = CorsPolicy([listed])
    origin = spell(listed.strip().rstrip("/"))
    assert policy.allows(origin, None)
    assert policy.allows(origin, "elsewhere.example")


@pytest.mark.parametrize(
    "near_miss",
    [
        "http://app.example.com",  # other scheme
        "https://app.example.com:8443",  # other port
        "https://app.example.co",
        "https://app.example.com.evil.test",
        "https://evil.app.example.com",
        "https://user@app.example.com",
        "null",
        "",
    ],
)
def test_a_near_miss_of_a_listed_origin_is_refused(near_miss: str) -> None:
    policy = CorsPolicy(["https://app.example.com"])
    assert not policy.allows(near_miss, "lmgate.box")


def test_blank_entries_in_the_list_allow_nothing() -> None:
    policy = CorsPolicy(["", "   ", "https://app.example.com"])
    assert not policy.allows("", None)
    assert not policy.allows("   ", None)
    assert policy.allows("https://app.example.com", None)


@pytest.mark.parametrize(("same", "spell"), list(itertools.product(SAME_ORIGINS, ORIGIN_SPELLINGS)))
def test_the_gateways_own_page_is_allowed_in_every_spelling(
    same: tuple[str, str], spell: Callable[[str], str]
) -> None:
    origin, host = same
    assert CorsPolicy().allows(spell(origin), host)


@pytest.mark.parametrize(("origin", "host"), SAME_ORIGINS)
def test_the_same_host_is_not_same_origin_without_a_host_header(origin: str, host: str) -> None:
    assert not CorsPolicy().allows(origin, None)


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://lmgate.box:8080", "lmgate.box"),  # port differs
        ("http://lmgate.box", "lmgate.box:8080"),
        ("http://lmgate.box.evil.test", "lmgate.box"),
        ("http://evil.test", "lmgate.box"),
        ("http://user@lmgate.box", "lmgate.box"),
        ("ftp://lmgate.box", "lmgate.box"),  # not a web page's scheme
        ("ws://lmgate.box", "lmgate.box"),
        ("file://lmgate.box", "lmgate.box"),
        ("lmgate.box", "lmgate.box"),  # no scheme at all
        ("null", "null"),
        ("http://[::1]:8080", "127.0.0.1:8080"),
    ],
)
def test_a_page_elsewhere_is_not_the_gateways_own(origin: str, host: str) -> None:
    assert not CorsPolicy().allows(origin, host)


PREFLIGHT = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}


def _spelled(headers: Mapping[str, str], how: str) -> Mapping[str, str]:
    if how == "as sent":
        return dict(headers)
    # What aiohttp hands the gateway: case-insensitive, in whatever case the client wrote.
    recased = {(name.lower() if how == "lower" else name.upper()): v for name, v in headers.items()}
    return CIMultiDict(recased)


@pytest.mark.parametrize("how", ["as sent", "lower", "upper"])
def test_a_preflight_is_options_with_origin_and_a_requested_method(how: str) -> None:
    assert CorsPolicy.is_preflight("OPTIONS", _spelled(PREFLIGHT, how))


@pytest.mark.parametrize("how", ["as sent", "lower", "upper"])
@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("POST", PREFLIGHT),  # a real request from a page, not a preflight
        ("GET", PREFLIGHT),
        ("options", PREFLIGHT),  # methods are case-sensitive
        ("OPTIONS", {"Origin": "https://app.example.com"}),  # plain OPTIONS from a page
        ("OPTIONS", {"Access-Control-Request-Method": "POST"}),  # no origin: not a browser
        ("OPTIONS", {}),
        ("POST", {"Origin": "https://app.example.com"}),
        ("POST", {"Access-Control-Request-Method": "POST"}),
    ],
)
def test_anything_less_is_not_a_preflight(
    method: str, headers: Mapping[str, str], how: str
) -> None:
    assert not CorsPolicy.is_preflight(method, _spelled(headers, how))


@pytest.mark.parametrize("methods", ["GET", "POST", "GET, DELETE"])
def test_a_preflight_answer_is_exactly_the_cors_grant(methods: str) -> None:
    origin = "https://app.example.com"
    headers = CorsPolicy.preflight_headers(origin, methods)
    # Exact names as the Fetch standard spells them, and nothing more: in particular no
    # Allow-Credentials, and the origin echoed, never a wildcard.
    assert set(headers) == {
        "Access-Control-Allow-Origin",
        "Access-Control-Allow-Methods",
        "Access-Control-Allow-Headers",
        "Access-Control-Max-Age",
        "Vary",
    }
    assert headers["Access-Control-Allow-Origin"] == origin
    granted = [m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")]
    assert granted == [*(m.strip() for m in methods.split(",")), "OPTIONS"]
    # A page's fetch sends these; a preflight that did not grant them would block it.
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-api-key", "x-request-id"} <= allowed
    assert "cookie" not in allowed
    max_age = int(headers["Access-Control-Max-Age"])
    assert 0 < max_age <= 7200  # cached, but not past what browsers honour
    # A cache must key the answer on the origin, or one origin's grant serves another.
    assert headers["Vary"] == "Origin"


def test_an_answer_to_a_page_grants_the_origin_and_exposes_the_gateways_headers() -> None:
    origin = "http://127.0.0.1:8080"
    headers = CorsPolicy.response_headers(origin)
    assert set(headers) == {"Access-Control-Allow-Origin", "Access-Control-Expose-Headers", "Vary"}
    assert headers["Access-Control-Allow-Origin"] == origin
    # A page must be able to read the request id, a 429's wait and a chat's conversation id.
    exposed = {h.strip().lower() for h in headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-request-id", "retry-after", "x-conversation-id"} <= exposed
    assert headers["Vary"] == "Origin"
