"""Several models in one application, routed by `model`: docs/models.md's example, with a tiny BERT built here
standing in for bge-small's weights, deployed as the page says on this 2-core machine."""

import concurrent.futures as cf
import time

import numpy as np
import pytest
import torch
import yaml
from openai import NotFoundError, OpenAI
from transformers import AutoTokenizer, BertConfig, BertModel

from embserve.engine.model import resolve_source
from tests.doc_blocks import the_block
from tests.integration.conftest import APP, BASE, set_env

pytestmark = pytest.mark.integration
MINILM = "all-MiniLM-L6-v2"
TINY = "bge-small"


def readme_models() -> list[dict]:
    """The models of docs/models.md's "Several models" example."""
    block = the_block("docs/models.md", "yaml", "models:")
    return yaml.safe_load(block)["args"]["models"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, 32-wide BERT with random weights and the bundled tokenizer, saved like any HF folder."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_source("bundled")).save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def config(serve_app, tiny_model_dir):
    def two_models(config):
        app = next(a for a in config["applications"] if a["name"] == APP)
        models = readme_models()
        assert [m["name"] for m in models] == [MINILM, TINY]
        models[1]["source"] = str(tiny_model_dir)
        app["args"]["models"] = models
        set_env(config, dtype="float32")  # the vectors below are compared with float32 references
    return serve_app(two_models)


@pytest.fixture(scope="module")
def oai() -> OpenAI:
    return OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0)


def tiny_reference(path, texts):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()
    with torch.inference_mode():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        cls = model(**batch).last_hidden_state[:, 0]
    return torch.nn.functional.normalize(cls, dim=1).numpy()


def test_models_lists_both_with_dimensions_and_max_lengths(oai):
    cards = {m.id: m.model_dump() for m in oai.models.list().data}
    assert set(cards) == {MINILM, TINY}
    assert (cards[MINILM]["dimensions"], cards[MINILM]["max_input_tokens"]) == (384, 256)
    assert (cards[TINY]["dimensions"], cards[TINY]["max_input_tokens"]) == (32, 128)
    assert cards[MINILM]["aliases"] == ["text-embedding-3-small"]


def test_each_request_reaches_its_own_model(oai, reference, tiny_model_dir):
    texts = ["route me to the right model", "a second sentence"]
    tiny = oai.embeddings.create(model=TINY, input=texts, encoding_format="float")
    mini = oai.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    assert tiny.model == TINY and mini.model == MINILM
    got_tiny = np.array([d.embedding for d in tiny.data])
    got_mini = np.array([d.embedding for d in mini.data])
    assert got_tiny.shape == (2, 32) and got_mini.shape == (2, 384)
    assert np.abs(got_tiny - tiny_reference(tiny_model_dir, texts)).max() <= 1e-5
    assert np.abs(got_mini - reference(texts)).max() <= 1e-5


def test_aliases_route_to_the_named_model(oai, reference):
    for alias in ("text-embedding-3-small",):
        response = oai.embeddings.create(model=alias, input="alias routing", encoding_format="float")
        assert response.model == MINILM
        assert np.abs(np.array(response.data[0].embedding) - reference(["alias routing"])[0]).max() <= 1e-5


def test_each_model_enforces_its_own_maximum_length(client):
    text = "word " * 200  # 202 tokens: fine for MiniLM (256), too long for the tiny model (128)
    assert client.post("/v1/embeddings", json={"model": MINILM, "input": text}).status_code == 200
    response = client.post("/v1/embeddings", json={"model": TINY, "input": text})
    assert response.status_code == 400 and "128" in response.json()["error"]["message"]


def test_unknown_model_is_404_in_openai_shape(oai):
    with pytest.raises(NotFoundError) as err:
        oai.embeddings.create(model="bge-small-2", input="x")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_performance_breaks_figures_down_per_model(client):
    client.post("/v1/performance/reset")

    def post(i):
        model = TINY if i % 3 == 0 else MINILM
        assert client.post("/v1/embeddings", json={"model": model, "input": f"text number {i}"}).status_code == 200

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(post, range(30)))
    deadline = time.time() + 10
    while True:
        perf = client.get("/v1/performance").json()
        if perf["totals"]["inputs"] >= 30 or time.time() > deadline:
            break
        time.sleep(0.25)
    assert perf["models"][TINY]["totals"]["inputs"] == 10
    assert perf["models"][MINILM]["totals"]["inputs"] == 20
    assert perf["totals"]["inputs"] == 30
    assert {r["model"] for r in perf["replicas"] if r["totals"]["inputs"]} == {TINY, MINILM}
