"""A replica's hardware profile: device, threads and batch sizes, decided at start from what the replica
sees, each value with where it came from. An explicit setting always wins over what is seen."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from embserve.engine.layout import ALLOCATOR_DEFAULT, ALLOCATOR_ENV
from embserve.settings import (
    CPU_MAX_BATCH_SIZE,
    CPU_MAX_BATCH_TOKENS,
    GPU_MAX_FORWARD_MS,
    USER_CONFIG_FIELD,
    BatchingKnobs,
    Settings,
    default_group_cost_tokens,
)

if TYPE_CHECKING:
    from embserve.engine.forward_cost import ForwardCost
    from embserve.engine.model import EmbeddingModel
    from embserve.engine.scheduler import ForwardLayout
    from embserve.engine.warmup import WarmUp
    from embserve.settings import ModelSpec

@dataclass(frozen=True)
class Choice:
    value: Any
    source: str


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS has no affinity call
        return os.cpu_count() or 1


def _given(settings: Settings, name: str) -> str:
    return f"set: {settings.source_of(name)}"


def source(settings: Settings, name: str, otherwise: str) -> str:
    """Where a setting's value came from, or `otherwise` when it is the default."""
    return _given(settings, name) if settings.explicit(name) else otherwise


def choose_device(setting: str, cuda_available: bool, gpus_assigned: int | None = None,
                  where: str = "as given") -> Choice:
    """The device a replica (or an EmbeddingModel built on its own) runs on: the one place that resolves the
    `device` setting. `where`: where the setting came from (Settings.source_of). `gpus_assigned`: the GPUs Ray
    gave this replica (its `num_gpus`), None outside Ray. Ray 2.60 no longer hides a GPU host's cards from a
    worker that asked for none, so `num_gpus: 0` means the CPU."""
    if gpus_assigned and not cuda_available and setting != "cpu":
        # Running on the CPU here would hold a card idle and serve at a fraction of its speed, silently.
        raise ValueError(f"Ray assigned this replica {gpus_assigned} GPU(s) (num_gpus) but torch sees none: "
                         f"{torch_cuda_build()}. Install a CUDA build of torch that the node's driver "
                         "supports, or set num_gpus to 0 (or device to 'cpu') to serve on the CPU")
    if setting == "auto":
        if cuda_available and gpus_assigned == 0:
            return Choice("cpu", "auto: the replica has no GPU of its own (num_gpus: 0), though torch sees one")
        return Choice("cuda", "auto: torch sees a GPU") if cuda_available else Choice("cpu", "auto: no GPU visible")
    if setting == "cuda" and not cuda_available:
        raise ValueError(f"device 'cuda' is set ({where}) but torch sees no GPU on this "
                         "replica's node; set it to 'auto' or 'cpu', or give the replica a GPU (num_gpus)")
    return Choice(setting, f"set: {where}")


def torch_cuda_build() -> str:
    """Why torch may see no GPU, in words: its version and the CUDA it was built with, if any."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, but finds no usable GPU "
            "(no driver, a driver older than that CUDA, or CUDA_VISIBLE_DEVICES hides the card)")


def assigned_gpus() -> int | None:
    """How many GPUs Ray assigned to this worker, or None where this process is no Ray actor (a driver,
    or no Ray at all)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return len(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))


def assigned_gpu_share() -> float | None:
    """The GPUs Ray reserved for this worker, as a number (0.5 where two replicas share a card), or None
    where this process is no Ray actor (a driver, or no Ray at all)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))


def memory_fraction(setting: float, gpu_share: float | None) -> Choice:
    """The share of the card this replica may use: `gpu_memory_fraction` of its own part of the card.
    Replicas that share a card (num_gpus 0.5) each get their part; a replica with one card or more uses
    its first card (device 0) and gets the setting."""
    if gpu_share is not None and 0 < gpu_share < 1:
        return Choice(round(setting * gpu_share, 4), f"gpu_memory_fraction {setting} x num_gpus {gpu_share:g}")
    return Choice(setting, f"gpu_memory_fraction {setting}")


def cuda_allocator_defaults(environ: dict[str, str] | None = None) -> None:
    """Expandable segments for torch's CUDA allocator unless the environment says otherwise: a group of a
    new shape grows the segment it has instead of leaving holes that the next one cannot use. A Ray GPU
    replica has it from its runtime_env (embserve.engine.layout.with_allocator_env); elsewhere (a script, bench)
    it is set here, and handed to torch's allocator-settings call too, since torch reads the variable once,
    when its allocator config is first used, and may have done so already."""
    env = os.environ if environ is None else environ
    if not any(name in env for name in ALLOCATOR_ENV):
        env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_DEFAULT
        if environ is None:
            set_allocator_settings(ALLOCATOR_DEFAULT)


def set_allocator_settings(conf: str) -> None:
    """Applies allocator settings to this process's torch where it has the call (torch 2.1 and later)."""
    import torch

    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or getattr(
        torch.cuda.memory, "_set_allocator_settings", None)
    if setter is not None:
        setter(conf)


def enforce_memory_fraction(fraction: float) -> None:
    """Caps this process's CUDA allocations at `fraction` of the card: past it torch raises out of memory
    here (which the scheduler recovers from) instead of taking memory another replica planned for."""
    import torch

    torch.cuda.set_per_process_memory_fraction(fraction)


def choose_threads(settings: Settings, device: str, cores: int) -> Choice:
    """Torch threads for the replica's forwards. On a CPU every core the replica can run on: the ingress
    and Ray's processes need little, and an idle core is throughput lost (Ray's own default, one thread
    per reserved CPU, left half of a 2-core laptop idle). On a GPU, what torch has (the card computes)."""
    if settings.torch_threads is not None:
        return Choice(settings.torch_threads, _given(settings, "torch_threads"))
    if device == "cpu":
        return Choice(cores, f"auto: {cores} cores visible to the replica")
    return Choice(None, "auto: torch's default on a GPU")


def choose_batch_sizes(settings: Settings, gpu: Any = None) -> tuple[Choice, Choice]:
    """max_batch_size and max_batch_tokens: the settings where given, else the card's limits on a GPU
    (`gpu`, an embserve.engine.gpu_memory.GpuLimits), else the CPU defaults."""
    out = []
    for name, cpu_value in (("max_batch_size", CPU_MAX_BATCH_SIZE), ("max_batch_tokens", CPU_MAX_BATCH_TOKENS)):
        if getattr(settings, name) is not None:
            out.append(Choice(getattr(settings, name), _given(settings, name)))
        elif gpu is not None:
            out.append(Choice(getattr(gpu, name), f"auto: {gpu.reason}"))
        else:
            out.append(Choice(cpu_value, "auto: CPU default"))
    return out[0], out[1]


@dataclass
class Profile:
    """What a replica runs with; `as_dict` is what its start log and /v1/performance's `profile` show."""

    choices: dict[str, Choice] = field(default_factory=dict)

    def set(self, name: str, value: Any, source: str) -> None:
        self.choices[name] = Choice(value, source)

    def retuned(self, settings: Settings, user_config: dict[str, Any], live: dict[str, Any]) -> list[str]:
        """Marks the knobs that Serve's user_config names as coming from it, and returns a warning for
        each one that shadows a value set in the environment, .env or args."""
        warnings = []
        for key in user_config:
            name = USER_CONFIG_FIELD.get(key, key)
            if name in live:
                self.set(name, live[name], "set: serve_config.yaml user_config")
            if settings.explicit(name) and getattr(settings, name) != live.get(name):
                warnings.append(f"user_config {key}={user_config[key]!r} shadows {name}={getattr(settings, name)!r} "
                                f"from {settings.source_of(name)}")
        return warnings

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {"value": c.value, "source": c.source} for name, c in self.choices.items()}

    def summary(self) -> str:
        return ", ".join(f"{name}={c.value} ({c.source})" for name, c in self.choices.items())


def replica_profile(settings: Settings, *, device: Choice, dtype: Choice, threads: Choice, layout: "ForwardLayout",
                    batch_size: Choice, batch_tokens: Choice, attention: Choice | None = None,
                    memory: Choice | None = None, runtime: Choice | None = None) -> Profile:
    profile = Profile()
    profile.set("device", device.value, device.source)
    if runtime is not None:
        profile.set("runtime", runtime.value, runtime.source)
    profile.set("dtype", dtype.value, dtype.source)
    if attention is not None:
        profile.set("attention", attention.value, attention.source)
    if memory is not None:
        profile.set("gpu_memory_fraction", memory.value, memory.source)
    profile.set("torch_threads", layout.threads, threads.source)
    profile.set("forward_workers", layout.workers, source(
        settings, "forward_workers", "auto: one forward on a GPU" if device.value == "cuda" else
        "auto: one single-thread forward per thread"))
    profile.set("max_batch_size", batch_size.value, batch_size.source)
    profile.set("admit_batch_size", settings.admit_batch_size or batch_size.value,
                source(settings, "admit_batch_size", "auto: max_batch_size"))
    profile.set("max_batch_tokens", batch_tokens.value, batch_tokens.source)
    for name in BatchingKnobs.model_fields:  # the other knobs as set (forward_timing resolves the group cost)
        if name not in profile.choices:
            profile.set(name, getattr(settings, name), source(settings, name, "default"))
    return profile


def gpu_limits(model: "EmbeddingModel", fraction: float, forwards_at_once: int) -> Any:
    """This card's batch limits for this model (embserve.engine.gpu_memory), from the card's total memory and the
    model's own config; its weights are already resident, so their real size counts."""
    import torch

    from embserve.engine.gpu_memory import ModelShape, gpu_batch_limits

    net = model.model
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    dtype_bytes = torch.finfo(next(net.parameters()).dtype).bits // 8
    total = torch.cuda.get_device_properties(0).total_memory
    return gpu_batch_limits(total, ModelShape.from_config(net.config), dtype_bytes, fraction=fraction,
                            forwards_at_once=forwards_at_once, max_length=model.max_length, weights=weights)


@dataclass
class ReplicaStart:
    """What a replica builds at start: its model, forward layout and batch limits, the profile that says
    where each came from, and the warnings worth a line in its log."""

    model: "EmbeddingModel"
    layout: "ForwardLayout"
    batch_size: int
    batch_tokens: int
    profile: Profile
    warnings: list[str]
    # What one more forward costs the planner: the setting, else a GPU forward's fixed cost measured at
    # warm-up, else the device's default (embserve.settings.default_group_cost_tokens).
    group_cost_tokens: int
    warm_up: "WarmUp | None" = None
    tolerance_wall: bool = True  # False: length_group_tolerance is a preference (the cost decides)
    forward_cost: "ForwardCost | None" = None  # a GPU forward's cost line, where the warm-up measured it


TOKENIZER_THREADS_ENV = "TOKENIZERS_PARALLELISM"


def serial_tokenizer(environ: MutableMapping[str, str] | None = None) -> bool:
    """Hugging Face tokenizers run one admission's texts on a Rust thread pool unless TOKENIZERS_PARALLELISM says
    not to. A replica's admissions are small, and the pool's threads spin beside the forwards for the same
    cores: serial tokenization served 9% more short texts per second on 2 cores (docs/benchmarks.md). Set
    before the replica's first tokenizer call; a value the user set is kept. Returns whether it was set here."""
    env = os.environ if environ is None else environ
    if TOKENIZER_THREADS_ENV in env:
        return False
    env[TOKENIZER_THREADS_ENV] = "false"
    return True


def start_replica(spec: "ModelSpec", settings: Settings, cuda_available: bool,
                  gpus_assigned: int | None = None, gpu_share: float | None = None) -> ReplicaStart:
    """Load the model on the device the settings and hardware choose, size the replica around it, and warm
    it up on the shapes its first requests will have. `gpu_share`: the GPUs Ray reserved (num_gpus). The
    server's replicas and the bulk job's actors both start here."""
    import torch

    from embserve.engine.scheduler import forward_layout
    from embserve.engine.warmup import warm_up, warm_up_shapes

    serial_tokenizer()
    device = choose_device(settings.device, cuda_available, gpus_assigned, settings.source_of("device"))
    memory = claim_gpu_memory(settings, gpu_share) if device.value == "cuda" else None
    threads = choose_threads(settings, device.value, cpu_cores())
    # The replica's threads, split among forwards that run at once from one queue (OpenVINO's streams too).
    planned = forward_layout(device.value, threads.value or torch.get_num_threads(), settings.forward_workers)
    model = load_model(spec, settings, device.value, threads.value, planned.workers)
    layout = forward_layout(model.device, torch.get_num_threads(), settings.forward_workers)
    warnings = []
    if layout.threads != torch.get_num_threads():
        warnings.append(f"{torch.get_num_threads()} torch threads for {layout.workers} forward workers: "
                        f"running {layout.workers} x {layout.threads_per_forward}")
    # On a GPU the sizes come from the card and this model's config; forwards at once share the card.
    # The token budget is sized for the same share of the card that the allocator is capped at.
    gpu = gpu_limits(model, memory.value, layout.workers) if memory is not None else None
    batch_size, batch_tokens = choose_batch_sizes(settings, gpu)
    profile = replica_profile(settings, device=device, dtype=Choice(model.info.dtype, model.dtype_reason),
                              threads=threads, layout=layout, batch_size=batch_size, batch_tokens=batch_tokens,
                              attention=Choice(model.attention, model.attention_reason), memory=memory,
                              runtime=runtime_choice(settings, model))
    warnings += [f"setting {name}={getattr(settings, name)!r} from {settings.source_of(name)} shadows {what}"
                 for name, what in settings.shadowed().items()]
    limit_ms = settings.max_forward_ms if settings.max_forward_ms is not None else (
        GPU_MAX_FORWARD_MS if model.device == "cuda" else None)
    warmed = warm_up(model, warm_up_shapes(batch_tokens.value, batch_size.value, model.max_length, model.device),
                     timed=limit_ms is not None)
    if warmed.out_of_memory:
        warnings.append(f"warm-up ran out of GPU memory at one of {list(warmed.shapes)}: the replica will lower "
                        "its token budget on its first large groups")
    timing = forward_timing(settings, profile, batch_tokens, warmed.cost, limit_ms, model.max_length,
                            model.device == "cuda")
    return ReplicaStart(model, layout, batch_size.value, timing.budget, profile, warnings, timing.group_cost_tokens,
                        warm_up=warmed, tolerance_wall=timing.tolerance_wall, forward_cost=timing.cost)


def claim_gpu_memory(settings: Settings, gpu_share: float | None) -> Choice:
    """This replica's share of its card, capped in torch's allocator before the first CUDA allocation."""
    cuda_allocator_defaults()
    memory = memory_fraction(settings.gpu_memory_fraction, gpu_share)
    enforce_memory_fraction(memory.value)
    return memory


def load_model(spec: "ModelSpec", settings: Settings, device: str, threads: int | None, workers: int) -> Any:
    """The spec's model on `device`: an EmbeddingModel, or a CrossEncoderModel for a reranker. `workers`:
    forwards that will run at once (OpenVINO compiles one stream each)."""
    from embserve.engine.model import EmbeddingModel
    from embserve.engine.rerank import CrossEncoderModel

    if spec.task == "rerank":
        return CrossEncoderModel(spec, device=device, dtype=settings.dtype, threads=threads, runtime=settings.runtime)
    return EmbeddingModel(spec, device=device, dtype=settings.dtype, threads=threads, runtime=settings.runtime,
                          streams=workers, cache_dir=settings.openvino_cache_dir, allow_tf32=settings.allow_tf32)


def runtime_choice(settings: Settings, model: Any) -> Choice:
    """The runtime the model runs on: where the setting came from, then what the runtime did with it
    ("set: args; cached IR ...")."""
    why = model.runtime_reason
    if not settings.explicit("runtime"):
        return Choice(model.runtime, why)
    return Choice(model.runtime, _given(settings, "runtime") + (why[3:] if why.startswith("set") else f"; {why}"))


@dataclass(frozen=True)
class ForwardTiming:
    budget: int
    group_cost_tokens: int
    tolerance_wall: bool
    cost: "ForwardCost | None" = None  # the line on a GPU, where the pipelined worker times its next group's take by it


def forward_timing(settings: Settings, profile: Profile, batch_tokens: Choice, cost: Any, limit_ms: float | None,
                   max_length: int, gpu: bool) -> ForwardTiming:
    """What the warm-up's cost line (`cost`, an embserve.engine.forward_cost.ForwardCost or None) changes, each
    shown in the profile: the automatic token budget bounded by `limit_ms` (max_forward_ms); on a GPU, a
    forward's fixed cost as the planner's group cost, the length tolerance a preference, and the line itself
    for the pipelined worker (Scheduler._pipeline). A setting given explicitly keeps its value; a group cost
    neither set nor measured is the device's default."""
    from embserve.engine.forward_cost import capped_budget

    budget = batch_tokens.value
    if cost is not None:
        profile.set("forward_cost", cost.describe(), "measured at warm-up")
    if limit_ms is not None:
        profile.set("max_forward_ms", limit_ms, source(settings, "max_forward_ms", "auto: GPU default"))
        if settings.max_batch_tokens is None:
            budget, why = capped_budget(budget, cost, limit_ms, max_length)
            if why:
                profile.set("max_batch_tokens", budget, f"{batch_tokens.source}; {why}")
    measured = gpu and cost is not None
    if settings.group_cost_tokens is not None:
        group_cost = settings.group_cost_tokens
        profile.set("group_cost_tokens", group_cost, _given(settings, "group_cost_tokens"))
    elif measured:
        group_cost = cost.fixed_tokens
        profile.set("group_cost_tokens", group_cost, "auto: a forward's fixed cost in tokens, from the warm-up")
    else:
        group_cost = default_group_cost_tokens("cuda" if gpu else "cpu")
        profile.set("group_cost_tokens", group_cost, f"auto: {'GPU' if gpu else 'CPU'} default")
    if not measured:
        return ForwardTiming(budget, group_cost, True)
    wall = settings.explicit("length_group_tolerance")
    if not wall:
        profile.set("length_group_tolerance", settings.length_group_tolerance,
                    "default; a preference on a GPU: the group cost weighs padding against a forward")
    return ForwardTiming(budget, group_cost, wall, cost)
