"""Shared fixtures: the real bundled model, loaded once per session (no downloads); Serve's environment."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The tests' Ray runs Serve as `./run.sh serve` does: the fast path, before anything imports Ray.
# An ingress replica that leaves waits this long for HAProxy to stop sending it requests (Ray's default
# of 30 s is for load balancers in front of many nodes; HAProxy on the same node notices in about 1 s).
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")

from embserve.launch import serve_env  # noqa: E402

serve_env.apply()

import pytest  # noqa: E402

from embserve.engine.model import EmbeddingModel, resolve_source  # noqa: E402
from embserve.settings import ModelSpec  # noqa: E402


@pytest.fixture(scope="session")
def bundled_model() -> EmbeddingModel:
    """As a replica loads it by default: dtype auto (bf16 autocast on a CPU with native bf16)."""
    return EmbeddingModel(ModelSpec(name="all-MiniLM-L6-v2"), device="cpu")


@pytest.fixture(scope="session")
def float32_model() -> EmbeddingModel:
    """dtype float32 explicitly: the path that equals sentence-transformers within 1e-5."""
    return EmbeddingModel(ModelSpec(name="all-MiniLM-L6-v2"), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def bf16_model() -> EmbeddingModel:
    """dtype bfloat16 explicitly: bf16 autocast on any CPU, so its contract is tested on every machine."""
    return EmbeddingModel(ModelSpec(name="all-MiniLM-L6-v2"), device="cpu", dtype="bfloat16")


@pytest.fixture(scope="session")
def reference():
    """sentence-transformers' own encode of the same model: the vectors we must match."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(resolve_source("bundled"), device="cpu")
    return lambda texts: st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
