"""GPU batch limits: card sizes, the limits picked for real model shapes, and the forward-peak estimate
against what a real Hugging Face forward allocates, measured op by op on the meta device (no GPU, no
downloads)."""

from __future__ import annotations

import re
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModel, BertConfig, GPT2Config, LlamaConfig

from embserve.engine.gpu_memory import (
    GIB,
    ModelShape,
    forward_peak_bytes,
    gpu_batch_limits,
    marketed_gb,
    tier_max_batch_size,
    weights_bytes,
)
from embserve.engine.model import pool

FRACTION = 0.8
# How far above the measured peak the estimate may be for eager attention: safe but not wasteful.
MAX_OVERESTIMATE = 2.5

# What torch.cuda.get_device_properties(0).total_memory says, in GiB, for cards of a marketed size.
REPORTED_GIB = {
    8: 7.79,  # RTX 3070 / 4060
    16: 15.7,  # V100 16 GB, RTX 4080
    24: 23.6,  # RTX 3090 / 4090
    40: 39.4,  # A100 40 GB
    80: 79.2,  # A100 / H100 80 GB
    141: 139.8,  # H200
}


def minilm() -> BertConfig:
    return BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                      max_position_embeddings=512)


def bge_base() -> BertConfig:
    return BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      max_position_embeddings=512)


def bge_large() -> BertConfig:
    return BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      max_position_embeddings=512)


def llama_7b() -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, max_position_embeddings=4096, vocab_size=32000)


def llama_gqa() -> LlamaConfig:
    """A small grouped-query decoder: keys and values repeated 4x to the query heads."""
    return LlamaConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                       intermediate_size=2816, max_position_embeddings=4096, vocab_size=32000)


MODELS = {"MiniLM": minilm, "bge-base": bge_base, "bge-large": bge_large, "7B": llama_7b}


# --- measuring a real forward ---------------------------------------------------------------------------

_SCALAR_READS = (torch.ops.aten.is_nonzero.default, torch.ops.aten._local_scalar_dense.default,
                 torch.ops.aten.item.default)


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that ops produce, one count per storage while it is alive.

    Views and in-place results share a storage already counted; storages that existed before (the
    weights) are skipped. On the meta device a data-dependent read (transformers asks `mask.all()` to
    skip building the 4-D mask when nothing is padded) answers False: the padded batch, the worst case.
    """

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.existing = existing
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SCALAR_READS and args[0].is_meta:
            return False if args[0].dtype == torch.bool else 0
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata  # the StorageImpl's address: one per storage, shared by its views
            if key in self.live or key in self.existing:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.current)
        return out


def measure_forward_peak_bytes(model: torch.nn.Module, batch: int, length: int, padded: int = 0) -> int:
    """The peak of one replica forward (ids and mask in, last_hidden_state out, mean pooling in float32,
    cast before or after pooling) on the model's device. `padded`: pad tokens at the end of each row."""
    device = next(model.parameters()).device
    existing = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    with torch.inference_mode(), LiveBytes(existing) as meter:
        ids = torch.ones((batch, length), dtype=torch.long, device=device)
        mask = torch.ones((batch, length), dtype=torch.long, device=device)
        if padded:
            mask[:, length - padded:] = 0
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = pool(hidden, mask, "mean").float()
        del pooled
        pooled = pool(hidden.float(), mask, "mean")
        del pooled, hidden, ids, mask
    assert meter.current == 0, "the meter lost track of a tensor"
    return meter.peak


def build(config, dtype: torch.dtype, attention: str, device: str = "meta") -> torch.nn.Module:
    config._attn_implementation = attention
    with torch.device(device):
        return AutoModel.from_config(config, dtype=dtype).eval()


def test_meter_counts_live_tensors_once_and_forgets_freed_ones():
    with torch.inference_mode(), LiveBytes(set()) as meter:
        a = torch.empty(1000, device="meta")  # 4000 bytes
        b = a * 2  # 8000 live
        view = b[:10]  # a view: no new bytes
        b.add_(1)  # in place: no new bytes
        del a
        c = b + view[0]  # 8000 live again, not 12000
        del b, view, c
    assert meter.peak == 8000
    assert meter.current == 0


def test_meta_forward_measures_as_a_real_cpu_forward_does():
    """The meta device runs the same ops on the same shapes as a real device: a tiny model with a padded
    batch peaks at the same bytes either way."""
    tiny = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                      max_position_embeddings=128, vocab_size=1000)
    torch.manual_seed(0)
    on_cpu = measure_forward_peak_bytes(build(tiny, torch.float32, "eager", "cpu"), 4, 32, padded=5)
    on_meta = measure_forward_peak_bytes(build(tiny, torch.float32, "eager"), 4, 32, padded=5)
    assert on_cpu == on_meta


# --- card sizes and tiers -------------------------------------------------------------------------------

@pytest.mark.parametrize("reported_gib, marketed", [
    (7.79, 8), (7.6, 8), (15.0, 16), (15.7, 16), (22.5, 24), (23.6, 24), (23.99, 24), (39.4, 40), (44.99, 48),
    (79.2, 80), (79.6, 80), (93.1, 94), (139.8, 141), (140.4, 141), (10.75, 11), (11.7, 12),
])
def test_marketed_size_of_real_cards(reported_gib, marketed):
    assert marketed_gb(int(reported_gib * GIB)) == marketed


def test_card_of_an_unknown_size_rounds_to_the_nearest_gib():
    assert marketed_gb(int(300.2 * GIB)) == 300
    assert marketed_gb(int(0.6 * GIB)) == 1


@pytest.mark.parametrize("marketed, batch", [(4, 64), (8, 64), (12, 64), (16, 128), (20, 128), (24, 256),
                                              (80, 256), (141, 256)])
def test_batch_size_tiers(marketed, batch):
    assert tier_max_batch_size(marketed) == batch


# --- model shapes and weights ---------------------------------------------------------------------------

def test_shape_of_an_encoder_config():
    shape = ModelShape.from_config(bge_large())
    assert (shape.hidden_size, shape.num_hidden_layers, shape.num_attention_heads, shape.num_key_value_heads,
            shape.intermediate_size, shape.max_position_embeddings) == (1024, 24, 16, 16, 4096, 512)
    assert not shape.is_decoder and not shape.kv_cache and not shape.softmax_float32
    assert shape.head_size == 64


def test_shape_of_a_llama_decoder_config():
    shape = ModelShape.from_config(llama_gqa())
    assert shape.is_decoder and shape.gated_mlp and shape.softmax_float32 and not shape.absolute_positions
    assert (shape.num_attention_heads, shape.num_key_value_heads, shape.vocab_size) == (16, 4, 32000)
    assert shape.kv_cache  # llama's use_cache default: the forward keeps every layer's keys and values
    no_cache = llama_gqa()
    no_cache.use_cache = False
    assert not ModelShape.from_config(no_cache).kv_cache


def test_shape_of_a_config_dict_with_gpt2_names():
    raw = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
           "n_positions": 1024, "vocab_size": 50257}
    shape = ModelShape.from_config(raw)
    assert (shape.hidden_size, shape.num_hidden_layers, shape.num_attention_heads, shape.intermediate_size,
            shape.max_position_embeddings) == (768, 12, 12, 3072, 1024)
    assert shape.is_decoder and not shape.gated_mlp and shape.absolute_positions
    assert ModelShape.from_config(GPT2Config()) == shape


@pytest.mark.parametrize("make", [minilm, bge_large, llama_7b, llama_gqa])
def test_weights_estimate_matches_the_real_models_parameters(make):
    model = build(make(), torch.bfloat16, "eager")
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    estimate = weights_bytes(ModelShape.from_config(make()), 2)
    assert real <= estimate <= real * 1.01


# --- the forward peak against a real forward ------------------------------------------------------------

POINTS = {
    "MiniLM": (minilm, [(1, 8), (64, 16), (8, 128), (16, 512)]),
    "bge-large": (bge_large, [(1, 8), (64, 16), (8, 128), (16, 512)]),
    "7B": (llama_7b, [(1, 8), (64, 16), (8, 128), (2, 1024)]),
    "gqa": (llama_gqa, [(64, 16), (8, 128), (1, 4096)]),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(POINTS))
def test_forward_peak_covers_an_eager_forward_without_waste(name, dtype):
    make, points = POINTS[name]
    model = build(make(), dtype, "eager")
    shape = ModelShape.from_config(make())
    for batch, length in points:
        measured = measure_forward_peak_bytes(model, batch, length)
        estimate = forward_peak_bytes(shape, batch, length, torch.finfo(dtype).bits // 8)
        assert measured <= estimate <= MAX_OVERESTIMATE * measured, (name, batch, length, estimate / measured)


@pytest.mark.parametrize("name", list(POINTS))
def test_forward_peak_covers_an_sdpa_forward(name):
    """SDPA never builds the score map, so the estimate (eager's worst case) is only checked to be safe,
    and to be tight where the map is small."""
    make, points = POINTS[name]
    model = build(make(), torch.bfloat16, "sdpa")
    shape = ModelShape.from_config(make())
    for batch, length in points:
        measured = measure_forward_peak_bytes(model, batch, length)
        estimate = forward_peak_bytes(shape, batch, length, 2)
        assert measured <= estimate, (name, batch, length, estimate / measured)
        if length <= 128:
            assert estimate <= MAX_OVERESTIMATE * measured, (name, batch, length, estimate / measured)


def test_forward_peak_of_a_decoder_without_cache():
    config = llama_gqa()
    config.use_cache = False
    model = build(config, torch.bfloat16, "eager")
    shape = ModelShape.from_config(config)
    for batch, length in [(64, 16), (1, 2048)]:
        measured = measure_forward_peak_bytes(model, batch, length)
        estimate = forward_peak_bytes(shape, batch, length, 2)
        assert measured <= estimate <= MAX_OVERESTIMATE * measured
    assert forward_peak_bytes(shape, 1, 2048, 2) < forward_peak_bytes(ModelShape.from_config(llama_gqa()),
                                                                        1, 2048, 2)


# --- limits per card and model --------------------------------------------------------------------------

# Cells that cannot fit and what the error must say is missing.
DOES_NOT_FIT = {
    ("7B", 8): "model weights 12.3 GiB exceed 80% of an 8 GB card",
    ("7B", 16): "model weights 12.3 GiB + one 4096-token forward",
}


def brute_force_peak(shape: ModelShape, budget: int, max_batch: int, max_length: int) -> int:
    """The costliest forward a planner may send under the limits: every row length, as many rows as
    both limits allow."""
    return max(forward_peak_bytes(shape, min(max_batch, budget // n), n, 2)
               for n in range(1, min(max_length, budget) + 1))


@pytest.mark.parametrize("card", list(REPORTED_GIB))
@pytest.mark.parametrize("name", list(MODELS))
def test_limits_keep_weights_and_forward_under_the_fraction_of_the_card(name, card):
    total = int(REPORTED_GIB[card] * GIB)
    shape = ModelShape.from_config(MODELS[name]())
    if (name, card) in DOES_NOT_FIT:
        with pytest.raises(ValueError, match=re.escape(DOES_NOT_FIT[name, card])):
            gpu_batch_limits(total, shape, 2, fraction=FRACTION)
        return
    limits = gpu_batch_limits(total, shape, 2, fraction=FRACTION)
    length = shape.max_position_embeddings
    usable = FRACTION * total
    assert limits.marketed_gb == card
    assert limits.max_batch_size == min(tier_max_batch_size(card), limits.max_batch_tokens)
    assert limits.max_batch_tokens >= length and limits.max_batch_tokens % 64 == 0
    assert limits.weights_bytes + limits.peak_bytes <= usable
    tier = tier_max_batch_size(card)
    worst = brute_force_peak(shape, limits.max_batch_tokens, limits.max_batch_size, length)
    assert worst == limits.peak_bytes
    # The largest budget that fits: 64 tokens more would not (unless no forward could use them).
    if limits.max_batch_tokens + 64 <= tier * length:
        more = brute_force_peak(shape, limits.max_batch_tokens + 64, tier, length)
        assert limits.weights_bytes + more > usable


def test_forwards_at_once_share_the_card():
    shape = ModelShape.from_config(llama_7b())
    total = int(REPORTED_GIB[80] * GIB)
    one = gpu_batch_limits(total, shape, 2)
    two = gpu_batch_limits(total, shape, 2, forwards_at_once=2)
    assert two.max_batch_tokens < one.max_batch_tokens
    assert two.weights_bytes + 2 * two.peak_bytes <= FRACTION * total


def test_shorter_max_length_lets_two_forwards_of_a_big_model_share_a_card():
    shape = ModelShape.from_config(llama_7b())
    total = int(REPORTED_GIB[24] * GIB)
    with pytest.raises(ValueError, match="model weights 12.3 GiB [+] 2 4096-token forwards"):
        gpu_batch_limits(total, shape, 2, forwards_at_once=2)
    limits = gpu_batch_limits(total, shape, 2, forwards_at_once=2, max_length=1024)
    assert limits.max_batch_tokens >= 1024
    assert limits.weights_bytes + 2 * limits.peak_bytes <= FRACTION * total


def test_measured_weights_replace_the_estimate():
    shape = ModelShape.from_config(bge_large())
    total = int(REPORTED_GIB[8] * GIB)
    with pytest.raises(ValueError, match="model weights 7.0 GiB exceed 80% of an 8 GB card"):
        gpu_batch_limits(total, shape, 2, weights=7 * GIB)
    assert gpu_batch_limits(total, shape, 2, weights=GIB).weights_bytes == GIB
