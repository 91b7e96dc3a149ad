"""``GET /v1/models/{model}``: a model ID may hold slashes (LM Studio's "qwen/qwen3-4b"),
and openai's SDK sends that slash encoded. The ID is only looked up in the model list, never
sent to LM Studio, so an encoded slash is accepted there and nowhere else, and it can never
lead out of /v1/models/."""

from __future__ import annotations

import pytest

from tray_app.gateway.routes import EndpointTable, normalise_path


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/v1/models/qwen%2Fqwen3-4b", "/v1/models/qwen/qwen3-4b"),
        ("/v1/models/qwen%2fqwen3-4b", "/v1/models/qwen/qwen3-4b"),
        ("/v1/models/a%2Fb%2Fc?x=1", "/v1/models/a/b/c"),
        ("/v1/models/llama-3.2-1b", "/v1/models/llama-3.2-1b"),
        ("/v1/models/", "/v1/models"),
    ],
)
def test_a_model_id_may_hold_an_encoded_slash(target: str, path: str) -> None:
    assert normalise_path(target) == path


@pytest.mark.parametrize(
    "target",
    [
        "/v1/models/..%2F..%2Fapi%2Fv1%2Fmodels%2Fload",
        "/v1/models/a%2F..%2F..%2Fapi",
        "/v1/models/%2F",
        "/v1/models/a%2F%2e%2e%2F..",
        "/v1/models/a%252Fb",
        "/v1/models/a%5Cb",
        "/v1/chat/completions%2Fx",
        "/x/v1/models/a%2Fb",
        "/v1/modelsx%2Fb",
    ],
)
def test_an_encoded_slash_never_leads_out_of_the_model_list(target: str) -> None:
    assert normalise_path(target) is None


def test_the_model_endpoint_answers_any_number_of_segments() -> None:
    table = EndpointTable()
    for path in ("/v1/models/a", "/v1/models/qwen/qwen3-4b", "/v1/models/a/b/c"):
        found = table.find(path)
        assert found is not None and found.path == "/v1/models/{model}", path
        assert found.route is not None and found.route.local
    listing = table.find("/v1/models")
    assert listing is not None and listing.route is not None and not listing.route.local
    assert table.find("/v1/modelsx") is None
    assert table.find("/v2/models/a/b") is None
