"""`revision` and `trust_remote_code` reach every file the model loads: from settings, for a folder and a hub id."""

from __future__ import annotations

import json
from pathlib import Path

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
    """`trust_remote_code` reaches each loader too. It runs a model's own code from the hub, and no such model is
    at hand offline, so here the loaders are recorded, not run; the revision's real path is the test below."""
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


HUB_LOAD = """
import json, sys
from embserve.engine.model import EmbeddingModel
from embserve.settings import ModelSpec
revision = sys.argv[1] or None
try:
    model = EmbeddingModel(ModelSpec(name="m", source="org/some-model", revision=revision), device="cpu",
                           dtype="float32")
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
else:
    print(json.dumps({"pooling": model.pooling, "vector": model.forward([[101, 7592, 2088, 102]])[0].tolist()}))
"""


def test_a_hub_id_at_a_tag_loads_that_snapshot_from_the_hub_cache_offline(tmp_path):
    """The real path for a hub id: Hugging Face's cache, offline, holding one snapshot of org/some-model under the
    tag v2 only (no `main`), whose pooling is CLS where the bundled model's is mean. With `revision: v2` every file
    (config, tokenizer, weights, sentence-transformers files) resolves to that snapshot; without it nothing does."""
    import os
    import subprocess
    import sys

    bundled = Path(resolve_source("bundled"))
    repo = tmp_path / "hub" / "models--org--some-model"
    commit = "0" * 39 + "1"
    snapshot = repo / "snapshots" / commit
    (snapshot / "1_Pooling").mkdir(parents=True)
    for file in bundled.rglob("*"):
        if file.is_file() and file.relative_to(bundled) != Path("1_Pooling/config.json"):
            (snapshot / file.relative_to(bundled)).symlink_to(file)
    pooling = json.loads((bundled / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (snapshot / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (repo / "refs").mkdir()
    (repo / "refs" / "v2").write_text(commit)

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def load(revision: str) -> dict:
        done = subprocess.run([sys.executable, "-c", HUB_LOAD, revision], env=env, capture_output=True, text=True,
                              timeout=300, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    at_tag = load("v2")
    assert at_tag.get("pooling") == "cls", at_tag
    bundled_model = EmbeddingModel(ModelSpec(name="all-MiniLM-L6-v2"), device="cpu", dtype="float32")
    cls = EmbeddingModel(ModelSpec(name="all-MiniLM-L6-v2", pooling="cls"), device="cpu", dtype="float32")
    ids = [[101, 7592, 2088, 102]]
    assert np.allclose(at_tag["vector"], cls.forward(ids)[0], atol=1e-6)
    assert not np.allclose(at_tag["vector"], bundled_model.forward(ids)[0], atol=1e-3)  # its own pooling, not ours
    missing = load("")
    assert "cached files" in missing.get("error", ""), missing  # without the tag the cache has no snapshot
