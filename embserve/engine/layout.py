"""What the application asks Ray for: each deployment's default options, and whether a cluster that cannot
grow can ever give it that. serve_config.yaml's `deployments` entries override these by name."""

from __future__ import annotations

import os
from typing import Any

from embserve.settings import CPU_MAX_BATCH_SIZE, ModelSpec, Settings

# The ingress validates, routes and encodes: a few ms of CPU per request, mostly awaiting an embedder. It
# reserves what it uses, so that the embedders of several models fit beside it on a laptop.
INGRESS_CPUS = 0.25
INGRESS_MAX_ONGOING_REQUESTS = 256  # requests one ingress replica holds at once
# Requests one embedding replica holds at least; more where its admissions are larger (embedder_options).
EMBEDDER_MIN_ONGOING_REQUESTS = 64
INGRESS_OPTIONS: dict[str, Any] = {
    "max_ongoing_requests": INGRESS_MAX_ONGOING_REQUESTS,
    # One more than this waits nowhere: Serve answers 503 with Retry-After at once.
    "max_queued_requests": 256,
    "backpressure_config": {"status_code": 503, "retry_after_s": 1},
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64,
                           "upscale_delay_s": 10, "downscale_delay_s": 300},
    "ray_actor_options": {"num_cpus": INGRESS_CPUS},
}
# GPU replicas scale on load, one card each; a new one loads the model and may wait for a GPU node, so
# they come slowly and go slower still. Their target of ongoing requests is the largest forward
# (`embedder_options`): a card is busy only once a full forward of one-text requests is in flight.
GPU_AUTOSCALING: dict[str, Any] = {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 10,
                                   "downscale_delay_s": 300}
GPU_MAX_BATCH_SIZE = 256  # the largest batch a card's size can give (embserve.engine.gpu_memory's tiers)


def embedder_options(settings: Settings, spec: ModelSpec, cpu_models: int) -> dict[str, Any]:
    """A model's embedder deployment options: its `deployment` settings over these defaults.

    On GPUs: one card per replica (`num_gpus`), autoscaled. On CPUs: one replica per model, which runs a
    forward on every core it sees (embserve.engine.hardware); the models of one app share the cores, so each
    reserves its share of one CPU and all of them fit beside the ingress on a 2-core machine.
    """
    bound = settings.admit_batch_size or settings.max_batch_size or (
        GPU_MAX_BATCH_SIZE if settings.num_gpus else CPU_MAX_BATCH_SIZE)
    options: dict[str, Any] = {
        "name": spec.deployment_name,
        # Requests one replica holds; an admission can never hold more, so twice the largest lets one
        # compute while the next fills.
        "max_ongoing_requests": max(EMBEDDER_MIN_ONGOING_REQUESTS, 2 * bound),
        "max_queued_requests": settings.max_queued_requests,
    }
    if settings.num_gpus:
        actor = {"num_gpus": settings.num_gpus}
        # At fewer ongoing requests a card's forwards are small and launch-bound (a MiniLM forward of 32
        # texts costs about what one of 256 does on a large card), so a second card would be asked for
        # while the first still idles; at `bound`, one full forward runs while the rest of
        # max_ongoing_requests (2 x bound) fills the next.
        options["autoscaling_config"] = {**GPU_AUTOSCALING, "target_ongoing_requests": bound}
    else:
        actor = {"num_cpus": round(1 / max(1, cpu_models), 3)}
        options["num_replicas"] = 1
    own = dict(spec.deployment)
    if "num_replicas" in own or "autoscaling_config" in own:  # Serve refuses both at once
        options.pop("num_replicas", None)
        options.pop("autoscaling_config", None)
    options["ray_actor_options"] = {**actor, **own.pop("ray_actor_options", {})}
    options.update(own)
    if options["ray_actor_options"].get("num_gpus"):
        options["ray_actor_options"] = with_allocator_env(options["ray_actor_options"])
    return options


ALLOCATOR_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
ALLOCATOR_DEFAULT = "expandable_segments:True"


def with_allocator_env(actor: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """A GPU replica's actor options with `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` in its
    runtime_env: Ray sets it when the worker process starts, before anything imports torch, so the
    allocator reads it (a group of a new shape grows the segment it has instead of leaving holes).
    Whatever the user set wins: an allocator variable in the replica's own runtime_env, or in the
    environment the builder runs in (which Ray's workers inherit)."""
    env = os.environ if environ is None else environ
    runtime_env = dict(actor.get("runtime_env") or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    if any(name in env_vars or name in env for name in ALLOCATOR_ENV):
        return actor
    env_vars["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_DEFAULT
    return {**actor, "runtime_env": {**runtime_env, "env_vars": env_vars}}


def least_replicas(options: dict[str, Any]) -> int:
    autoscaling = options.get("autoscaling_config")
    if autoscaling:
        return int(autoscaling.get("min_replicas", 1))
    replicas = options.get("num_replicas", 1)
    return replicas if isinstance(replicas, int) else 1


def needed(all_options: list[dict[str, Any]]) -> dict[str, float]:
    """CPUs and GPUs the app needs to start: every deployment at its fewest replicas (Serve's default
    num_cpus for a replica is 1)."""
    need = {"CPU": 0.0, "GPU": 0.0}
    for options in all_options:
        actor = options.get("ray_actor_options") or {}
        n = least_replicas(options)
        need["CPU"] += n * float(actor.get("num_cpus", 1) if actor.get("num_cpus") is not None else 1)
        need["GPU"] += n * float(actor.get("num_gpus") or 0)
    return need


def unmet(need: dict[str, float], have: dict[str, float]) -> str | None:
    """What a cluster of fixed size lacks to start the app, in words, or None when it fits."""
    short = [f"{need[r]:g} {r}s (the cluster has {have.get(r, 0):g})" for r in ("CPU", "GPU")
             if need[r] > have.get(r, 0) + 1e-9]
    if not short:
        return None
    return ("this application needs " + " and ".join(short) + " to start, and this Ray cluster cannot add "
            "nodes. Lower num_gpus or num_cpus (EMB_PROVIDER_NUM_GPUS, the models' `deployment`), serve "
            "fewer models, or start Ray with more resources")


def is_fixed_size(autoscaling_status: dict[str, Any] | None) -> bool | None:
    """Whether Ray's autoscaler can add nodes, from the status it writes to the GCS; None if unknown.

    Without an autoscaling config (a local `ray start` or `serve run`), the autoscaler knows only the nodes
    that are there, each as its own node type named after its id.
    """
    if not autoscaling_status:
        return None
    mapping = (autoscaling_status.get("autoscaler_report") or {}).get("node_type_mapping")
    if not mapping:
        return None
    return all(node_type == f"node_{node_id}" for node_id, node_type in mapping.items())

