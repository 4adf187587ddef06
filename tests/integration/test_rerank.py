"""Rerank models beside an embedding model in one app, deployed from the shipped serve_config.yaml and called
through real HTTP, with httpx and with Cohere's own client: the scores are the cross-encoders' own
`CrossEncoder.predict`'s, in both rerank shapes, and every error is the embeddings' kind."""

import ast
import concurrent.futures as cf
import contextlib
import io
import json
import re
import shutil
import subprocess
import time

import numpy as np
import pytest

from tests.cross_encoders import DOCUMENTS, LONG_DOCUMENT, QUERY, build_cross_encoder
from tests.doc_blocks import the_block
from tests.integration.conftest import BASE, set_env
from tests.texts import mixed_texts

pytestmark = pytest.mark.integration
EMBEDDER = "all-MiniLM-L6-v2"
IDENTITY = "raw-reranker"  # Identity activation, a 64-token maximum
MAX_INPUTS = 64


def readme_cohere_block() -> str:
    return the_block("docs/models.md", "python", "import cohere")


RERANKER = re.search(r'model="([^"]+)"', readme_cohere_block()).group(1)  # Sigmoid, as docs/models.md's example


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("rerankers")
    return {RERANKER: build_cross_encoder(root / "sigmoid", "sigmoid"),
            IDENTITY: build_cross_encoder(root / "identity", "identity", max_length=64, seed=12)}


@pytest.fixture(scope="module")
def predict(built):
    import torch
    from sentence_transformers import CrossEncoder

    models = {name: CrossEncoder(path, device="cpu") for name, path in built.items()}

    def run(name: str, documents: list[str], query: str = QUERY, raw: bool = False) -> np.ndarray:
        kwargs = {"activation_fn": torch.nn.Identity()} if raw else {}
        return models[name].predict([(query, d) for d in documents], **kwargs)

    return run


@pytest.fixture(scope="module", autouse=True)
def app(serve_app, built):
    models = [{"name": EMBEDDER, "source": "bundled"},
              {"name": RERANKER, "source": built[RERANKER], "task": "rerank"},
              {"name": IDENTITY, "source": built[IDENTITY], "task": "rerank"}]
    # float32: scores are held to sentence-transformers' within 1e-5.
    return serve_app(lambda config: set_env(config, models=json.dumps(models), dtype="float32",
                                            max_inputs_per_request=MAX_INPUTS))


def rerank(client, **body) -> dict:
    response = client.post("/v1/rerank", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def by_index(results: list[dict], key: str = "relevance_score") -> np.ndarray:
    scores = np.full(len(results), np.nan, dtype=np.float64)
    for r in results:
        scores[r["index"]] = r[key]
    return scores


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("name", [RERANKER, IDENTITY])
def test_scores_are_cross_encoder_predicts_within_1e_5(client, predict, name):
    documents = [*DOCUMENTS, LONG_DOCUMENT]  # the long one cut to fit, longest first, by both
    body = rerank(client, model=name, query=QUERY, documents=documents, truncate=True)
    assert body["model"] == name and len(body["results"]) == len(documents)
    assert np.abs(by_index(body["results"]) - predict(name, documents)).max() <= 1e-5


def test_results_are_sorted_by_score_and_top_n_keeps_the_best(client, predict):
    want = predict(RERANKER, DOCUMENTS)
    body = rerank(client, model=RERANKER, query=QUERY, documents=DOCUMENTS, top_n=2, return_documents=True)
    assert [r["index"] for r in body["results"]] == list(np.argsort(-want, kind="stable")[:2])
    assert [r["document"]["text"] for r in body["results"]] == [DOCUMENTS[r["index"]] for r in body["results"]]
    everything = rerank(client, model=RERANKER, query=QUERY, documents=DOCUMENTS, top_n=50)["results"]
    scores = [r["relevance_score"] for r in everything]
    assert len(everything) == len(DOCUMENTS) and scores == sorted(scores, reverse=True)
    assert "document" not in everything[0]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > 0


def test_teis_shape_gives_scores_or_raw_logits_and_texts(client, predict):
    response = client.post("/rerank", json={"model": RERANKER, "query": QUERY, "texts": DOCUMENTS, "return_text": True})
    assert response.status_code == 200, response.text
    ranks = response.json()
    assert np.abs(by_index(ranks, "score") - predict(RERANKER, DOCUMENTS)).max() <= 1e-5
    assert [r["text"] for r in ranks] == [DOCUMENTS[r["index"]] for r in ranks]
    raw = client.post("/rerank", json={"model": RERANKER, "query": QUERY, "texts": DOCUMENTS, "raw_scores": True}).json()
    assert np.abs(by_index(raw, "score") - predict(RERANKER, DOCUMENTS, raw=True)).max() <= 1e-5
    assert "text" not in raw[0]
    # TEI's clients name no model: with two rerank models served, that is a 400 that lists them.
    several = error_of(client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS}), 400)
    assert RERANKER in several["message"] and IDENTITY in several["message"]


def test_an_over_long_pair_is_a_context_length_400_unless_truncate(client, predict):
    error = error_of(client.post("/v1/rerank", json={"model": IDENTITY, "query": QUERY,
                                                     "documents": [DOCUMENTS[0], LONG_DOCUMENT]}), 400)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "documents")
    assert "documents[1]" in error["message"] and "64" in error["message"]
    tei = error_of(client.post("/rerank", json={"model": IDENTITY, "query": QUERY, "texts": [LONG_DOCUMENT]}), 400)
    assert tei["param"] == "texts" and "texts[0]" in tei["message"]
    body = rerank(client, model=IDENTITY, query=QUERY, documents=[LONG_DOCUMENT], truncate=True)
    assert abs(body["results"][0]["relevance_score"] - predict(IDENTITY, [LONG_DOCUMENT])[0]) <= 1e-5


def test_a_model_of_the_other_task_is_a_400_saying_where_it_is_served(client):
    wrong = error_of(client.post("/v1/rerank", json={"model": EMBEDDER, "query": QUERY, "documents": DOCUMENTS}), 400)
    assert wrong["code"] == "wrong_model_task" and "/v1/embeddings" in wrong["message"]
    other = error_of(client.post("/v1/embeddings", json={"model": RERANKER, "input": QUERY}), 400)
    assert other["code"] == "wrong_model_task" and "/v1/rerank" in other["message"]
    embedded = client.post("/v1/embeddings", json={"model": EMBEDDER, "input": QUERY, "encoding_format": "float"})
    assert embedded.status_code == 200 and len(embedded.json()["data"][0]["embedding"]) == 384


def test_bad_rerank_requests_get_the_embeddings_errors(client):
    unknown = error_of(client.post("/v1/rerank", json={"model": "nope", "query": QUERY, "documents": ["a"]}), 404)
    assert unknown["code"] == "model_not_found"
    empty = error_of(client.post("/v1/rerank", json={"model": RERANKER, "query": QUERY, "documents": []}), 400)
    assert (empty["param"], empty["code"]) == ("documents", "empty_input")
    many = error_of(client.post("/v1/rerank", json={"model": RERANKER, "query": QUERY,
                                                    "documents": ["a doc"] * (MAX_INPUTS + 1)}), 413)
    assert many["code"] == "too_many_inputs"
    assert error_of(client.post("/v1/rerank", json={"model": RERANKER, "query": " ", "documents": ["a"]}), 400)[
        "param"] == "query"
    assert error_of(client.post("/v1/rerank", json={"model": RERANKER, "query": QUERY, "documents": ["a"],
                                                    "top_n": 0}), 400)["param"] == "top_n"
    assert error_of(client.post("/v1/rerank", json={"model": RERANKER, "query": QUERY, "documents": [1, 2]}), 400)
    assert error_of(client.post("/v1/rerank", content=b"{not json", headers={"content-type": "application/json"}), 400)


def test_models_lists_each_models_task(client):
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert {name: card["task"] for name, card in cards.items()} == {
        EMBEDDER: "embed", RERANKER: "rerank", IDENTITY: "rerank"}
    assert cards[IDENTITY]["max_input_tokens"] == 64 and cards[IDENTITY]["dimensions"] is None
    assert cards[EMBEDDER]["dimensions"] == 384


def test_concurrent_requests_share_forwards_and_keep_their_scores(client, predict):
    """Batch invariance: 16 requests at once, 8 at a time, of documents of every length, each against its own
    reference run alone."""
    texts = mixed_texts(64, seed=4)
    requests = [texts[i * 4: i * 4 + 1 + i % 4] for i in range(16)]

    def post(documents):
        return by_index(rerank(client, model=RERANKER, query=QUERY, documents=documents, truncate=True)["results"])

    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(post, requests))
    for documents, scores in zip(requests, got):
        assert np.abs(scores - predict(RERANKER, documents)).max() <= 1e-5


def prometheus_counter(client, name: str, model: str) -> float:
    """A counter's value in /metrics: it counts since the metrics actor started, whatever the resets."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples
               if s.name == name and s.labels == {"model": model})


def test_rerank_requests_and_pairs_are_counted_per_model(client):
    assert client.post("/v1/performance/reset").status_code == 200
    pairs_before = prometheus_counter(client, "embserve_rerank_pairs_total", IDENTITY)
    requests_before = prometheus_counter(client, "embserve_rerank_requests_total", IDENTITY)
    for _ in range(3):
        rerank(client, model=IDENTITY, query=QUERY, documents=DOCUMENTS)
    # Pairs are counted at admission, inputs when their forward ends: the two may come in different reports.
    deadline = time.time() + 10
    while True:
        perf = client.get("/v1/performance").json()
        if (perf["totals"]["rerank_pairs"] >= 15 and perf["totals"]["inputs"] >= 15) or time.time() > deadline:
            break
        time.sleep(0.25)
    totals = perf["models"][IDENTITY]["totals"]
    assert (totals["rerank_requests"], totals["rerank_pairs"], totals["inputs"]) == (3, 15, 15)
    assert perf["totals"]["rerank_requests"] == 3
    assert perf["http"]["requests_by_status"] == {"200": 3}
    # Earlier tests reranked with this model too: /metrics adds this test's pairs on top of theirs.
    assert prometheus_counter(client, "embserve_rerank_pairs_total", IDENTITY) == pairs_before + 15
    assert prometheus_counter(client, "embserve_rerank_requests_total", IDENTITY) == requests_before + 3


def test_cohere_clients_rerank_against_the_server(predict):
    import cohere
    import cohere.errors

    want = predict(RERANKER, DOCUMENTS)
    v1 = cohere.Client(base_url=BASE, api_key="unused").rerank(
        model=RERANKER, query=QUERY, documents=DOCUMENTS, top_n=3, return_documents=True)
    assert [r.index for r in v1.results] == list(np.argsort(-want, kind="stable")[:3])
    assert all(abs(r.relevance_score - want[r.index]) <= 1e-5 for r in v1.results)
    assert [r.document.text for r in v1.results] == [DOCUMENTS[r.index] for r in v1.results]
    v2 = cohere.ClientV2(base_url=BASE, api_key="unused").rerank(model=RERANKER, query=QUERY, documents=DOCUMENTS)
    assert [r.index for r in v2.results] == list(np.argsort(-want, kind="stable"))
    with pytest.raises(cohere.errors.BadRequestError) as err:
        cohere.Client(base_url=BASE, api_key="unused").rerank(model=EMBEDDER, query=QUERY, documents=DOCUMENTS)
    assert err.value.body["error"]["code"] == "wrong_model_task"


def test_the_readmes_cohere_example_runs_as_written(predict):
    namespace: dict = {"__name__": "readme"}
    block = readme_cohere_block().replace("http://127.0.0.1:8000", BASE)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(block, "docs/models.md (rerank)", "exec"), namespace)
    documents = re.search(r"documents=(\[.*?\])", readme_cohere_block(), re.S).group(1)
    documents = ast.literal_eval(documents)  # the page's own list
    want = predict(RERANKER, documents, query=re.search(r'query="([^"]+)"', readme_cohere_block()).group(1))
    lines = out.getvalue().splitlines()
    best = list(np.argsort(-want, kind="stable")[:2])
    assert [int(line.split()[0]) for line in lines] == best
    assert [line.split(" ", 2)[2] for line in lines] == [documents[i] for i in best]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_readmes_curl_rerank_examples_run():
    block = the_block("docs/models.md", "bash", "/v1/rerank")
    done = subprocess.run(["bash", "-c", block.replace("http://127.0.0.1:8000", BASE)], capture_output=True,
                          text=True, timeout=60)
    first, second = [json.loads(line) for line in re.findall(r"^[\[{].*$", done.stdout.replace("}{", "}\n{"), re.M)]
    assert first["model"] == RERANKER and len(first["results"]) == 1
    assert "several rerank models" in second["error"]["message"]  # as docs/models.md says: two are served here
