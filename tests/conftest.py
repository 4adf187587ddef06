"""Shared fixtures: the real bundled model, loaded once per session (no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

from embserve.model import EmbeddingModel, resolve_source  # noqa: E402
from embserve.settings import ModelSpec  # noqa: E402


@pytest.fixture(scope="session")
def bundled_model() -> EmbeddingModel:
    return EmbeddingModel(ModelSpec(name="all-MiniLM-L6-v2"), device="cpu")


@pytest.fixture(scope="session")
def reference():
    """sentence-transformers' own encode of the same model: the vectors we must match."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(resolve_source("bundled"), device="cpu")
    return lambda texts: st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
