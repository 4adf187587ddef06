"""OpenAI request/response models: strict input types, and no surprises on arbitrary JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st
from pydantic import ValidationError

from embserve.api.errors import InvalidRequest
from embserve.api.protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)


def _request(**fields):
    return EmbeddingRequest.model_validate({"model": "m", **fields})


@pytest.mark.parametrize(
    "value",
    ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]],
    ids=["string", "strings", "token-ids", "token-id-lists"],
)
def test_the_four_openai_input_shapes_validate_unchanged(value):
    assert _request(input=value).input == value


@pytest.mark.parametrize(
    "value",
    [
        True, [True], [1, True], [[True]], [[1], [False]],
        [1.0], [1.5], [[1.0]],
        ["a", 1], [1, "a"], [[1], ["a"]], [[1], 2], [["a"]],
        [], [[]], [[1], []],
        None, 7, {"text": "a"}, ["a", None], "1".encode(),
    ],
    ids=repr,
)
def test_non_openai_input_is_a_validation_error(value):
    with pytest.raises(ValidationError):
        _request(input=value)


def test_numeric_strings_are_not_token_ids():
    # A list of digit strings is a list of texts, never coerced to ids.
    assert _request(input=["1", "2"]).input == ["1", "2"]


@pytest.mark.parametrize(
    "fields",
    [
        {"input": "a", "model": 3},
        {"input": "a", "dimensions": "8"},
        {"input": "a", "dimensions": 8.0},
        {"input": "a", "dimensions": True},
        {"input": "a", "encoding_format": "binary"},
        {"input": "a", "user": 5},
        {"input": "a", "truncate": "maybe"},
        {"model": "m"},
        {"input": "a", "model": None},
    ],
    ids=repr,
)
def test_other_fields_are_strict(fields):
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", **fields})


def test_defaults_and_unknown_fields_are_ignored_like_openai():
    req = _request(input="a", future_option={"x": 1})
    assert req.encoding_format == "float"
    assert req.dimensions is None and req.user is None and req.truncate is None
    assert not hasattr(req, "future_option")


def test_optional_fields_validate():
    req = _request(input="a", encoding_format="base64", dimensions=64, user="u", truncate=True)
    assert (req.encoding_format, req.dimensions, req.user, req.truncate) == ("base64", 64, "u", True)


def test_request_parses_from_json_text():
    body = json.dumps({"input": [[101, 102]], "model": "m", "encoding_format": "base64"})
    assert EmbeddingRequest.model_validate_json(body).input == [[101, 102]]


def test_lone_surrogate_escape_in_json_is_refused_by_the_parser():
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate_json('{"input": "\\ud800", "model": "m"}')


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "input": json_values, "model": json_values, "encoding_format": json_values,
        "dimensions": json_values, "user": json_values, "truncate": json_values, "extra": json_values,
    },
)


@settings(max_examples=250, deadline=None)
@given(st.one_of(request_like, json_values))
def test_arbitrary_json_either_validates_or_raises_validation_error(payload):
    try:
        req = EmbeddingRequest.model_validate(payload)
    except ValidationError:
        return
    # What validates is one of the four shapes, with no bools hiding as ids.
    value = req.input
    if isinstance(value, str):
        return
    assert isinstance(value, list) and value
    if all(isinstance(x, str) for x in value):
        return
    if all(type(x) is int for x in value):
        return
    assert all(isinstance(x, list) and x and all(type(i) is int for i in x) for x in value)


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_arbitrary_json_text_either_validates_or_raises_validation_error(value):
    try:
        EmbeddingRequest.model_validate_json(json.dumps({"input": value, "model": "m"}))
    except ValidationError:
        pass


def test_error_response_model_accepts_an_error_body():
    err = InvalidRequest("bad", param="input", code="empty_input")
    parsed = ErrorResponse.model_validate(err.to_body())
    assert parsed.error.message == "bad" and parsed.error.param == "input" and parsed.error.code == "empty_input"
    assert parsed.model_dump(exclude_none=True) == err.to_body()
    with_id = ErrorResponse.model_validate(err.to_body(request_id="req-7"))
    assert with_id.request_id == "req-7" and with_id.error == parsed.error


def test_response_models_dump_in_openai_shape():
    resp = EmbeddingResponse(data=[EmbeddingData(index=0, embedding=[0.5, -0.5])], model="m",
                             usage=Usage(prompt_tokens=3, total_tokens=3))
    assert resp.model_dump() == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.5]}],
        "model": "m",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    card = ModelCard(id="m", created=1, dimensions=384, max_input_tokens=256)
    listing = ModelList(data=[card]).model_dump()
    assert listing["object"] == "list"
    assert listing["data"][0] == {"id": "m", "object": "model", "created": 1, "owned_by": "embserve",
                                  "task": "embed", "dimensions": 384, "max_input_tokens": 256, "aliases": []}
