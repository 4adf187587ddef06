"""The OpenVINO runtime: the same vectors as sentence-transformers in float32 on the bundled model and on pipelines
with Dense layers, other poolings and prompts; bf16 within the bf16 contract; the runtime choice; a model that
does not convert served by torch; the on-disk cache of converted models, corrupt entries included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embserve.engine import openvino_runtime as ovr
from embserve.engine.cpu_memory import OPENVINO_CACHE_ENTRIES
from embserve.engine.model import EmbeddingModel, resolve_source
from embserve.settings import ModelSpec
from tests.unit.test_cpu_memory import assert_trims_after_a_forward
from tests.unit.test_pipeline import PROMPTS, TEXTS, _build

pytest.importorskip("openvino")

MIXED = [*TEXTS, "short", "A much longer passage about search: " + "ranking relevant documents first " * 12]


def ids_of(model: EmbeddingModel, texts: list[str], prompt_name: str | None = None) -> list[list[int]]:
    tok = model.request_tokenizer()
    prompt = tok.prompt(prompt_name)
    return [tok.finish(c, i, True, prompt) for i, c in enumerate(tok.content_ids(tok.model_texts(texts, prompt)))]


def openvino_model(tmp_path: Path, source: str = "bundled", dtype: str = "float32", **spec) -> EmbeddingModel:
    model = EmbeddingModel(ModelSpec(name="m", source=source, **spec), device="cpu", dtype=dtype,
                           runtime="openvino", streams=2, threads=2, cache_dir=str(tmp_path / "ov-cache"))
    assert model.runtime == "openvino", model.runtime_reason
    return model


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ov")


@pytest.fixture(scope="module")
def bundled_ov(cache) -> EmbeddingModel:
    return openvino_model(cache)


@pytest.fixture(scope="module")
def st_bundled():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_source("bundled"), device="cpu")


def test_float32_openvino_is_sentence_transformers_within_1e_5_alone_and_in_mixed_groups(bundled_ov, st_bundled):
    expected = st_bundled.encode(MIXED, convert_to_numpy=True, normalize_embeddings=True)
    ids = ids_of(bundled_ov, MIXED)
    together = bundled_ov.forward(ids)  # one padded group: the attention mask matters
    alone = np.stack([bundled_ov.forward([seq])[0] for seq in ids])  # no padding at all
    assert np.abs(together - expected).max() <= 1e-5
    assert np.abs(alone - expected).max() <= 1e-5
    assert bundled_ov.info.dtype == "float32" and bundled_ov.encoder.precision == "f32"


def test_forwards_from_several_threads_at_once_each_get_their_own_answer(bundled_ov):
    import concurrent.futures

    ids = ids_of(bundled_ov, MIXED)
    expected = [bundled_ov.forward([seq])[0] for seq in ids]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # more callers than infer requests: they wait
        got = list(pool.map(lambda seq: bundled_ov.forward([seq])[0], ids * 4))
    assert all(np.array_equal(g, expected[k % len(ids)]) for k, g in enumerate(got))


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ov-st-models")
    return {
        "cls-dense-normalize": _build(root / "a", "cls", [(384, 64, torch.nn.Tanh(), True)], True, PROMPTS, "passage"),
        "max-two-dense": _build(root / "b", "max", [(384, 48, None, False), (48, 24, torch.nn.ReLU(), True)], False,
                                {"query": "query: "}),
        "last-token": _build(root / "c", "lasttoken", [], True),
    }


@pytest.mark.parametrize("name", ["cls-dense-normalize", "max-two-dense", "last-token"])
def test_pipelines_with_dense_poolings_and_prompts_match_encode_within_1e_5(pipelines, cache, name):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(pipelines[name], device="cpu")
    model = openvino_model(cache, pipelines[name], normalize=False)
    for prompt_name in (None, "query"):
        expected = st.encode(MIXED, prompt_name=prompt_name, convert_to_numpy=True)
        got = model.forward(ids_of(model, MIXED, prompt_name))
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5, (name, prompt_name)


def test_bf16_precision_keeps_the_bf16_contract(cache, st_bundled):
    """OpenVINO at bf16 precision (emulated, and slow, on a CPU without bf16 units: few inputs here)."""
    model = openvino_model(cache, dtype="bfloat16")
    assert model.encoder.precision == "bf16" and model.info.dtype == "bfloat16"
    texts = MIXED[:4]
    expected = st_bundled.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    ids = ids_of(model, texts)
    together = model.forward(ids)
    alone = np.stack([model.forward([seq])[0] for seq in ids])
    assert (together * expected).sum(axis=1).min() >= 0.9999
    assert np.abs(together - alone).max() <= 2e-3  # batch invariance


@pytest.mark.parametrize(("setting", "device", "f32", "installed", "expected"), [
    ("auto", "cpu", True, True, "openvino"),
    ("auto", "cpu", True, False, "torch"),
    ("auto", "cuda", True, True, "torch"),
    ("auto", "cpu", False, True, "torch"),
    ("torch", "cpu", True, True, "torch"),
    ("openvino", "cpu", True, True, "openvino"),
])
def test_runtime_choice(setting, device, f32, installed, expected):
    runtime, why = ovr.choose_runtime(setting, device, f32, installed)
    assert runtime == expected and why


@pytest.mark.parametrize(("device", "f32", "installed", "why"), [
    ("cuda", True, True, "runs on a CPU"), ("cpu", True, False, "not installed"), ("cpu", False, True, "float32"),
])
def test_an_explicit_openvino_that_cannot_run_is_refused_saying_why(device, f32, installed, why):
    with pytest.raises(ValueError, match=why):
        ovr.choose_runtime("openvino", device, f32, installed)


def test_the_precision_is_always_explicit_and_streams_follow_the_forward_workers():
    assert ovr.precision_hint(False) == "f32" and ovr.precision_hint(True) == "bf16"
    props = ovr.compile_properties("f32", streams=2, threads=2)
    assert props["INFERENCE_PRECISION_HINT"] == "f32" and props["NUM_STREAMS"] == "2"
    assert props["INFERENCE_NUM_THREADS"] == "2"


def test_the_per_shape_executor_cache_is_bounded_unless_asked_for_openvinos_own():
    assert ovr.compile_properties("f32", 1, 1)[ovr.RUNTIME_CACHE_KEY] == str(OPENVINO_CACHE_ENTRIES)
    assert ovr.RUNTIME_CACHE_KEY not in ovr.compile_properties("f32", 1, 1, cache_entries=None)


def test_the_encoder_is_compiled_with_the_cache_bound_and_openvino_reads_that_key(bundled_ov, cache):
    import openvino as ov

    properties = bundled_ov.encoder.properties
    assert properties[ovr.RUNTIME_CACHE_KEY] == str(OPENVINO_CACHE_ENTRIES)
    # The CPU plugin cannot report this property back from a compiled model, but it refuses at compile a key it does
    # not read and a value that is not a count: the compile that made the encoder took the bound.
    model = ovr.read_cached(next((cache / "ov-cache").iterdir()))
    core = ov.Core()
    with pytest.raises(Exception, match="Unsupported property CPU_RUNTIME_CACHE_CAPACTY"):
        core.compile_model(model, "CPU", {**properties, "CPU_RUNTIME_CACHE_CAPACTY": "64"})
    with pytest.raises(Exception, match="Wrong value lots for property key CPU_RUNTIME_CACHE_CAPACITY"):
        core.compile_model(model, "CPU", {**properties, ovr.RUNTIME_CACHE_KEY: "lots"})


def test_an_openvino_model_trims_the_heap_after_its_forwards(bundled_ov):
    assert_trims_after_a_forward(bundled_ov)


class FrozenScale(torch.nn.Module):
    """Reads a value with `.item()`: torch computes it anew each time, a trace freezes the example's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(30522, 8)

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        scale = float(attention_mask.sum().item())
        return SimpleNamespace(last_hidden_state=self.embed(input_ids) * scale)


def test_a_conversion_that_froze_a_value_of_its_trace_is_caught_before_it_serves():
    module = FrozenScale().eval()
    converted = ovr.convert(module, ovr.example_inputs(30522, 0))
    with pytest.raises(ovr.ConversionMismatch, match="differ"):
        ovr.check_conversion(converted, module, 30522, 0)


def test_a_faithful_conversion_passes_the_check(bundled_ov):
    from transformers import AutoModel

    module = AutoModel.from_pretrained(resolve_source("bundled")).eval()
    converted = ovr.convert(module, ovr.example_inputs(30522, 0))
    ovr.check_conversion(converted, module, 30522, 0)  # no exception


UNCONVERTIBLE = '''
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput


class Cfg(PretrainedConfig):
    model_type = "untraceable"

    def __init__(self, vocab_size=30522, hidden_size=16, max_position_embeddings=64, **kw):
        super().__init__(**kw)
        self.vocab_size, self.hidden_size, self.max_position_embeddings = vocab_size, hidden_size, max_position_embeddings


class Model(PreTrainedModel):
    config_class = Cfg

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kw):
        # A Bessel function: torch runs it, OpenVINO has no conversion for it.
        return BaseModelOutput(last_hidden_state=torch.i0(self.embed(input_ids)))
'''


@pytest.fixture
def unconvertible(tmp_path) -> str:
    """A model of its own code (trust_remote_code) that OpenVINO cannot convert."""
    from transformers import AutoTokenizer

    folder = tmp_path / "untraceable"
    folder.mkdir()
    (folder / "modeling.py").write_text(UNCONVERTIBLE)
    AutoTokenizer.from_pretrained(resolve_source("bundled")).save_pretrained(folder)
    torch.manual_seed(0)
    import importlib.util

    spec = importlib.util.spec_from_file_location("untraceable_modeling", folder / "modeling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.Model(module.Cfg()).save_pretrained(folder)
    # save_pretrained writes its own config.json, without the code's whereabouts
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling.Cfg", "AutoModel": "modeling.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_a_model_that_does_not_convert_is_served_by_torch_with_the_reason(unconvertible, tmp_path):
    model = EmbeddingModel(ModelSpec(name="u", source=unconvertible, trust_remote_code=True), device="cpu",
                           dtype="float32", runtime="openvino", cache_dir=str(tmp_path / "cache"))
    assert model.runtime == "torch" and model.encoder is None
    assert "OpenVINO failed" in model.runtime_reason
    vectors = model.forward([[101, 2054, 102], [101, 102]])
    assert vectors.shape == (2, 16) and np.isfinite(vectors).all()


def test_any_failure_to_write_the_cache_costs_only_the_cache(tmp_path):
    """OpenVINO reports a failed write (a full disk) as a RuntimeError, not an OSError; here the write fails
    because what is saved is no OpenVINO model at all."""
    model, loaded = ovr.load_model(tmp_path / "entry", lambda: "converted")
    assert model == "converted" and "cache not writable" in loaded.how


def test_a_restart_reads_the_cached_conversion_and_gives_the_same_vectors(tmp_path):
    first = openvino_model(tmp_path)
    assert "converted, cached" in first.runtime_reason and first.model is None
    again = openvino_model(tmp_path)
    assert "cached IR" in again.runtime_reason
    ids = ids_of(first, MIXED)
    assert np.array_equal(first.forward(ids), again.forward(ids))


@pytest.mark.parametrize("damage", ["garbage xml", "flipped weight byte", "no manifest", "manifest not json"])
def test_a_corrupt_cache_entry_is_converted_again_never_fatal(tmp_path, damage):
    reference = openvino_model(tmp_path)
    [entry] = [p for p in (tmp_path / "ov-cache").iterdir() if p.is_dir()]
    if damage == "garbage xml":
        (entry / "model.xml").write_text("<net><not valid")
    elif damage == "flipped weight byte":
        data = bytearray((entry / "model.bin").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (entry / "model.bin").write_bytes(bytes(data))
    elif damage == "no manifest":
        (entry / "manifest.json").unlink()
    else:
        (entry / "manifest.json").write_text("{")
    rebuilt = openvino_model(tmp_path)
    assert "converted, cached" in rebuilt.runtime_reason
    ids = ids_of(rebuilt, MIXED)
    assert np.array_equal(rebuilt.forward(ids), reference.forward(ids))
    assert "cached IR" in openvino_model(tmp_path).runtime_reason  # and the entry is whole again


def test_a_cache_that_cannot_be_written_costs_only_the_conversion(tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    model = EmbeddingModel(ModelSpec(name="m"), device="cpu", dtype="float32", runtime="openvino",
                           cache_dir=str(blocked))
    assert model.runtime == "openvino" and "cache not writable" in model.runtime_reason


def test_no_cache_dir_converts_every_time(tmp_path):
    model = EmbeddingModel(ModelSpec(name="m"), device="cpu", dtype="float32", runtime="openvino", cache_dir="")
    assert model.runtime == "openvino" and "no cache" in model.runtime_reason


def test_the_cache_key_follows_the_folders_files_and_the_versions(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(resolve_source("bundled"), folder)
    versions = {"openvino": "1", "torch": "2", "transformers": "3"}
    key = ovr.cache_key(str(folder), None, versions)
    assert key == ovr.cache_key(str(folder), None, dict(versions))
    assert key != ovr.cache_key(str(folder), "v2", versions)
    assert key != ovr.cache_key(str(folder), None, {**versions, "openvino": "9"})
    hub = ovr.cache_key("org/model", "main", versions, commit="a" * 40)
    assert hub != ovr.cache_key("org/model", "main", versions, commit="b" * 40)  # a push to the branch
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")
    assert key != ovr.cache_key(str(folder), None, versions)
