"""A sentence-transformers model beyond mean pooling (CLS, a Dense layer, Normalize, prompts), built here from
the bundled one and served from the shipped serve_config.yaml through real HTTP: its vectors are its own encode's,
prompt_name picks its prompts, and a model embserve cannot compute exactly never starts."""

import contextlib
import io
import re

import numpy as np
import pytest
import torch
from openai import BadRequestError, OpenAI

from embserve.engine.model import resolve_source
from tests.doc_blocks import the_block
from tests.integration.conftest import BASE, deploy, load_config, set_env

pytestmark = pytest.mark.integration
TEXTS = ["The cat sits on the mat.", "Where is the nearest train station?"]


def readme_block() -> str:
    """docs/models.md's python example of prompt_name (section "One model")."""
    return the_block("docs/models.md", "python", "prompt_name")


MODEL = re.search(r'model="([^"]+)"', readme_block()).group(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """CLS pooling, a Dense layer of random weights to 64 dimensions (Tanh), Normalize, and e5-style prompts
    with `passage` as the default: saved as sentence-transformers saves a model."""
    from sentence_transformers import SentenceTransformer, models

    path = tmp_path_factory.mktemp("st-dense")
    torch.manual_seed(3)
    modules = [models.Transformer(resolve_source("bundled")), models.Pooling(384, pooling_mode="cls"),
               models.Dense(384, 64), models.Normalize()]
    SentenceTransformer(modules=modules, prompts={"query": "query: ", "passage": "passage: "},
                        default_prompt_name="passage", device="cpu").save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def st(model_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    return lambda texts, **kw: model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, **kw)


@pytest.fixture(scope="module", autouse=True)
def app(serve_app, model_dir):
    # float32: the vectors are held to sentence-transformers' within 1e-5.
    return serve_app(lambda config: set_env(config, model=model_dir, model_name=MODEL, dtype="float32"))


@pytest.fixture(scope="module")
def oai() -> OpenAI:
    return OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_vectors_are_the_models_own_encode_with_its_default_prompt(oai, st):
    got = vectors(oai.embeddings.create(model=MODEL, input=TEXTS))
    assert got.shape == (2, 64)
    assert np.abs(got - st(TEXTS)).max() <= 1e-5  # the default prompt, "passage: ", applied


def test_prompt_name_picks_the_models_prompt(oai, st):
    got = vectors(oai.embeddings.create(model=MODEL, input=TEXTS, extra_body={"prompt_name": "query"}))
    assert np.abs(got - st(TEXTS, prompt_name="query")).max() <= 1e-5
    assert np.abs(got - st(TEXTS)).max() > 1e-3  # not the default prompt's vectors


def test_token_ids_get_the_prompt_too(client, st, model_dir):
    from transformers import AutoTokenizer

    ids = [AutoTokenizer.from_pretrained(model_dir)(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    body = client.post("/v1/embeddings", json={"model": MODEL, "input": ids, "prompt_name": "query",
                                               "encoding_format": "float"}).json()
    assert np.abs(np.array([d["embedding"] for d in body["data"]]) - st(TEXTS, prompt_name="query")).max() <= 1e-5


def test_prompt_tokens_count_in_usage(client, model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    body = client.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[0], "prompt_name": "query"}).json()
    assert body["usage"]["prompt_tokens"] == len(tokenizer("query: " + TEXTS[0])["input_ids"])


def test_dimensions_cut_the_dense_output(oai, st):
    got = vectors(oai.embeddings.create(model=MODEL, input=TEXTS, dimensions=16))
    full = st(TEXTS)[:, :16]
    assert np.abs(got - full / np.linalg.norm(full, axis=1, keepdims=True)).max() <= 1e-5


def test_models_lists_the_dense_output_size(oai):
    assert oai.models.retrieve(MODEL).model_dump()["dimensions"] == 64


def test_unknown_prompt_name_is_400_in_openai_shape_listing_the_prompts(oai, client):
    with pytest.raises(BadRequestError) as err:
        oai.embeddings.create(model=MODEL, input="x", extra_body={"prompt_name": "search_query"})
    assert err.value.body["param"] == "prompt_name" and err.value.body["code"] == "unknown_prompt_name"
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": "x", "prompt_name": "search_query"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "'query'" in error["message"] and "'passage'" in error["message"]


def test_the_readmes_prompt_name_example_runs(oai, st):
    namespace: dict = {"__name__": "readme"}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        # As docs/models.md has it, pointed at this session's server (tests run Serve on a free port).
        exec(compile(readme_block().replace("http://127.0.0.1:8000", BASE), "docs/models.md (prompt_name)", "exec"),
             namespace)
    query, passages = namespace["query"], namespace["passages"]
    assert np.abs(vectors(query) - st([query_text()], prompt_name="query")).max() <= 1e-5
    assert vectors(passages).shape[1] == 64
    assert out.getvalue().split() == ["64", str(query.usage.prompt_tokens)]


def query_text() -> str:
    """The example's query."""
    return re.search(r'input="([^"]+)"', readme_block()).group(1)


def test_a_pipeline_embserve_cannot_compute_exactly_fails_the_start_saying_why(ray_cluster, model_dir, tmp_path):
    import json
    import shutil

    refused = tmp_path / "weightedmean"
    shutil.copytree(model_dir, refused)
    (refused / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 384,
                                                                 "pooling_mode": "weightedmean"}))
    config = load_config()
    set_env(config, model=str(refused), model_name=MODEL)
    with pytest.raises(RuntimeError, match="UnsupportedModel.*'weightedmean' pooling, which embserve does not implement"):
        deploy(config, timeout_s=240)
