"""The clients users come with, run against the real service: the README's curl and openai client examples, and
docs/clients.md's recipes for LangChain's OpenAIEmbeddings and LlamaIndex's OpenAILikeEmbedding, executed as written
there."""

import contextlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from openai import OpenAI

from tests.doc_blocks import fenced_blocks
from tests.integration.conftest import BASE, set_env

pytestmark = pytest.mark.integration
MODEL = "all-MiniLM-L6-v2"
README = Path(__file__).resolve().parents[2] / "README.md"
DOCUMENTS = ["The cat sits on the mat.", "A dog runs."]
QUERY = "Where is the cat?"


@pytest.fixture(scope="module", autouse=True)
def app(serve_app):
    # float32, as test_api does: the README's printed vector is the float32 one.
    return serve_app(lambda config: set_env(config, dtype="float32"))


@pytest.fixture(scope="module")
def oai() -> OpenAI:
    return OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0)


def readme_blocks(language: str) -> list[str]:
    """The blocks of the README (curl, the openai client) and of docs/clients.md (the other clients' recipes)."""
    return [b for path in ("README.md", "docs/clients.md") for b in fenced_blocks(path, language)]


README_BASE = "http://127.0.0.1:8000"


def readme_python(marker: str, base: str = BASE) -> str:
    """The python block (README or docs/clients.md) that contains `marker`, pointed at this session's server."""
    [block] = [b for b in readme_blocks("python") if marker in b]
    return block.replace(README_BASE, base)


def run_readme_python(marker: str) -> tuple[dict, str]:
    """Execute the python block that contains `marker`; its globals and what it printed."""
    namespace: dict = {"__name__": "readme"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_python(marker), f"README.md or docs/clients.md ({marker})", "exec"), namespace)
    return namespace, out.getvalue()


def assert_same_vectors(got, want):
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5


def openai_vectors(oai: OpenAI, texts: list[str]) -> list[list[float]]:
    return [d.embedding for d in oai.embeddings.create(model=MODEL, input=texts).data]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_readmes_curl_example_prints_what_the_readme_shows():
    [command] = [b for b in readme_blocks("bash") if b.lstrip().startswith("curl")]
    [shown] = [b for b in readme_blocks("json") if '"embedding"' in b]
    done = subprocess.run(["bash", "-c", command.replace(README_BASE, BASE)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    got, want = json.loads(done.stdout), json.loads(shown)
    assert {k: v for k, v in got.items() if k != "data"} == {k: v for k, v in want.items() if k != "data"}
    [g], [w] = got["data"], want["data"]
    assert {k: v for k, v in g.items() if k != "embedding"} == {k: v for k, v in w.items() if k != "embedding"}
    assert len(g["embedding"]) == len(w["embedding"]) == 4
    # The README shows this box's default, bf16, and gives float32's first figures in a sentence: this module
    # runs float32, which must give those to 1e-5, and the bf16 vector shown must keep the bf16 contract.
    float32 = re.search(r"in\s+float32 the curl example gives `([-0-9., ]+), \.\.\.`", README.read_text())
    want32 = [float(x) for x in float32.group(1).split(",")]
    assert np.abs(np.array(g["embedding"][: len(want32)]) - want32).max() <= 1e-5, done.stdout
    assert float(np.dot(g["embedding"], w["embedding"])) >= 0.9999  # both unit vectors: their cosine


def test_the_readmes_openai_client_example_prints_what_the_readme_shows(oai):
    namespace, printed = run_readme_python("from openai import OpenAI")
    block = readme_python("from openai import OpenAI")
    shown = re.search(r"from openai import OpenAI.*?```\n```\n(.*?)```", README.read_text(), re.S).group(1)
    want_lines, got_lines = shown.strip().splitlines(), printed.strip().splitlines()
    assert got_lines[0] == want_lines[0]
    # The README's figures may come from a default-dtype run (bf16 autocast where the CPU has it), this
    # module's replicas run float32: within the bf16 contract's 2e-3.
    assert np.allclose(eval(got_lines[1]), eval(want_lines[1]), atol=2e-3)
    texts = re.search(r"input=(\[.*?\])", block).group(1)
    assert_same_vectors([d.embedding for d in namespace["response"].data], openai_vectors(oai, eval(texts)))


def test_the_readmes_langchain_recipe_gives_the_openai_clients_vectors(oai):
    namespace, printed = run_readme_python("from langchain_openai import")
    assert printed.strip() == "2 384"
    assert namespace["embeddings"].check_embedding_ctx_length is False
    assert_same_vectors(namespace["vectors"], openai_vectors(oai, DOCUMENTS))
    assert_same_vectors(namespace["query"], openai_vectors(oai, [QUERY])[0])


def test_the_readmes_llamaindex_recipe_gives_the_openai_clients_vectors(oai):
    namespace, printed = run_readme_python("from llama_index.embeddings.openai_like import")
    assert printed.strip() == "2 384"
    assert_same_vectors(namespace["vectors"], openai_vectors(oai, DOCUMENTS))
    assert_same_vectors(namespace["query"], openai_vectors(oai, [QUERY])[0])


def test_the_recipes_embed_the_texts_the_test_compares():
    for marker in ("from langchain_openai import", "from llama_index.embeddings.openai_like import"):
        block = readme_python(marker, base=README_BASE)
        assert repr(DOCUMENTS).replace("'", '"') in block and f'"{QUERY}"' in block
        assert 'base_url="http://127.0.0.1:8000/v1"' in block or 'api_base="http://127.0.0.1:8000/v1"' in block


def test_tiktoken_ids_past_the_vocabulary_get_a_400_that_names_the_langchain_fix(client):
    # What OpenAIEmbeddings sends by default: cl100k_base ids, here "<|endoftext|>" (100257) among them.
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": [[9906, 1917, 100257]]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_token_id" and error["param"] == "input"
    assert "100257" in error["message"] and "30522" in error["message"]
    assert "OpenAIEmbeddings" in error["message"] and "check_embedding_ctx_length=False" in error["message"]
