"""Which POST /v1/embeddings the ingress answers without FastAPI's request machinery: only a valid JSON body
declared as application/json; everything else goes through FastAPI, whose validation words every error."""

import pytest
from starlette.datastructures import Headers

from deployments.ingress import fast_request, json_content

BODY = b'{"model": "m", "input": ["a", "b"], "encoding_format": "base64", "dimensions": 8}'


def scope(method: str = "POST", path: str = "/v1/embeddings") -> dict:
    return {"type": "http", "method": method, "path": path}


def headers(content_type: str | None = "application/json") -> Headers:
    return Headers({} if content_type is None else {"content-type": content_type})


@pytest.mark.parametrize("content_type, fast", [
    ("application/json", True),
    ("Application/JSON; charset=utf-8", True),
    ("application/vnd.api+json", False),  # FastAPI parses it as JSON too: left to it
    ("text/plain", False),
    (None, False),
])
def test_only_bodies_declared_application_json_take_the_fast_path(content_type, fast):
    assert json_content(headers(content_type)) is fast
    assert (fast_request(scope(), headers(content_type), BODY) is not None) is fast


def test_a_valid_body_is_parsed_once_into_the_route_model():
    request = fast_request(scope(), headers(), BODY)
    assert (request.model, request.input, request.encoding_format, request.dimensions) == ("m", ["a", "b"], "base64", 8)
    assert request.truncate is None and request.prompt_name is None


@pytest.mark.parametrize("body", [
    b"", b"{not json", b"[]", b'{"model": "m"}',
    b'{"model": "m", "input": 5}', b'{"model": "m", "input": "x", "encoding_format": "int8"}',
])
def test_an_invalid_body_is_left_to_fastapi_for_its_error_message(body):
    assert fast_request(scope(), headers(), body) is None


@pytest.mark.parametrize("method, path", [("GET", "/v1/embeddings"), ("POST", "/v1/rerank"), ("POST", "/rerank")])
def test_other_routes_and_methods_are_fastapis(method, path):
    assert fast_request(scope(method, path), headers(), BODY) is None
