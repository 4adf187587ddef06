"""Schemathesis fuzzes every route of the live OpenAPI schema: no input may produce a 5xx.

Each operation's hypothesis strategy is driven directly (schemathesis' pytest plugin does not run
under pytest 9).
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.integration.conftest import BASE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def operations(serve_app):
    serve_app()
    schema = schemathesis.openapi.from_url(f"{BASE}/openapi.json")
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


def test_the_schema_covers_every_route(operations):
    assert {"POST /v1/embeddings", "POST /v1/rerank", "POST /rerank", "GET /v1/models", "GET /v1/models/{model_id}", "GET /health",
            "GET /v1/performance", "POST /v1/performance/reset", "GET /metrics"} <= set(operations)


@pytest.mark.parametrize("route", ["POST /v1/embeddings", "POST /v1/rerank", "POST /rerank", "GET /v1/models/{model_id}",
                                   "GET /v1/models", "GET /health", "GET /v1/performance", "GET /metrics"])
def test_no_generated_request_gets_a_server_error(operations, route):
    operation = operations[route]
    examples = 60 if route == "POST /v1/embeddings" else 10

    @given(case=operation.as_strategy())
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        case.call_and_validate(base_url=BASE, checks=[not_a_server_error], timeout=60)

    check()
