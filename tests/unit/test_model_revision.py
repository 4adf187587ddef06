"""`revision` and `trust_remote_code` reach every file the model loads: from settings, for a folder and a hub id."""

from __future__ import annotations

import numpy as np
import pytest

from embserve.engine.model import EmbeddingModel, resolve_source
from embserve.settings import ModelSpec, Settings


class StopLoading(Exception):
    pass


def test_settings_pass_revision_and_trust_remote_code_to_the_single_model(monkeypatch):
    monkeypatch.setenv("EMB_PROVIDER_REVISION", "v2.1")
    monkeypatch.setenv("EMB_PROVIDER_TRUST_REMOTE_CODE", "true")
    [spec] = Settings().model_specs()
    assert spec.revision == "v2.1" and spec.trust_remote_code is True


def test_by_default_no_revision_is_pinned_and_no_remote_code_runs():
    [spec] = Settings().model_specs()
    assert spec.revision is None and spec.trust_remote_code is False


def test_each_of_several_models_takes_its_own():
    settings = Settings(models=[{"name": "a", "source": "org/a", "revision": "abc123", "trust_remote_code": True},
                                {"name": "b", "source": "org/b"}])
    a, b = settings.model_specs()
    assert (a.revision, a.trust_remote_code) == ("abc123", True)
    assert (b.revision, b.trust_remote_code) == (None, False)


def test_a_hub_id_loads_config_tokenizer_weights_and_sentence_transformers_files_at_the_revision(monkeypatch):
    import huggingface_hub
    import transformers

    calls: list[tuple[str, str, dict]] = []

    def recorder(what: str, result=None, stop: bool = False):
        def fake(source, *args, **kwargs):
            calls.append((what, source, {**kwargs, **({"filename": args[0]} if args else {})}))
            if stop:
                raise StopLoading
            if result is None:
                raise OSError("not in this test's cache")  # what _read_json reads as "no such file"
            return result
        return fake

    config = type("Config", (), {"max_position_embeddings": 512, "hidden_size": 8, "vocab_size": 10})()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recorder("file"))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recorder("config", config))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("tokenizer", object()))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", recorder("model", stop=True))
    spec = ModelSpec(name="m", source="org/some-model", revision="abc123", trust_remote_code=True)
    with pytest.raises(StopLoading):
        EmbeddingModel(spec, device="cpu", dtype="float32")
    assert {what for what, _, _ in calls} == {"file", "config", "tokenizer", "model"}
    for what, source, kwargs in calls:
        assert source == "org/some-model"
        assert kwargs["revision"] == "abc123", what
        if what != "file":
            assert kwargs["trust_remote_code"] is True, what
    assert {k["filename"] for w, _, k in calls if w == "file"} >= {"modules.json", "sentence_bert_config.json"}


def test_a_local_folder_loads_as_it_is_whatever_the_revision():
    """transformers ignores `revision` for a folder: the same files, the same vectors."""
    pinned = EmbeddingModel(ModelSpec(name="all-MiniLM-L6-v2", source=resolve_source("bundled"),
                                      revision="no-such-tag"), device="cpu", dtype="float32")
    plain = EmbeddingModel(ModelSpec(name="all-MiniLM-L6-v2"), device="cpu", dtype="float32")
    ids = [[101, 7592, 2088, 102]]
    assert np.array_equal(pinned.forward(ids), plain.forward(ids))
