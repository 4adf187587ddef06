"""sentence-transformers pipelines beyond mean pooling (Pooling modes, Dense, Normalize) and prompts, on small
models built here from the bundled one, against sentence-transformers' own `encode`; and the models refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embserve.api.contracts import EmbedJob
from embserve.api.encode import apply_dimensions
from embserve.api.errors import InvalidRequest, UnsupportedModel
from embserve.engine.model import EmbeddingModel, build_dense, resolve_source
from embserve.engine.pipeline import SUPPORTED_PIPELINE, DenseSpec, read_pipeline
from embserve.engine.scheduler import ForwardLayout, Scheduler, embed_jobs
from embserve.settings import BatchingConfig, ModelSpec

TEXTS = ["The cat sits on the mat.", "Where is the nearest train station?",
         "Ray Serve batches requests by token length so that little compute goes to padding."]
PROMPTS = {"query": "query: ", "passage": "passage: "}


def _build(path: Path, pooling: str, dense: list[tuple[int, int, torch.nn.Module | None, bool]], normalize: bool,
           prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
           safe_serialization: bool = True) -> str:
    """A sentence-transformers model on the bundled transformer: `pooling`, Dense layers of random weights
    (in, out, activation, bias), Normalize or not, and prompts; saved as sentence-transformers saves it."""
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(7)
    modules = [models.Transformer(resolve_source("bundled")), models.Pooling(384, pooling_mode=pooling)]
    modules += [models.Dense(i, o, bias=bias, activation_function=act) for i, o, act, bias in dense]
    modules += [models.Normalize()] if normalize else []
    SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=default_prompt_name,
                        device="cpu").save(str(path), safe_serialization=safe_serialization)
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str]:
    """Three pipelines: CLS, Dense (Tanh) and Normalize, with a default prompt; max pooling through two Dense
    layers (no bias and Identity, then ReLU) without Normalize, weights as pytorch_model.bin; last-token pooling."""
    root = tmp_path_factory.mktemp("st-models")
    return {
        "cls-dense-normalize": _build(root / "a", "cls", [(384, 64, torch.nn.Tanh(), True)], True, PROMPTS, "passage"),
        "max-two-dense": _build(root / "b", "max", [(384, 48, None, False), (48, 24, torch.nn.ReLU(), True)], False,
                                {"query": "query: "}, safe_serialization=False),
        "last-token": _build(root / "c", "lasttoken", [], True),
    }


@pytest.fixture(scope="module")
def st_models(built):
    from sentence_transformers import SentenceTransformer

    return {name: SentenceTransformer(path, device="cpu") for name, path in built.items()}


@pytest.fixture(scope="module")
def served(built):
    """embserve's model and scheduler for each built model and `normalize` setting, in float32."""
    cache: dict[tuple[str, bool, str | None], Scheduler] = {}

    def get(name: str, normalize: bool = False, default_prompt_name: str | None = None) -> Scheduler:
        key = (name, normalize, default_prompt_name)
        if key not in cache:
            spec = ModelSpec(name=name, source=built[name], normalize=normalize,
                             default_prompt_name=default_prompt_name)
            model = EmbeddingModel(spec, device="cpu", dtype="float32")
            cache[key] = Scheduler(model, ForwardLayout(1, 1), config=lambda: BatchingConfig(), max_batch_tokens=8192)
        return cache[key]

    yield get
    for scheduler in cache.values():
        scheduler.close()


def _embed(scheduler: Scheduler, **job) -> np.ndarray:
    [result] = embed_jobs(scheduler, [EmbedJob(**job)])
    assert result.error is None, result.error
    return result.vectors


@pytest.mark.parametrize("name", ["cls-dense-normalize", "max-two-dense", "last-token"])
@pytest.mark.parametrize("prompt_name", [None, "query"])
def test_normalize_false_serves_sentence_transformers_encode_within_1e_5(served, st_models, name, prompt_name):
    if prompt_name and prompt_name not in st_models[name].prompts:
        pytest.skip("the model has no such prompt")
    got = _embed(served(name), texts=TEXTS, prompt_name=prompt_name)
    want = st_models[name].encode(TEXTS, prompt_name=prompt_name, convert_to_numpy=True)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("name", ["cls-dense-normalize", "max-two-dense"])
def test_normalize_true_serves_unit_vectors_as_encode_with_normalize_embeddings(served, st_models, name):
    got = _embed(served(name, normalize=True), texts=TEXTS)
    want = st_models[name].encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert np.abs(got - want).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_without_normalize_module_the_models_own_vectors_are_not_unit(served):
    norms = np.linalg.norm(_embed(served("max-two-dense"), texts=TEXTS), axis=1)
    assert np.all(np.abs(norms - 1.0) > 1e-3), norms


def test_model_info_describes_the_pipeline(served):
    info = served("cls-dense-normalize").model.info
    assert (info.dimensions, info.pooling) == (64, "cls")
    assert set(info.prompts) >= {"query", "passage"} and info.default_prompt_name == "passage"
    other = served("max-two-dense").model.info
    assert (other.dimensions, other.pooling, other.default_prompt_name) == (24, "max", None)


def test_prompt_tokens_count_in_usage(served, st_models):
    scheduler = served("cls-dense-normalize")
    [result] = embed_jobs(scheduler, [EmbedJob(texts=TEXTS[:1], prompt_name="query")])
    tokenizer = st_models["cls-dense-normalize"].tokenizer
    assert result.prompt_tokens == len(tokenizer("query: " + TEXTS[0])["input_ids"])
    [plain] = embed_jobs(served("last-token"), [EmbedJob(texts=TEXTS[:1])])
    assert result.prompt_tokens == plain.prompt_tokens + len(tokenizer("query: ", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("with_special_tokens", [False, True])
def test_token_ids_get_the_prompt_too_and_embed_like_their_text(served, st_models, with_special_tokens):
    """As TEI: a prompt applies to token-id inputs as well, so ids embed like the text they stand for."""
    tokenizer = st_models["cls-dense-normalize"].tokenizer
    ids = [tokenizer(t, add_special_tokens=with_special_tokens)["input_ids"] for t in TEXTS]
    scheduler = served("cls-dense-normalize")
    for prompt_name in (None, "query"):  # None: the model's default prompt, "passage"
        got = _embed(scheduler, token_ids=ids, prompt_name=prompt_name)
        want = st_models["cls-dense-normalize"].encode(TEXTS, prompt_name=prompt_name, convert_to_numpy=True)
        assert np.abs(got - want).max() <= 1e-5, prompt_name


def test_unknown_prompt_name_fails_its_own_request_only_naming_the_prompts(served):
    scheduler = served("cls-dense-normalize")
    good, bad = embed_jobs(scheduler, [EmbedJob(texts=TEXTS[:1], prompt_name="query"),
                                       EmbedJob(texts=TEXTS[:1], prompt_name="search_query")])
    assert good.error is None and good.vectors.shape == (1, 64)
    assert isinstance(bad.error, InvalidRequest) and bad.error.param == "prompt_name"
    assert bad.error.code == "unknown_prompt_name"
    assert "'search_query'" in bad.error.message and "'query'" in bad.error.message and "'passage'" in bad.error.message


def test_a_model_without_prompts_refuses_any_prompt_name(float32_model):
    """The bundled model (saved by sentence-transformers 2) has none; newer saves always have query and document."""
    with pytest.raises(InvalidRequest, match="'query' cannot be used: this model has no prompts"):
        float32_model.request_tokenizer().prompt("query")


def test_default_prompt_name_setting_picks_the_prompt_for_requests_that_name_none(served, st_models):
    st = st_models["cls-dense-normalize"]
    got = _embed(served("cls-dense-normalize", default_prompt_name="query"), texts=TEXTS)
    assert np.abs(got - st.encode(TEXTS, prompt_name="query", convert_to_numpy=True)).max() <= 1e-5
    none = _embed(served("cls-dense-normalize", default_prompt_name=""), texts=TEXTS)  # "": no prompt at all
    assert np.abs(none - st.encode(TEXTS, prompt="", convert_to_numpy=True)).max() <= 1e-5


def test_a_default_prompt_name_the_model_lacks_is_refused_at_load(built):
    says = r"default_prompt_name setting 'search' is not one of the model's prompts \('document', 'passage', 'query'\)"
    with pytest.raises(UnsupportedModel, match=says):
        EmbeddingModel(ModelSpec(name="m", source=built["cls-dense-normalize"], default_prompt_name="search"),
                       device="cpu", dtype="float32")


def test_dimensions_cut_the_dense_output_and_renormalize(served, st_models):
    full = st_models["cls-dense-normalize"].encode(TEXTS, convert_to_numpy=True)
    got = apply_dimensions(_embed(served("cls-dense-normalize", normalize=True), texts=TEXTS), 16)
    want = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    assert got.shape == (3, 16) and np.abs(got - want).max() <= 1e-5


def test_dense_runs_in_float32_under_bf16_autocast(built, served):
    bf16 = EmbeddingModel(ModelSpec(name="m", source=built["cls-dense-normalize"]), device="cpu", dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in bf16.dense.parameters())
    tokenizer = bf16.request_tokenizer()
    seqs = [tokenizer.finish(c, i, True) for i, c in enumerate(tokenizer.content_ids(TEXTS))]
    got = bf16.forward(seqs)
    want = served("cls-dense-normalize", normalize=True).model.forward(seqs)
    assert got.dtype == np.float32 and np.sum(got * want, axis=1).min() >= 0.999


def test_lowercasing_models_get_lowercased_texts_and_prompts(float32_model):
    from embserve.engine.pipeline import Prompts
    from embserve.engine.tokenize import Tokenizer

    tok = Tokenizer(float32_model.tokenizer, 64, float32_model.vocab_size, prompts=Prompts({"q": "Query: "}),
                    lowercase=True)
    assert tok.model_texts(["Hello World"], tok.prompt("q")) == ["query: hello world"]


# Models refused at load: each a folder of the sentence-transformers files only (no weights are read first).

TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}


def _module(idx: int, kind: str, path: str) -> dict:
    return {"idx": idx, "name": str(idx), "path": path, "type": f"sentence_transformers.models.{kind}"}


def _folder(root: Path, modules: list[dict], configs: dict[str, dict] | None = None) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "modules.json").write_text(json.dumps(modules))
    for name, cfg in (configs or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(cfg))
    return str(root)


POOL = _module(1, "Pooling", "1_Pooling")
DENSE = _module(2, "Dense", "2_Dense")
DENSE_CFG = {"in_features": 384, "out_features": 8, "bias": True,
             "activation_function": "torch.nn.modules.activation.Tanh"}

REFUSED = {
    "unknown module": ([TRANSFORMER, POOL, _module(2, "LayerNorm", "2_LayerNorm")], {}, "LayerNorm"),
    "custom code first": ([{**TRANSFORMER, "type": "custom_st.Transformer"}, POOL], {}, "custom_st.Transformer"),
    "transformer in a subfolder": ([{**TRANSFORMER, "path": "0_Transformer"}, POOL], {}, "0_Transformer"),
    "no pooling": ([TRANSFORMER, _module(1, "Normalize", "1_Normalize")], {}, "Normalize"),
    "dense before pooling": ([TRANSFORMER, {**DENSE, "idx": 1}, {**POOL, "idx": 2}], {}, "Dense"),
    "normalize before dense": ([TRANSFORMER, POOL, _module(2, "Normalize", "2_Normalize"), {**DENSE, "idx": 3}],
                               {"2_Dense/config.json": DENSE_CFG}, "Dense"),
    "weightedmean": ([TRANSFORMER, POOL], {"1_Pooling/config.json": {"pooling_mode": "weightedmean"}},
                     "'weightedmean' pooling, which embserve does not implement"),
    "legacy mean_sqrt_len": ([TRANSFORMER, POOL], {"1_Pooling/config.json": {
        "pooling_mode_mean_tokens": False, "pooling_mode_mean_sqrt_len_tokens": True}}, "mean_sqrt_len_tokens"),
    "two modes": ([TRANSFORMER, POOL], {"1_Pooling/config.json": {
        "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}}, "2 pooling modes"),
    "untrusted activation": ([TRANSFORMER, POOL, DENSE], {"2_Dense/config.json": {
        **DENSE_CFG, "activation_function": "mypackage.Swish"}}, "activation 'mypackage.Swish'"),
    "residual dense": ([TRANSFORMER, POOL, DENSE], {"2_Dense/config.json": {**DENSE_CFG, "use_residual": True}},
                       "use_residual"),
    "dense on token embeddings": ([TRANSFORMER, POOL, DENSE], {"2_Dense/config.json": {
        **DENSE_CFG, "module_input_name": "token_embeddings"}}, "module_input_name 'token_embeddings'"),
    "dense without weights": ([TRANSFORMER, POOL, DENSE], {"2_Dense/config.json": DENSE_CFG},
                              "neither model.safetensors nor pytorch_model.bin"),
    "exclude prompt from pooling": ([TRANSFORMER, POOL], {
        "1_Pooling/config.json": {"pooling_mode": "mean", "include_prompt": False},
        "config_sentence_transformers.json": {"prompts": {"query": "Represent the query: "}}}, "include_prompt: false"),
    "generative task": ([TRANSFORMER, POOL], {"sentence_bert_config.json": {"transformer_task": "text-generation"}},
                        "transformer_task 'text-generation'"),
    "modules not a list": ({"0": TRANSFORMER}, {}, "is not a list of modules"),
    "dense without config": ([TRANSFORMER, POOL, DENSE], {}, "no config.json with in_features and out_features"),
    "normalize on token embeddings": ([TRANSFORMER, POOL, _module(2, "Normalize", "2_Normalize")], {
        "2_Normalize/config.json": {"module_input_name": "token_embeddings"}}, "module_input_name 'token_embeddings'"),
    "text through the pooler output": ([TRANSFORMER, POOL], {"sentence_bert_config.json": {"modality_config": {
        "text": {"method": "forward", "method_output_name": "pooler_output"}}}}, "pooler_output"),
    "prompts that are not texts": ([TRANSFORMER, POOL], {"config_sentence_transformers.json": {
        "prompts": {"query": 1}}}, "must map names to texts"),
    "default prompt it lacks": ([TRANSFORMER, POOL], {"config_sentence_transformers.json": {
        "prompts": {"query": "query: "}, "default_prompt_name": "passage"}}, "default_prompt_name 'passage'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_pipelines_embserve_cannot_compute_exactly_are_refused_naming_why(tmp_path, case):
    modules, configs, says = REFUSED[case]
    with pytest.raises(UnsupportedModel) as err:
        read_pipeline(_folder(tmp_path / "m", modules, configs))
    assert says in err.value.message
    assert err.value.code == "unsupported_model"


def test_a_config_that_is_not_json_is_refused_naming_the_file(tmp_path):
    folder = _folder(tmp_path, [TRANSFORMER, POOL])
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModel, match="1_Pooling/config.json of .* is not valid JSON"):
        read_pipeline(folder)


def test_unknown_modules_are_refused_with_what_is_supported(tmp_path):
    with pytest.raises(UnsupportedModel) as err:
        read_pipeline(_folder(tmp_path, *REFUSED["unknown module"][:2]))
    assert "module 2 of modules.json" in err.value.message and SUPPORTED_PIPELINE in err.value.message


def test_a_refused_model_stops_the_load_before_its_weights(tmp_path):
    with pytest.raises(UnsupportedModel, match="weightedmean"):
        EmbeddingModel(ModelSpec(name="m", source=_folder(tmp_path, *REFUSED["weightedmean"][:2])), device="cpu")


def test_an_explicit_pooling_setting_wins_over_the_models_mode(tmp_path):
    pipeline = read_pipeline(_folder(tmp_path, *REFUSED["weightedmean"][:2]), pooling_setting="mean")
    assert pipeline.pooling == "mean"


def test_include_prompt_false_without_prompts_is_served(tmp_path):
    folder = _folder(tmp_path, [TRANSFORMER, POOL], {"1_Pooling/config.json": {"include_prompt": False}})
    assert read_pipeline(folder).include_prompt is False


def test_dense_weights_that_do_not_chain_are_refused(built, tmp_path):
    weights = next(Path(built["cls-dense-normalize"]).glob("2_Dense/model.safetensors"))
    with pytest.raises(UnsupportedModel, match="takes 384 features but gets 32"):
        build_dense((DenseSpec("2_Dense", 384, 64, True, "Tanh", weights),), 32)
    shutil.copy(weights, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedModel, match="do not fit its config"):
        build_dense((DenseSpec("2_Dense", 384, 32, True, "Tanh", tmp_path / "model.safetensors"),), 384)
