"""The error hierarchy: each kind's HTTP status and OpenAI type, pickling across processes, body shape."""

from __future__ import annotations

import pickle

import pytest

from embserve.api import errors
from embserve.api.errors import (
    Cancelled,
    EmbservError,
    InputTooLong,
    InvalidRequest,
    ModelNotFound,
    NonFiniteOutput,
    OutOfMemory,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    UnsupportedModel,
)

KINDS = [
    (EmbservError, 500, "server_error", None),
    (InvalidRequest, 400, "invalid_request_error", None),
    (InputTooLong, 400, "invalid_request_error", "context_length_exceeded"),
    (Unauthorized, 401, "invalid_request_error", "invalid_api_key"),
    (ModelNotFound, 404, "invalid_request_error", "model_not_found"),
    (PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (Overloaded, 503, "server_error", "overloaded"),
    (Unavailable, 503, "server_error", "service_unavailable"),
    (RequestTimeout, 504, "server_error", "timeout"),
    (Cancelled, 499, "invalid_request_error", "cancelled"),
    (UnsupportedModel, 500, "server_error", "unsupported_model"),
    (OutOfMemory, 503, "server_error", "out_of_memory"),
    (NonFiniteOutput, 500, "server_error", "non_finite_output"),
]


def _all_kinds() -> list[type[EmbservError]]:
    found, todo = [EmbservError], [EmbservError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__ == errors.__name__ and sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


@pytest.mark.parametrize(("kind", "status", "type_", "code"), KINDS, ids=lambda k: getattr(k, "__name__", None))
def test_each_kind_has_its_status_type_and_default_code(kind, status, type_, code):
    err = kind("something went wrong")
    assert err.status == status
    assert err.type == type_
    assert err.code == code
    assert err.param is None
    assert str(err) == err.message == "something went wrong"


def test_input_too_long_is_an_invalid_request():
    assert issubclass(InputTooLong, InvalidRequest)
    assert isinstance(InputTooLong("x"), InvalidRequest)


@pytest.mark.parametrize("kind", _all_kinds(), ids=lambda k: k.__name__)
def test_every_kind_is_an_http_error_status(kind):
    assert 400 <= kind.status <= 599
    assert kind.type in {"invalid_request_error", "server_error"}
    assert kind.status >= 500 or kind.type == "invalid_request_error"


def test_explicit_code_overrides_the_default():
    assert ModelNotFound("no", code="custom").code == "custom"


@pytest.mark.parametrize("kind", _all_kinds(), ids=lambda k: k.__name__)
def test_pickle_round_trip_keeps_kind_message_param_and_code(kind):
    original = kind("bad input[3]", param="input", code="some_code")
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is kind
    assert (copy.message, copy.param, copy.code) == ("bad input[3]", "input", "some_code")
    assert copy.status == original.status and str(copy) == str(original)
    assert copy.to_body() == original.to_body()


@pytest.mark.parametrize("kind", _all_kinds(), ids=lambda k: k.__name__)
def test_pickle_round_trip_keeps_the_default_code(kind):
    copy = pickle.loads(pickle.dumps(kind("m")))
    assert copy.code == kind.default_code and copy.param is None


@pytest.mark.parametrize("kind", _all_kinds(), ids=lambda k: k.__name__)
def test_to_body_is_exactly_the_openai_error_shape(kind):
    body = kind("msg", param="dimensions", code="c").to_body()
    assert list(body) == ["error"]
    assert body["error"] == {"message": "msg", "type": kind.type, "param": "dimensions", "code": "c"}


def test_to_body_keeps_null_param_and_code():
    assert InvalidRequest("m").to_body() == {
        "error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}
    }


def test_an_error_body_is_openais_four_keys_with_the_request_id_beside_them():
    err = errors.InputTooLong("too long", param="input")
    assert err.to_body() == {"error": {"message": "too long", "type": "invalid_request_error", "param": "input",
                                       "code": err.code}}
    with_id = err.to_body(request_id="abc-1")
    assert with_id["request_id"] == "abc-1" and with_id["error"] == err.to_body()["error"]
    assert errors.error_body("gone", "server_error", request_id="") == {
        "error": {"message": "gone", "type": "server_error", "param": None, "code": None}}
