"""Reading ``/api/v0/models``: only LM Studio's list of model states counts as one; anything
else (another server's 200, a broken body) means there is no model API to guard with."""

from __future__ import annotations

import json

import pytest

from tray_app.gateway.upstream.answers import MAX_PARSED_CONTAINERS
from tray_app.gateway.upstream.model_api import ModelStates, model_states


def body(entries: object) -> bytes:
    return json.dumps({"object": "list", "data": entries}).encode()


def test_loaded_and_not_loaded_models() -> None:
    states = model_states(
        body(
            [
                {"id": "a", "state": "loaded", "type": "llm"},
                {"id": "b", "state": "not-loaded", "type": "llm"},
                {"id": "c", "state": "loading"},
            ]
        )
    )
    assert states == ModelStates(frozenset({"a", "b", "c"}), frozenset({"a"}))


def test_no_model_downloaded_is_an_empty_list() -> None:
    assert model_states(body([])) == ModelStates(frozenset(), frozenset())


def test_entries_that_are_not_model_states_are_skipped() -> None:
    states = model_states(
        body([{"id": "a", "state": "loaded"}, "x", {"id": 3, "state": "loaded"}, {"id": "b"}])
    )
    assert states == ModelStates(frozenset({"a"}), frozenset({"a"}))


@pytest.mark.parametrize(
    "text",
    [
        b"not json",
        b"[1, 2]",
        b'{"fake": "anything"}',
        b'{"data": {"id": "a"}}',
        # OpenAI's /v1/models shape: models, but no states
        body([{"id": "a", "object": "model"}]),
        b"[" * 100_000,
        b"[]" * (MAX_PARSED_CONTAINERS + 1),
    ],
)
def test_anything_else_is_no_model_api(text: bytes) -> None:
    assert model_states(text) is None
