"""The application builder: typed args from serve_config.yaml in, one ingress and an embedder per model out.

No `from __future__ import annotations` here: Ray reads the builder's annotation as a class to validate args.
"""


from ray.serve import Application

from deployments.embedder import Embedder
from deployments.ingress import Ingress
from embserve.settings import Settings


def build_app(args: Settings) -> Application:
    """`serve run serve_config.yaml` calls this with the file's `args` (EMB_PROVIDER_* fill the rest)."""
    embedders = []
    for spec in args.model_specs():
        options = {"name": spec.deployment_name, **spec.deployment}
        if args.num_gpus:
            # Merged, not replaced: a model's own ray_actor_options (num_cpus, say) keep the GPU ask.
            options["ray_actor_options"] = {"num_gpus": args.num_gpus, **spec.deployment.get("ray_actor_options", {})}
        batching = args.batching()
        options.setdefault("max_ongoing_requests", max(64, 2 * batching.max_batch_size))
        options.setdefault("max_queued_requests", args.max_queued_requests)
        embedders.append(Embedder.options(**options).bind(spec, args))
    return Ingress.bind(args, *embedders)

