"""What tools see when API keys are set: the OpenAPI description, open to read, with the bearer scheme that
/docs uses to send the key on every keyed route; and Prometheus, scraping /metrics with docs/metrics.md's config."""


import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.doc_blocks import the_block
from tests.integration.conftest import APP, BASE

pytestmark = pytest.mark.integration
MODEL = "all-MiniLM-L6-v2"
KEY = "key-openapi-5d1e07"
KEYED = {("post", "/v1/embeddings"), ("get", "/v1/models"), ("get", "/v1/models/{model_id}"),
         ("get", "/v1/performance"), ("post", "/v1/performance/reset"), ("get", "/metrics")}


@pytest.fixture(scope="module", autouse=True)
def app(serve_app, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("secrets") / "api_keys"
    key_file.write_text(f"{KEY}\n")

    def with_key(config):
        next(a for a in config["applications"] if a["name"] == APP)["args"]["api_key_file"] = str(key_file)

    return serve_app(with_key)


@pytest.fixture(scope="module")
def spec(client) -> dict:
    response = client.get("/openapi.json")  # no key
    assert response.status_code == 200
    return response.json()


def test_openapi_json_and_docs_are_served_without_a_key(client):
    assert client.get("/openapi.json").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text
    assert client.get("/v1/models").status_code == 401  # while the API itself needs the key


def test_openapi_json_declares_the_bearer_scheme(spec):
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer <key>`. Needed only when keys are set."}


def test_every_keyed_route_lists_the_bearer_scheme_and_health_none(spec):
    operations = {(method, path): op for path, ops in spec["paths"].items() for method, op in ops.items()}
    for key in KEYED:
        assert operations[key].get("security") == [{"bearer": []}], key
    assert "security" not in operations[("get", "/health")]


def test_the_key_sent_as_docs_sends_it_is_accepted(spec):
    """Swagger UI sends `Authorization: Bearer <key>` for an http bearer scheme: the embeddings route takes it,
    and without it answers the OpenAI-shaped 401 (never FastAPI's 403)."""
    body = {"model": MODEL, "input": "x"}
    with httpx.Client(base_url=BASE, timeout=60) as plain:
        refused = plain.post("/v1/embeddings", json=body)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        refused = plain.get("/v1/models", headers={"Authorization": "Basic abc"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        ok = plain.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        assert plain.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_metrics_pages_prometheus_scrape_config_scrapes_with_the_key(client, tmp_path):
    """The scrape as Prometheus makes it from docs/metrics.md's config: `authorization` with a credentials file
    sends `Authorization: <type> <file content>`."""
    block = the_block("docs/metrics.md", "yaml", "scrape_configs")
    [job] = yaml.safe_load(block)["scrape_configs"]
    credentials = tmp_path / "embserve-key"  # stands in for the page's path
    credentials.write_text(KEY)
    auth = job["authorization"]
    [target] = job["static_configs"][0]["targets"]
    url = f"{job.get('scheme', 'http')}://{target}{job['metrics_path']}"
    assert url == "http://127.0.0.1:8000/metrics"  # the page's server; this session's listens on its own port
    url = f"{BASE}/metrics"
    header = f"{auth.get('type', 'Bearer')} {credentials.read_text().strip()}"
    client.post("/v1/embeddings", json={"model": MODEL, "input": "x"}, headers={"Authorization": f"Bearer {KEY}"})
    with httpx.Client(timeout=60) as prometheus:
        assert prometheus.get(url).status_code == 401  # without the authorization block
        scraped = prometheus.get(url, headers={"Authorization": header})
    assert scraped.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(scraped.text)}
    # The app's metrics actor outlives earlier test modules, whose models may still be listed.
    assert MODEL in {s.labels["model"] for s in families["embserve_inputs"].samples}
    assert all("model" not in s.labels for s in families["embserve_requests"].samples)
