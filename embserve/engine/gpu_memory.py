"""Inputs and padded tokens one GPU forward may take, from the card's size and the model's config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

GIB = 1 << 30

# Marketed sizes (GB on the box, which for GPU memory are binary GiB) of the cards we expect to meet.
KNOWN_SIZES_GB = (2, 3, 4, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 128, 141, 144, 180,
                  192, 256, 288)
# A card reports less than its marketed size: the driver and firmware keep some (HBM cards report
# ~1% less: 79.2 GiB of 80, ~140 GiB of 141) and ECC on GDDR cards keeps a 16th (T4: 15.0 of 16,
# A10G/L4: 22.5 of 24, L40S: 45 of 48). 8% covers both; the 0.5% above covers a driver reporting a hair more.
_REPORTED_MIN_SHARE = 0.92
_REPORTED_MAX_SHARE = 1.005

# Encoders whose eager attention runs softmax in the model's dtype (checked against transformers' code);
# every other model is assumed to do it in float32 as the llama family does, the costlier of the two.
_SOFTMAX_IN_DTYPE = frozenset({"bert", "roberta", "xlm-roberta"})
_DECODERS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                       "phi3", "gpt2", "gpt_neox", "falcon", "olmo", "olmo2"})
# Decoders whose MLP is gated (gate and up projections, then down): three I-sized tensors live at once.
_GATED_MLP = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                        "phi3", "olmo", "olmo2"})
# Decoders that add position embeddings to the input instead of rotating queries and keys.
_ABSOLUTE_POSITION_DECODERS = frozenset({"gpt2"})


def marketed_gb(total_bytes: int) -> int:
    """The card's marketed size in GB from the total memory torch reports for it.

    The smallest known marketed size that the reported size is 92% to 100.5% of; a card of a size we
    do not know is rounded to the nearest GiB.
    """
    reported = total_bytes / GIB
    for size in KNOWN_SIZES_GB:
        if size * _REPORTED_MIN_SHARE <= reported <= size * _REPORTED_MAX_SHARE:
            return size
    return max(1, round(reported))


def tier_max_batch_size(marketed: int) -> int:
    """Inputs per batch by card size, the seed's tiers: more inputs once there is memory for them."""
    if marketed >= 24:
        return 256
    if marketed >= 16:
        return 128
    return 64


def _reader(config: Any) -> Callable[[str, Any], Any]:
    if isinstance(config, Mapping):
        return config.get
    return lambda name, default=None: getattr(config, name, default)


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model's config that its weights and a forward's memory depend on."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int
    is_decoder: bool = False
    model_type: str = ""
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    type_vocab_size: int = 0
    gated_mlp: bool = False
    absolute_positions: bool = True
    softmax_float32: bool = True
    kv_cache: bool = False  # the forward keeps every layer's keys and values (a decoder's use_cache)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a Hugging Face `PretrainedConfig` or its dict (config.json), with GPT-2's aliases."""
        get = _reader(config)

        def first(*names: str, default: Any = None) -> Any:
            for name in names:
                value = get(name, None)
                if value is not None:
                    return value
            return default

        hidden = int(first("hidden_size", "n_embd", "d_model"))
        heads = int(first("num_attention_heads", "n_head"))
        model_type = str(first("model_type", default="") or "")
        architectures = first("architectures", default=()) or ()
        decoder = (model_type in _DECODERS or bool(get("is_decoder", False))
                   or any(str(a).endswith("ForCausalLM") for a in architectures))
        positions = first("max_position_embeddings", "n_positions", "n_ctx", default=512)
        return cls(
            hidden_size=hidden,
            num_hidden_layers=int(first("num_hidden_layers", "n_layer")),
            num_attention_heads=heads,
            num_key_value_heads=int(first("num_key_value_heads", default=heads)),
            intermediate_size=int(first("intermediate_size", "n_inner", default=None) or 4 * hidden),
            max_position_embeddings=int(positions),
            vocab_size=int(first("vocab_size", default=0)),
            is_decoder=decoder,
            model_type=model_type,
            head_dim=int(first("head_dim", default=0) or 0),
            type_vocab_size=0 if decoder else int(first("type_vocab_size", default=0) or 0),
            gated_mlp=model_type in _GATED_MLP,
            absolute_positions=not decoder or model_type in _ABSOLUTE_POSITION_DECODERS,
            softmax_float32=model_type not in _SOFTMAX_IN_DTYPE,
            kv_cache=decoder and bool(first("use_cache", default=True)),
        )


def weights_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """The parameters' bytes of the model without an LM head (what `AutoModel` loads)."""
    h, inter, hd = shape.hidden_size, shape.intermediate_size, shape.head_size
    q_width, kv_width = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    embeddings = (shape.vocab_size + shape.type_vocab_size) * h
    if shape.absolute_positions:
        embeddings += shape.max_position_embeddings * h
    # Biases and LayerNorm's two vectors are counted for every model: a few hidden-sized vectors a
    # layer, cheaper to over-count than to keep a list of who has them.
    attention = h * q_width + 2 * h * kv_width + q_width * h + q_width + 2 * kv_width + h
    mlp = (3 if shape.gated_mlp else 2) * h * inter + 2 * inter + h
    norms = 4 * h
    layer = attention + mlp + norms
    # Encoders' AutoModel carries a pooler (dense + bias); decoders a final norm.
    head = 2 * h if shape.is_decoder else h * h + h
    return (embeddings + 2 * h + shape.num_hidden_layers * layer + head) * dtype_bytes


def forward_peak_bytes(shape: ModelShape, batch: int, length: int, dtype_bytes: int) -> int:
    """Peak extra memory of one inference forward of `batch` inputs padded to `length`, pooling included."""
    d = dtype_bytes
    t, n = batch * length, length
    h, inter, hd = shape.hidden_size, shape.intermediate_size, shape.head_size
    heads, kv_heads = shape.num_attention_heads, shape.num_key_value_heads
    hidden = t * h * d  # one hidden-sized activation
    maps = t * heads * n  # scores in one batch x heads x length x length map

    # Live through every layer. In inference mode a finished layer's tensors are freed, but the input
    # ids, mask, position ids (int64), the 4-D mask the attention adds (batch x 1 x length x length, in
    # the model's dtype for eager, bool for SDPA) and the rotary cos/sin (float32) stay for the whole
    # forward. So do up to four hidden-sized tensors: the embeddings' output (the model's forward still
    # holds it), the layer's input (the layer loop holds it), the residual after attention and its
    # normed copy.
    resident = 32 * t + t * n * d + 4 * hidden
    if not shape.absolute_positions:
        resident += 2 * t * hd * 4
    # A decoder that keeps its cache (use_cache, the default of llama-style configs) ends the forward
    # with every layer's keys and values alive: the last layer sees all of them.
    if shape.kv_cache:
        resident += 2 * shape.num_hidden_layers * t * kv_heads * hd * d

    # Attention (eager, the worst of eager and SDPA: SDPA's fused kernels never build the map).
    # Queries, keys and values; grouped keys and values are repeated to every head, the originals kept.
    repeated = 2 * heads if kv_heads < heads else 0
    qkv = t * hd * (heads + 2 * kv_heads + repeated) * d
    # The score map: matmul then scale (two maps at once), plus the mask (the scaled map lives while the
    # sum is built). A float32 softmax (llama family) then holds the sum, its float32 probabilities and
    # their cast back, 2d + 4 bytes a score; a softmax in dtype two maps, 2d.
    per_score = 2 * d + 4 if shape.softmax_float32 and d < 4 else 2 * d
    attention = qkv + maps * per_score

    # The MLP: its up projection and the activation of it, both intermediate-sized (a gated MLP also
    # holds the gate's activation while multiplying it by the up projection). The attention function
    # returns its probabilities (in dtype) along with its output and the layer only drops them when it
    # returns, so one map stays alive through the MLP.
    mlp = (3 if shape.gated_mlp else 2) * t * inter * d + maps * d

    layer = resident + max(attention, mlp)
    # Pooling after the model, in float32 whether the replica casts before pooling or after: the
    # last_hidden_state, its float32 copy, that copy times the mask weights (float32), the weights, and
    # the pooled rows. Smaller than a layer's peak, but it is the last word for a model of few layers.
    pooling = 32 * t + hidden + 8 * t * h + 4 * t + 8 * batch * h
    return max(layer, pooling)


@dataclass(frozen=True)
class GpuLimits:
    max_batch_size: int
    max_batch_tokens: int
    marketed_gb: int
    weights_bytes: int
    peak_bytes: int  # of one forward under these limits, its costliest shape
    reason: str


def budget_peak_bytes(shape: ModelShape, budget: int, max_length: int, max_batch: int,
                      dtype_bytes: int) -> int:
    """The costliest forward a token budget allows: any batch up to `max_batch` inputs, padded to any
    length up to `max_length`, batch x length <= budget.

    At a fixed batch the peak grows with the length, so each batch's worst is its longest rows; over
    batches it is not monotone (the attention map grows with length squared, the rest with tokens), so
    every batch size is tried.
    """
    worst = 0
    for batch in range(1, max_batch + 1):
        length = min(max_length, budget // batch)
        if length < 1:
            break
        worst = max(worst, forward_peak_bytes(shape, batch, length, dtype_bytes))
    return worst


def gpu_batch_limits(total_bytes: int, shape: ModelShape, dtype_bytes: int, *, fraction: float = 0.8,
                     forwards_at_once: int = 1, max_length: int | None = None,
                     weights: int | None = None) -> GpuLimits:
    """Inputs and padded tokens per forward such that the weights plus `forwards_at_once` forwards of
    any shape the limits allow stay under `fraction` of the card.

    `weights`: the weights' bytes when known (e.g. measured once loaded); estimated from `shape` if None.
    Raises ValueError when the weights, or the weights and one input of `max_length` tokens, do not fit.
    """
    marketed = marketed_gb(total_bytes)
    length = int(max_length or shape.max_position_embeddings)
    at_once = max(1, forwards_at_once)
    usable = int(total_bytes * fraction)
    weight = weights_bytes(shape, dtype_bytes) if weights is None else int(weights)
    article = "an" if str(marketed).startswith("8") or marketed in (11, 18) else "a"
    card = f"{fraction:.0%} of {article} {marketed} GB card ({usable / GIB:.1f} GiB)"
    if weight > usable:
        raise ValueError(f"model weights {weight / GIB:.1f} GiB exceed {card}")
    longest = forward_peak_bytes(shape, 1, length, dtype_bytes)
    if weight + at_once * longest > usable:
        forwards = f"one {length}-token forward" if at_once == 1 else f"{at_once} {length}-token forwards"
        raise ValueError(f"model weights {weight / GIB:.1f} GiB + {forwards} {at_once * longest / GIB:.1f} "
                         f"GiB exceed {card}; lower max_length or use a bigger card")

    tier = tier_max_batch_size(marketed)
    # No forward holds more than a tier of inputs of max_length tokens: a bigger budget is never used.
    ceiling = tier * length

    def peak(budget: int) -> int:
        return budget_peak_bytes(shape, budget, length, tier, dtype_bytes)

    def fits(budget: int) -> bool:
        return weight + at_once * peak(budget) <= usable

    # The peak only grows with the budget: bisect for the largest that fits (one full row does).
    low, high = length, ceiling
    if fits(high):
        low = high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    # A multiple of 64 for the allocator's sake, but never below one full-length input.
    budget = max(low // 64 * 64, length)
    batch = min(tier, budget)
    bound = "a tier of full-length inputs" if low == ceiling else "memory"
    forward = peak(budget)
    reason = (f"{marketed} GB card: tier {tier} inputs; {budget} tokens a forward, bound by {bound} "
              f"(weights {weight / GIB:.2f} GiB + {at_once} x {forward / GIB:.2f} GiB <= {card})")
    return GpuLimits(max_batch_size=batch, max_batch_tokens=budget, marketed_gb=marketed,
                     weights_bytes=weight, peak_bytes=forward, reason=reason)
