"""Fixtures for the unit tests."""

import os

import pytest


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No EMB_PROVIDER_* from the developer's shell and no .env of the checkout leak into a test; the
    working directory is an empty folder of its own (returned), where a test may write a .env."""
    for name in list(os.environ):
        if name.upper().startswith("EMB_PROVIDER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


POISON = "banana"  # the one word whose embedding row the nan_model's weights make NaN


@pytest.fixture(scope="session")
def nan_model():
    """The bundled model in float32 with one embedding row set to NaN: any input holding POISON comes out
    NaN, every other input exactly as from the unpoisoned model. A model of its own, never the shared one."""
    import torch

    from embserve.engine.model import EmbeddingModel
    from embserve.settings import ModelSpec

    model = EmbeddingModel(ModelSpec(name="all-MiniLM-L6-v2"), device="cpu", dtype="float32")
    row = model.tokenizer.convert_tokens_to_ids(POISON)
    with torch.no_grad():
        model.model.get_input_embeddings().weight[row] = float("nan")
    return model
