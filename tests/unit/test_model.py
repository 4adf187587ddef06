"""Model loading hints, pooling and the padded forward of one group, over the real bundled model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embserve.api.errors import NonFiniteOutput
from embserve.engine.model import (
    EmbeddingModel,
    attention_choice,
    choose_dtype,
    cpu_bf16_choice,
    cuda_dtype_choice,
    device_map_loading,
    padded_inputs,
    place,
    pick_dtype,
    pool,
    read_cpu_flags,
    resolve_source,
    to_device,
    torch_bf16_gemm_supported,
)
from embserve.engine.pipeline import read_pipeline
from embserve.engine.tokenize import Tokenizer
from embserve.settings import ModelSpec
from tests.texts import mixed_texts

# The bf16 contract (docs/precision.md): every vector within this cosine of the float32 one, and a text's
# vector moves by at most BF16_BATCH_ATOL (max abs, on unit vectors) with the batch it shares a forward with.
BF16_MIN_COSINE = 0.9999
BF16_BATCH_ATOL = 2e-3


def test_bundled_model_is_described_by_its_own_config(bundled_model):
    info = bundled_model.info
    assert (info.dimensions, info.max_length, info.vocab_size) == (384, 256, 30522)
    assert info.pooling == "mean"
    native_bf16, _ = cpu_bf16_choice(read_cpu_flags(), torch_bf16_gemm_supported())
    assert (info.device, info.dtype) == ("cpu", "bfloat16" if native_bf16 else "float32")
    assert bundled_model.dtype_reason.startswith("auto: CPU has")
    assert bundled_model.pad_id == 0


def test_bundled_pipeline_comes_from_its_sentence_transformers_files():
    pipeline = read_pipeline(resolve_source("bundled"))
    assert (pipeline.pooling, pipeline.max_seq_length, pipeline.normalize, pipeline.dense) == ("mean", 256, True, ())


def _model_folder(tmp_path, pooling_cfg: dict | None, normalize: bool, max_seq: int | None):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if pooling_cfg is not None:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg))
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if max_seq is not None:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq}))
    return str(tmp_path)


@pytest.mark.parametrize(
    ("cfg", "pooling"),
    [
        ({"pooling_mode_cls_token": True}, "cls"),
        ({"pooling_mode_lasttoken": True}, "last"),
        ({"pooling_mode_mean_tokens": True}, "mean"),
        ({"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}, "max"),
        ({}, "mean"),  # sentence-transformers' default
        ({"pooling_mode": "cls"}, "cls"),  # its format since 5.2
        ({"pooling_mode": ["lasttoken"]}, "last"),
    ],
)
def test_pipeline_reads_the_pooling_mode_of_a_model_folder(tmp_path, cfg, pooling):
    pipeline = read_pipeline(_model_folder(tmp_path, cfg, normalize=False, max_seq=128))
    assert pipeline.pooling == pooling
    assert pipeline.max_seq_length == 128
    assert pipeline.normalize is False


def test_folder_without_sentence_transformers_files_gives_the_plain_pipeline(tmp_path):
    pipeline = read_pipeline(str(tmp_path))
    assert (pipeline.modules, pipeline.pooling, pipeline.max_seq_length, pipeline.normalize) == (False, None, None, False)


def test_normalize_module_is_detected(tmp_path):
    assert read_pipeline(_model_folder(tmp_path, {}, normalize=True, max_seq=None)).normalize


def test_uncached_hub_id_offline_gives_the_plain_pipeline():
    pipeline = read_pipeline("embserve-tests/no-such-model")
    assert (pipeline.modules, pipeline.pooling, pipeline.max_seq_length, pipeline.normalize) == (False, None, None, False)


def test_non_bundled_source_is_passed_through():
    assert resolve_source("/models/x") == "/models/x"
    assert resolve_source("org/model") == "org/model"


def test_device_and_dtype_choice_on_this_machine():
    assert place("cpu", "float32", None).device == "cpu"
    # `auto` is resolved where a replica resolves it (embserve.engine.hardware.choose_device).
    assert place("auto", "float32", None).device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("float16", "cpu") == torch.float16
    assert pick_dtype("bfloat16", "cuda") == torch.bfloat16


HIDDEN = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]],
                       [[5.0, 1.0], [7.0, 3.0], [2.0, 4.0]]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_mean_pooling_ignores_padding():
    torch.testing.assert_close(pool(HIDDEN, MASK, "mean"), torch.tensor([[2.0, 1.0], [14 / 3, 8 / 3]]))


def test_cls_pooling_takes_the_first_token():
    torch.testing.assert_close(pool(HIDDEN, MASK, "cls"), torch.tensor([[1.0, 0.0], [5.0, 1.0]]))


def test_max_pooling_ignores_padding():
    torch.testing.assert_close(pool(HIDDEN, MASK, "max"), torch.tensor([[3.0, 2.0], [7.0, 4.0]]))


def test_last_pooling_takes_the_last_real_token_under_right_padding():
    torch.testing.assert_close(pool(HIDDEN, MASK, "last"), torch.tensor([[3.0, 2.0], [2.0, 4.0]]))


def test_padding_in_a_group_does_not_change_a_vector(float32_model):
    short = [101, 7592, 102]
    long = [101, *range(2000, 2040), 102]
    alone = float32_model.forward([short])
    padded = float32_model.forward([long, short])
    assert padded.shape == (2, 384) and padded.dtype == np.float32
    np.testing.assert_allclose(padded[1], alone[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(padded, axis=1), 1.0, atol=1e-5)


def test_max_length_past_the_position_limit_is_refused_at_load():
    with pytest.raises(ValueError, match="position limit of 512"):
        EmbeddingModel(ModelSpec(name="x", max_length=600), device="cpu")


def test_torch_threads_sets_the_forward_threads_of_the_process():
    before = torch.get_num_threads()
    try:
        EmbeddingModel(ModelSpec(name="x"), device="cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                   "amx_bf16", "amx_tile", "amx_int8"}
ZEN4 = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
SKYLAKE_SP = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}  # AVX-512 that only emulates bf16
AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize(
    ("flags", "use_bf16", "unit"),
    [
        (SAPPHIRE_RAPIDS, True, "amx_bf16"),
        ({"amx_bf16", "amx_tile"}, True, "amx_bf16"),
        (ZEN4, True, "avx512_bf16"),
        (SKYLAKE_SP, False, "no native bf16"),
        (AVX2_ONLY, False, "no native bf16"),
        (set(), False, "no native bf16"),
    ],
    ids=["amx-intel", "amx-only", "zen4-avx512-bf16", "skylake-avx512", "avx2", "empty"],
)
def test_cpu_bf16_choice_follows_the_native_bf16_units(flags, use_bf16, unit):
    choice, reason = cpu_bf16_choice(frozenset(flags))
    assert choice is use_bf16
    assert unit in reason
    assert reason.endswith("bf16 autocast (float32 weights, pooling and normalization)" if use_bf16 else "float32")


def test_native_bf16_is_not_chosen_when_torch_cannot_run_bf16_matmuls():
    choice, reason = cpu_bf16_choice(frozenset(ZEN4), torch_bf16_gemm=False)
    assert choice is False
    assert "oneDNN" in reason


def test_cpu_flags_are_read_from_proc_cpuinfo_format(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert read_cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}


def test_without_proc_cpuinfo_the_flags_are_torchs_cpu_capabilities(tmp_path):
    flags = read_cpu_flags(str(tmp_path / "missing"))
    caps = torch.cpu.get_capabilities()
    assert flags == {name for name, on in caps.items() if on is True}
    # On x86 both sources name the bf16 units alike, so the decision is the same from either.
    if caps.get("architecture") == "x86_64":
        assert cpu_bf16_choice(flags)[0] == cpu_bf16_choice(read_cpu_flags())[0]


def test_auto_dtype_on_a_cpu_is_bf16_autocast_only_with_a_native_unit():
    fast = choose_dtype("auto", "cpu", cpu_flags=frozenset(ZEN4))
    assert fast.weights == torch.float32
    assert (fast.autocast, fast.name) == ((True, "bfloat16") if torch_bf16_gemm_supported() else (False, "float32"))
    plain = choose_dtype("auto", "cpu", cpu_flags=frozenset(AVX2_ONLY))
    assert (plain.weights, plain.autocast, plain.name) == (torch.float32, False, "float32")


@pytest.mark.parametrize(("setting", "autocast", "name"),
                         [("float32", False, "float32"), ("bfloat16", True, "bfloat16")])
def test_explicit_dtype_on_a_cpu_wins_over_the_flags(setting, autocast, name):
    for flags in (ZEN4, AVX2_ONLY):
        choice = choose_dtype(setting, "cpu", cpu_flags=frozenset(flags))
        assert (choice.weights, choice.autocast, choice.name) == (torch.float32, autocast, name)
        assert choice.reason.startswith("explicit setting")


def test_explicit_float32_runs_without_autocast(float32_model):
    assert (float32_model.info.dtype, float32_model.autocast) == ("float32", False)
    assert float32_model.dtype_reason == "explicit setting"


def _ids(model: EmbeddingModel, texts: list[str]) -> list[list[int]]:
    tok = Tokenizer(model.tokenizer, model.max_length, model.vocab_size)
    return [tok.finish(c, i, truncate=True) for i, c in enumerate(tok.content_ids(texts))]


@pytest.fixture(scope="module")
def varied_texts() -> list[str]:
    """Queries and passages, plus one past the model's 256 tokens (cut, as sentence-transformers cuts)."""
    return [*mixed_texts(23, seed=5), " ".join(["parse the date string and return it"] * 60)]


def _compositions(n: int) -> dict[str, list[list[int]]]:
    """Ways to split n inputs into forwards: alone, all padded together, sorted-by-index chunks, a shuffle."""
    rng = np.random.default_rng(3)
    shuffled = [int(i) for i in rng.permutation(n)]
    return {
        "alone": [[i] for i in range(n)],
        "one padded batch": [list(range(n))],
        "groups of 8": [list(range(i, min(i + 8, n))) for i in range(0, n, 8)],
        "shuffled groups of 5": [shuffled[i : i + 5] for i in range(0, n, 5)],
    }


def _embed(model: EmbeddingModel, ids: list[list[int]], groups: list[list[int]]) -> np.ndarray:
    out = np.zeros((len(ids), model.info.dimensions), dtype=np.float32)
    for group in groups:
        out[group] = model.forward([ids[i] for i in group])
    return out


def test_explicit_float32_equals_sentence_transformers_within_1e_5(float32_model, reference, varied_texts):
    ids = _ids(float32_model, varied_texts)
    want = reference(varied_texts)
    for name, groups in _compositions(len(ids)).items():
        got = _embed(float32_model, ids, groups)
        assert np.abs(got - want).max() <= 1e-5, name


def test_bf16_vectors_stay_within_cosine_0_9999_of_float32(bf16_model, float32_model, varied_texts):
    ids = _ids(float32_model, varied_texts)
    want = _embed(float32_model, ids, [[i] for i in range(len(ids))])
    for name, groups in _compositions(len(ids)).items():
        got = _embed(bf16_model, ids, groups)
        assert got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalized in float32
        cosine = np.sum(got * want, axis=1)
        assert cosine.min() >= BF16_MIN_COSINE, (name, float(cosine.min()))


def test_bf16_vectors_barely_depend_on_the_batch_they_share(bf16_model, varied_texts):
    ids = _ids(bf16_model, varied_texts)
    runs = {name: _embed(bf16_model, ids, groups) for name, groups in _compositions(len(ids)).items()}
    alone = runs.pop("alone")
    for name, got in runs.items():
        assert np.abs(got - alone).max() <= BF16_BATCH_ATOL, name
        assert np.sum(got * alone, axis=1).min() >= BF16_MIN_COSINE, name


def test_bf16_runs_on_the_forward_workers_threads_too(bf16_model, float32_model, varied_texts):
    """Autocast is per thread: a forward on another thread (a replica's forward worker) must run bf16 too."""
    import concurrent.futures

    ids = _ids(bf16_model, varied_texts[:6])
    here = bf16_model.forward(ids)
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        there = worker.submit(bf16_model.forward, ids).result()
    assert np.abs(there - here).max() <= 1e-6
    assert np.abs(there - float32_model.forward(ids)).max() > 1e-5, "the worker's forward ran in float32"


# Input building, masks and non-finite vectors.

def _loop_forward(model: EmbeddingModel, sequences: list[list[int]]) -> np.ndarray:
    """The forward as it was before its inputs were built in one step: ids and mask filled row by row,
    a mask always passed. The reference that the vectorized forward must equal."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), model.pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    with torch.inference_mode():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = torch.nn.functional.normalize(pool(hidden.float(), mask, model.pooling), p=2, dim=1)
    return pooled.numpy()


def test_padded_inputs_equal_the_tokenizers_own_padding(float32_model, varied_texts):
    texts = varied_texts[:12]
    own = float32_model.tokenizer(texts, padding=True, truncation=True, max_length=float32_model.max_length,
                                  return_tensors="pt")
    ids, mask = padded_inputs(_ids(float32_model, texts), float32_model.pad_id)
    assert len(set(map(len, _ids(float32_model, texts)))) > 1, "the texts must have mixed lengths"
    assert torch.equal(ids, own["input_ids"])
    assert torch.equal(mask, own["attention_mask"])
    assert ids.dtype == mask.dtype == torch.long


def test_vectorized_inputs_give_the_vectors_of_the_row_by_row_forward(float32_model, varied_texts):
    ids = _ids(float32_model, varied_texts)
    for name, groups in _compositions(len(ids)).items():
        for group in groups:
            seqs = [ids[i] for i in group]
            assert np.abs(float32_model.forward(seqs) - _loop_forward(float32_model, seqs)).max() <= 1e-6, name


def test_a_group_of_equal_lengths_runs_without_a_mask_and_gives_the_masked_vectors(float32_model, varied_texts):
    seen: list[object] = []
    hook = float32_model.model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    same = [ids[:12] for ids in _ids(float32_model, varied_texts) if len(ids) >= 12][:5]
    mixed = _ids(float32_model, varied_texts[:5])
    try:
        got = float32_model.forward(same)
        float32_model.forward(mixed)
    finally:
        hook.remove()
    assert len(same) == 5 and seen[0] is None, "a group of equal lengths passes no mask"
    assert seen[1] is not None, "a group of mixed lengths passes its mask"
    assert np.abs(got - _loop_forward(float32_model, same)).max() <= 1e-6  # the unmasked forward = all ones


def test_host_tensors_stay_unpinned_on_a_cpu():
    t = torch.arange(6).reshape(2, 3)
    moved = to_device(t, "cpu")
    assert torch.equal(moved, t) and moved.device.type == "cpu" and not moved.is_pinned()


def test_a_non_finite_vector_fails_only_its_own_rows(nan_model, float32_model):
    from tests.unit.conftest import POISON

    tok = nan_model.tokenizer
    poisoned = [101, tok.convert_tokens_to_ids(POISON), 102]
    fine = [101, 7592, 2088, 102]
    with pytest.raises(NonFiniteOutput) as caught:
        nan_model.forward([fine, poisoned, fine[:3]])
    err = caught.value
    assert err.rows == (1,) and err.status == 500 and err.type == "server_error"
    assert "non-finite" in err.message and "float32" in err.message
    np.testing.assert_allclose(err.vectors[[0, 2]], float32_model.forward([fine, fine[:3]]), atol=1e-6)
    assert np.isfinite(nan_model.forward([fine])).all()


# Precision and attention on a GPU, decided from what the card is: pure functions, run here on the CPU.

@pytest.mark.parametrize(("capability", "setting", "weights", "tf32", "reason"), [
    ((9, 0), "auto", torch.bfloat16, False, "sm_90 multiplies bf16 natively"),     # H100
    ((8, 0), "auto", torch.bfloat16, False, "sm_80 multiplies bf16 natively"),     # A100
    ((8, 9), "auto", torch.bfloat16, False, "natively"),                           # L4, L40S
    ((7, 5), "auto", torch.float16, False, "sm_75 has no native bf16"),            # T4: bf16 only emulated
    ((7, 0), "auto", torch.float16, False, "no native bf16"),                      # V100
    ((8, 6), "float32", torch.float32, False, "full float32"),                     # the 1e-5 contract holds
    ((7, 5), "float32", torch.float32, False, "full float32"),
    ((7, 5), "bfloat16", torch.bfloat16, False, "emulated on sm_75"),              # asked for: kept, flagged
    ((8, 0), "bfloat16", torch.bfloat16, False, "explicit setting"),
    ((8, 0), "float16", torch.float16, False, "explicit setting"),
])
def test_gpu_dtype_follows_the_cards_native_units(capability, setting, weights, tf32, reason):
    choice = cuda_dtype_choice(setting, capability)
    assert (choice.weights, choice.tf32, choice.autocast) == (weights, tf32, False)
    assert reason in choice.reason


@pytest.mark.parametrize("capability", [(9, 0), (8, 6), (7, 5)])
def test_float32_on_a_gpu_runs_tf32_only_where_allow_tf32_asks(capability):
    assert not cuda_dtype_choice("float32", capability).tf32
    allowed = cuda_dtype_choice("float32", capability, allow_tf32=True)
    assert allowed.tf32 and allowed.weights == torch.float32 and "allow_tf32" in allowed.reason
    # It never changes what a half-precision choice runs.
    assert not cuda_dtype_choice("auto", capability, allow_tf32=True).tf32


def test_torchs_own_bf16_answer_wins_over_the_capability():
    assert cuda_dtype_choice("auto", (8, 0), bf16_native=False).weights == torch.float16
    assert cuda_dtype_choice("auto", (7, 5), bf16_native=True).weights == torch.bfloat16


@pytest.mark.parametrize(("device", "weights", "flash", "want", "reason"), [
    ("cuda", torch.bfloat16, True, "flash_attention_2", "flash_attn installed"),
    ("cuda", torch.float16, True, "flash_attention_2", "flash_attn installed"),
    ("cuda", torch.float32, True, None, "not float32"),
    ("cuda", torch.bfloat16, False, None, "flash_attn is not installed"),
    ("cpu", torch.float32, True, None, "cpu: transformers' default"),
])
def test_flash_attention_only_on_a_gpu_in_half_precision_with_flash_attn(device, weights, flash, want, reason):
    chosen, why = attention_choice(device, weights, flash)
    assert chosen == want and reason in why


@pytest.mark.parametrize(("capability", "want"), [((9, 0), "flash_attention_2"), ((8, 0), "flash_attention_2"),
                                                 ((7, 5), None), ((7, 0), None)])
def test_flash_attention_only_on_cards_of_sm_80_and_later(capability, want):
    chosen, why = attention_choice("cuda", torch.float16, True, capability=capability)
    assert chosen == want
    if want is None:
        assert f"sm_{capability[0]}{capability[1]}" in why and "sm_80" in why


def test_flash_attention_only_where_the_models_class_has_it():
    from transformers import BertConfig, MPNetConfig

    from embserve.engine.model import model_supports_flash_attention

    assert model_supports_flash_attention(BertConfig())
    assert not model_supports_flash_attention(MPNetConfig())  # all-mpnet-base-v2: transformers would refuse it
    chosen, why = attention_choice("cuda", torch.bfloat16, True, capability=(9, 0), model_supports_flash=False)
    assert chosen is None and "no FlashAttention-2 path" in why


def test_the_attention_transformers_settled_on_is_recorded(float32_model):
    assert float32_model.attention == float32_model.model.config._attn_implementation == "sdpa"
    assert "default" in float32_model.attention_reason


def test_weights_load_straight_onto_a_gpu_only_through_a_device_map_transformers_can_take():
    import importlib.util

    assert device_map_loading("cpu") == {}
    accelerate = importlib.util.find_spec("accelerate") is not None
    assert device_map_loading("cuda") == ({"device_map": "cuda"} if accelerate else {})
