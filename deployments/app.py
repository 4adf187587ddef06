"""The application builder: typed args from serve_config.yaml in, one ingress and an embedder per model out.

No `from __future__ import annotations` here: Ray reads the builder's annotation as a class to validate args.
"""

import json
import logging

import ray
from ray.serve import Application

from deployments.embedder import Embedder
from deployments.ingress import Ingress
from embserve.engine.layout import INGRESS_OPTIONS, embedder_options, is_fixed_size, needed, unmet
from embserve.settings import Settings

log = logging.getLogger("ray.serve")


def build_app(args: Settings) -> Application:
    """`serve run serve_config.yaml` calls this with the file's `args` (EMB_PROVIDER_* fill the rest)."""
    specs = args.model_specs()
    cpu_models = 0 if args.num_gpus else len(specs)
    every = [INGRESS_OPTIONS]
    embedders = []
    for spec in specs:
        options = embedder_options(args, spec, cpu_models)
        every.append(options)
        embedders.append(Embedder.options(**options).bind(spec, args))
    check_cluster_fits(needed(every))
    return Ingress.options(**INGRESS_OPTIONS).bind(args, *embedders)


def check_cluster_fits(need: dict[str, float]) -> None:
    """Refuses to start, saying what is missing, where a Ray cluster that cannot add nodes could never
    place the app: otherwise a replica waits for ever, with only Ray's warning every 30 s to show for it."""
    # Only where Serve builds the app, in a task on the cluster: a driver that calls the builder itself
    # (`serve build`, a test, a script passing the app to serve.run) may hold any Ray, or none.
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get("__autoscaling_status")
    fixed = is_fixed_size(json.loads(raw) if raw else None)
    problem = unmet(need, ray.cluster_resources()) if fixed else None
    if problem:
        raise RuntimeError(problem)
    if fixed is None:
        log.info("Ray's autoscaler status is not known yet: resources are not checked before deploying")
