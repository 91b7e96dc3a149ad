"""A body that is JSON but not an object is refused in JSON's words: it once said "not a JSON
str" or "not a JSON NoneType", Python's names for what the client sent."""

from __future__ import annotations

import pytest

from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.body_rules import parse_json_object


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"[1]", "array"),
        (b'"text"', "string"),
        (b"12", "number"),
        (b"1.5", "number"),
        (b"true", "boolean"),
        (b"false", "boolean"),
        (b"null", "null"),
    ],
)
def test_a_body_that_is_not_an_object_is_named_as_json_names_it(body: bytes, kind: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_json_object(body)
    assert (refused.value.status, refused.value.code, refused.value.param) == (
        400,
        "invalid_body",
        None,
    )
    assert refused.value.message == f"The request body must be a JSON object, not a JSON {kind}."
