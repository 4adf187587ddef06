"""The OpenAI-compatible API end to end: real Serve HTTP, the bundled model, the official openai client."""

import base64
import time

import numpy as np
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from tests.integration.conftest import BASE, set_env

pytestmark = pytest.mark.integration
MODEL = "all-MiniLM-L6-v2"
TEXTS = ["The cat sits on the mat.", "Ray Serve batches requests.",
         "A much longer passage about embedding servers, padding, batching and throughput. " * 4]


def float32_replicas(config: dict) -> None:
    """EMB_PROVIDER_DTYPE=float32, as docs/precision.md says to set it for vectors equal to
    sentence-transformers' within 1e-5: these tests hold the served vectors to that (the default dtype may
    be bf16 on this CPU, whose contract test_batching.py checks)."""
    set_env(config, dtype="float32")


@pytest.fixture(scope="module", autouse=True)
def app(serve_app):
    return serve_app(float32_replicas)


@pytest.fixture(scope="module")
def oai() -> OpenAI:
    return OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0)


def assert_close(got, want):
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert np.all(cos > 0.9999), cos
    assert np.abs(got - want).max() <= 1e-5


def test_openai_client_default_base64_matches_sentence_transformers(oai, reference):
    response = oai.embeddings.create(model=MODEL, input=TEXTS)
    assert [d.index for d in response.data] == [0, 1, 2]
    assert_close([d.embedding for d in response.data], reference(TEXTS))
    assert response.model == MODEL


def test_openai_client_float_format_matches_sentence_transformers(oai, reference):
    response = oai.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert len(response.data) == 1
    assert_close(response.data[0].embedding, reference(TEXTS[:1])[0])


def test_base64_is_little_endian_float32_as_openai(client, reference):
    body = client.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[1], "encoding_format": "base64"}).json()
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert len(raw) == 384 * 4
    assert_close(np.frombuffer(raw, dtype="<f4"), reference(TEXTS[1:2])[0])


def test_response_shape_and_usage_counts_special_tokens(client, bundled_model):
    body = client.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[:2], "user": "u-1"}).json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["object"] for d in body["data"]] == ["embedding", "embedding"]
    expected = sum(len(bundled_model.tokenizer(t)["input_ids"]) for t in TEXTS[:2])
    assert body["usage"] == {"prompt_tokens": expected, "total_tokens": expected}


def test_token_id_inputs_embed_like_their_text(client, bundled_model, reference):
    ids = [bundled_model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:2]]
    one = client.post("/v1/embeddings", json={"model": MODEL, "input": ids[0], "encoding_format": "float"}).json()
    many = client.post("/v1/embeddings", json={"model": MODEL, "input": ids, "encoding_format": "float"}).json()
    want = reference(TEXTS[:2])
    assert_close(one["data"][0]["embedding"], want[0])
    assert_close([d["embedding"] for d in many["data"]], want)


def test_token_ids_with_special_tokens_embed_like_their_text(client, bundled_model, reference):
    """`tokenizer(text)["input_ids"]`, as TEI and vLLM clients send it: [CLS] and [SEP] are not added again."""
    ids = [bundled_model.tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    assert all(i[0] == 101 and i[-1] == 102 for i in ids)
    body = client.post("/v1/embeddings", json={"model": MODEL, "input": ids, "encoding_format": "float"}).json()
    assert_close([d["embedding"] for d in body["data"]], reference(TEXTS[:2]))
    assert body["usage"]["prompt_tokens"] == sum(len(i) for i in ids)


def test_dimensions_keeps_first_n_and_renormalizes(oai, reference):
    response = oai.embeddings.create(model=MODEL, input=TEXTS[0], dimensions=64, encoding_format="float")
    vec = np.asarray(response.data[0].embedding)
    full = reference(TEXTS[:1])[0][:64]
    assert vec.shape == (64,)
    assert np.isclose(np.linalg.norm(vec), 1.0, atol=1e-5)
    assert_close(vec, full / np.linalg.norm(full))


@pytest.mark.parametrize("dimensions", [0, -3, 385])
def test_dimensions_out_of_range_is_400(oai, dimensions):
    with pytest.raises(BadRequestError) as err:
        oai.embeddings.create(model=MODEL, input="x", dimensions=dimensions)
    assert err.value.body["param"] == "dimensions"


def test_too_long_input_is_400_with_limit_and_length(client):
    body = client.post("/v1/embeddings", json={"model": MODEL, "input": "word " * 400})
    assert body.status_code == 400
    error = body.json()["error"]
    assert "256" in error["message"] and "402" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_truncate_extension_cuts_to_the_model_maximum(oai, reference):
    long = "word " * 400
    response = oai.embeddings.create(model=MODEL, input=long, extra_body={"truncate": True}, encoding_format="float")
    assert response.usage.prompt_tokens == 256
    assert_close(response.data[0].embedding, reference([long])[0])  # sentence-transformers truncates too


def test_unknown_model_is_404_in_openai_shape(oai):
    with pytest.raises(NotFoundError) as err:
        oai.embeddings.create(model="no-such-model", input="x")
    assert err.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("payload, param", [
    ({"model": MODEL, "input": ""}, "input"),
    ({"model": MODEL, "input": []}, "input"),
    ({"model": MODEL, "input": [""]}, "input"),
    ({"model": MODEL, "input": [[]]}, "input"),
    ({"model": MODEL, "input": 5}, "input"),
    ({"model": MODEL, "input": [1, "a"]}, "input"),
    ({"model": MODEL}, "input"),
    ({"input": "x"}, "model"),
    ({"model": MODEL, "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"model": MODEL, "input": "x", "dimensions": "ten"}, "dimensions"),
])
def test_invalid_requests_are_400_in_openai_shape_never_422(client, payload, param):
    response = client.post("/v1/embeddings", json=payload)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_malformed_json_is_400(client):
    response = client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_too_many_inputs_is_413(client):
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": ["a"] * 2049})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_inputs"


def test_too_large_body_is_413(client):
    response = client.post("/v1/embeddings", content=b"x" * (17 * 1024 * 1024),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_request_of_several_megabytes_reaches_the_model(oai, reference):
    """5 MB of text: over gRPC's 4 MiB default between the ingress and the embedder, under the body limit."""
    words = "embedding servers batch many long documents together. "
    texts = [(words * 2000)[:100_000] for _ in range(49)] + [TEXTS[0]]
    response = oai.embeddings.create(model=MODEL, input=texts, extra_body={"truncate": True})
    assert len(response.data) == 50
    assert_close([response.data[0].embedding, response.data[-1].embedding],
                 reference([texts[0], TEXTS[0]]))


@pytest.mark.parametrize("payload", [
    {"model": MODEL, "input": TEXTS, "encoding_format": "float", "dimensions": 64},
    {"model": "no-such-model", "input": "x"},
    {"model": MODEL, "input": ""},
    {"model": MODEL, "input": "x", "dimensions": 385},
])
def test_the_fast_path_answers_as_fastapis_route(client, payload):
    """application/json takes the ingress's fast path (deployments/ingress.py, fast_request); a +json type
    of the same body goes through FastAPI's route: same status, same body, errors included."""
    fast = client.post("/v1/embeddings", json=payload)
    routed = client.post("/v1/embeddings", json=payload, headers={"content-type": "application/vnd.api+json"})
    assert fast.status_code == routed.status_code
    a, b = fast.json(), routed.json()
    if fast.status_code != 200:
        assert a["error"] == b["error"] and a["request_id"] and a["request_id"] != b["request_id"]
        return
    assert_close([d["embedding"] for d in a["data"]], [d["embedding"] for d in b["data"]])
    for body in (a, b):
        for d in body["data"]:
            d.pop("embedding")
    assert a == b


def test_models_lists_the_served_model_in_openai_shape(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = models.data[0].model_dump()
    assert card["object"] == "model" and card["dimensions"] == 384 and card["max_input_tokens"] == 256


def test_health_is_200_when_the_model_answers(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_openapi_docs_describe_the_embeddings_route(client):
    spec = client.get("/openapi.json").json()
    assert "/v1/embeddings" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_unknown_route_is_404_in_openai_shape(client):
    response = client.get("/v2/nothing")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_timing_headers_add_up_within_what_the_client_measured(client, bundled_model):
    """The replica's stages of one request are disjoint (queue: from its arrival, tokenization included,
    until its first forward starts; inference: from then until its inputs are done) and lie inside the
    ingress's total, which lies inside what the client waited."""
    started = time.perf_counter()
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS})
    client_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200
    ms = {name: float(response.headers[f"x-embserve-{name}-ms"])
          for name in ("queue", "tokenize", "inference", "total")}
    assert ms["inference"] > 0, "a request whose inputs ran a forward spent time in it"
    assert ms["tokenize"] > 0
    assert ms["queue"] + ms["inference"] <= ms["total"] <= client_ms, ms
    assert ms["tokenize"] <= ms["queue"]
    expected = sum(len(bundled_model.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert int(response.headers["x-embserve-prompt-tokens"]) == expected
