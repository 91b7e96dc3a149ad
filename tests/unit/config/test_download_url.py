"""The download-address setting (tunnel.ngrok_download_url): https anywhere, plain http only on
this computer, and never an address whose host urllib would read differently from urlsplit."""

from __future__ import annotations

import pytest

from tray_app.config.parsers import download_url, download_url_allowed

ALLOWED = [
    "https://h/x.tgz",
    "http://127.0.0.1:8/x.tgz",
    "http://[::1]:8/x",
    "http://localhost/x",
    "https://cdn.example:8443/ngrok-v3-stable-linux-amd64.tgz?x=1",
]
REFUSED = [
    "http://evil.com@127.0.0.1/a.zip",  # urlsplit: host 127.0.0.1; urllib: "evil.com@127.0.0.1"
    "https://user:pw@host/x",
    "https://@host/x",
    "http://127.0.0.1.evil.com/x",
    "https://h/a b",
    "https://h/a\tb",
    "https://h/\x00",
    "https://h/a\nb",
    "https://h/\x7f",
    "https://h/\u2028x",
    "ftp://h/x",
    "http://10.0.0.1/x",
    "http://h/x",
    "https:///x",
    "https://h:99999/x",
]


@pytest.mark.parametrize("url", ALLOWED)
def test_an_allowed_address_is_kept(url: str) -> None:
    assert (download_url_allowed(url), download_url(f" {url} ")) == (True, url)


@pytest.mark.parametrize("url", REFUSED)
def test_a_refused_address_is_named(url: str) -> None:
    assert download_url_allowed(url) is False
    with pytest.raises(ValueError) as raised:
        download_url(url)
    assert str(raised.value) == (
        "must be an https:// URL (or http:// on this computer), with no user name or spaces, "
        f"got {url!r}"
    )


def test_empty_means_the_vendor_s_own() -> None:
    assert (download_url(""), download_url("   ")) == ("", "")
    with pytest.raises(ValueError, match="must be an https:// URL"):
        download_url(3)
